// The sign-in screen: an API key is exchanged once for the session cookie (HttpOnly: script never sees it). The
// key itself is kept nowhere: not in storage, not in the URL, not even in the field once it has been sent. Where
// the API has an OIDC client, the identity provider is offered too: the API runs that flow (authorization code with
// PKCE) and sends the browser back to the page signed in, or with ?signin_error=<reason>.

import {api} from "./api.js";
import {h, fill} from "./dom.js";

/** Words for a refused sign-in. */
export function signInError(err) {
  if (err.status === 401) return `That key was not accepted: ${err.message}`;
  if (err.status === 422) return "That is not an API key: they look like kiln_0123456789_…";
  if (err.status === 0) return `The Kiln API is not answering: ${err.message}`;
  if (err.status === 429) return `Too many attempts: ${err.message}`;
  return `Signing in failed (HTTP ${err.status}): ${err.message}`;
}

function oidcPart(config) {
  if (config.oidc_login) {
    return h("div", {class: "oidc"}, h("div", {class: "or"}, "or"),
      h("a", {class: "btn oidc-start", href: "/api/v1/session/oidc"}, "Sign in with OIDC"),
      h("p", {class: "hint"}, "Through ", h("code", {}, config.oidc_issuer), "."));
  }
  if (config.oidc_issuer) {
    return h("p", {class: "hint oidc-note"},
      "Scripts and the CLI may also use OIDC access tokens from ", h("code", {}, config.oidc_issuer),
      " (", h("code", {}, "Authorization: Bearer <token>"), "). This page signs in with an API key only.");
  }
  return null;
}

/** Show the sign-in form in `root`; `onSignedIn(session)` gets the API's answer ({user, csrf_token, expires_at}).
 *
 * `notice` says why the screen is shown (signed out, session ended); `error` is a failed sign-in to report.
 */
export function signInView(root, {config, notice, error: failed, onSignedIn}) {
  const input = h("input", {id: "api-key", name: "api-key", type: "password", autocomplete: "off",
    spellcheck: "false", autocapitalize: "off", placeholder: "kiln_…", "aria-describedby": "api-key-help"});
  const error = h("div", {class: "form-error", role: "alert", hidden: true});
  const submit = h("button", {class: "btn btn-primary", type: "submit"}, "Sign in");
  const fail = (text) => {
    fill(error, text);
    error.hidden = false;
    input.focus();
  };
  const form = h("form", {class: "signin-form", novalidate: true},
    h("label", {for: "api-key"}, "API key"), input,
    h("p", {id: "api-key-help", class: "hint"},
      "A key from the instance owner or a project admin. After ", h("code", {}, "kiln up"),
      ", the owner's key is in ", h("code", {}, "<data dir>/secrets/owner.key"), "."),
    error, h("div", {class: "form-actions"}, submit));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    input.value = "";
    if (!key) {
      fail("Paste an API key (kiln_…).");
      return;
    }
    submit.disabled = true;
    error.hidden = true;
    try {
      onSignedIn(await api.signIn(key));
    } catch (err) {
      fail(signInError(err));
    } finally {
      submit.disabled = false;
    }
  });

  fill(root, h("div", {class: "signin-page"}, h("section", {class: "card signin"},
    h("h1", {}, "Sign in to Kiln"),
    notice ? h("p", {class: "notice", role: "status"}, notice) : null,
    form,
    oidcPart(config))));
  if (failed) fail(failed);
  input.focus();
}
