// Kiln web page: sign-in, then hash routes (#/jobs, #/jobs/<id>, #/new, #/compare) over one shared live connection.
//
// Signed out, the page shows the sign-in screen and nothing else: signing out (or any 401 from the API) ends the
// views, the live connection and the session's CSRF token before the sign-in screen appears.

import {Access} from "./js/access.js";
import {api, useSession} from "./js/api.js";
import {compareView} from "./js/compare.js";
import {fill, h, toast} from "./js/dom.js";
import {formView} from "./js/form.js";
import {jobView} from "./js/job.js";
import {jobsView} from "./js/jobs.js";
import {Live} from "./js/live.js";
import {signInView} from "./js/signin.js";

const ARTIFACT_FILE = /^\/api\/v1\/jobs\/\{[^}]+\}\/artifacts\/\{[^}]+\}$/;
const LOOPBACK = new Set(["127.0.0.1", "localhost", "0.0.0.0", "::1", "[::1]"]);
const SIGNED_OUT = "You signed out.";

/** The notifier's URL as the API reports it; a loopback host means "the machine serving this page". */
export function notifierUrl(configured, here = window.location) {
  const url = new URL(configured);
  if (LOOPBACK.has(url.hostname) && !LOOPBACK.has(here.hostname)) url.hostname = here.hostname;
  if (here.protocol === "https:" && url.protocol === "ws:") url.protocol = "wss:";
  return url.toString().replace(/\/$/, "");
}

/** Bind the connection pill to `live`; returns the unbinding. */
function connectionPill(live) {
  const pill = document.getElementById("conn");
  const text = {connecting: "connecting…", live: "live", reconnecting: "reconnecting…", off: "off"};
  const show = ({state, detail}) => {
    pill.dataset.state = state;
    pill.textContent = text[state] + (detail && state !== "live" ? ` (${detail})` : "");
    pill.title = `Live events from ${live.url}` + (state === "live" ? "" : "; click to retry now");
  };
  const onState = (e) => show(e.detail);
  const onClick = () => live.state !== "live" && live.reconnect();
  live.addEventListener("state", onState);
  pill.addEventListener("click", onClick);
  show({state: live.state, detail: ""});
  return () => {
    live.removeEventListener("state", onState);
    pill.removeEventListener("click", onClick);
  };
}

function errorPage(view, title, message) {
  fill(view, h("div", {class: "card error-page"}, h("h2", {}, title), h("p", {}, message)));
}

/** Who is signed in, and their role in `project` where the view is about one. */
function showWho(app, project) {
  const {user, access, config} = app;
  const name = document.getElementById("who-name");
  const role = document.getElementById("who-role");
  document.getElementById("sign-out").hidden = config.auth === "off";
  name.textContent = user ? user.name : "";
  let text = "";
  if (user && config.auth === "off") text = "authentication off";
  else if (user?.is_owner) text = "owner";
  else if (user && project) text = `${access.role(project) || "no role"} in ${project}`;
  role.textContent = text;
  role.hidden = !text;
}

function route(app) {
  const [path, query] = window.location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const [page, id] = path.split("/").filter(Boolean);
  app.cleanup();
  // A fresh element per view: whatever a closed view's late answers render lands nowhere.
  const root = h("div", {class: "route"});
  app.view.replaceChildren(root);
  window.scrollTo(0, 0);
  showWho(app, null);
  const {live, features, openapi, access} = app;
  const navigate = (hash) => { window.location.hash = hash; };
  const ctx = {live, params, navigate, features, openapi, access, showProject: (p) => showWho(app, p)};
  let section = "jobs";
  if (page === "jobs" && id) {
    app.cleanup = jobView(root, {...ctx, id: decodeURIComponent(id)});
    document.title = `Job ${decodeURIComponent(id).slice(0, 12)} · Kiln`;
  } else if (page === "new") {
    section = "new";
    app.cleanup = formView(root, ctx);
    document.title = "New job · Kiln";
  } else if (page === "compare") {
    section = "compare";
    app.cleanup = compareView(root, ctx);
    document.title = "Compare · Kiln";
  } else {
    app.cleanup = jobsView(root, ctx);
    document.title = "Jobs · Kiln";
  }
  for (const a of document.querySelectorAll("nav.main a")) {
    a.classList.toggle("active", a.dataset.section === section);
  }
}

/** Signed in (`session` as POST/GET /api/v1/session answer): the projects, the live connection, the views. */
async function enter(app, session) {
  const user = session.user;
  app.user = user;
  useSession({csrf: session.csrf_token, onLost: (reason) => leave(app, `Your session ended: ${reason}`)});
  const projects = await api.projects();
  if (app.user !== user) return;  // signed out meanwhile
  app.access = new Access(app.openapi, user, projects);
  app.live = new Live(notifierUrl(app.config.notifier_url), {issue: (scope) => api.ticket(scope)});
  window.kiln = {live: app.live, features: app.features, access: app.access};
  app.unpill = connectionPill(app.live);
  document.body.dataset.auth = "in";
  route(app);
  app.live.connect();  // after the view subscribed: the first ticket names what it watches
}

/** Signed out, or the session ended: nothing of the signed-in page stays, then the sign-in screen. */
function leave(app, notice) {
  if (!app.user) return;
  app.user = null;
  app.cleanup();
  app.cleanup = () => {};
  app.live?.stop();
  app.unpill();
  Object.assign(app, {live: null, access: null, unpill: () => {}});
  useSession({});
  window.kiln = {features: app.features};
  document.getElementById("toasts").replaceChildren();
  showSignIn(app, notice);
}

function showSignIn(app, notice, error = "") {
  document.body.dataset.auth = "out";
  document.title = "Sign in · Kiln";
  showWho(app, null);
  const root = h("div", {class: "route"});
  app.view.replaceChildren(root);
  signInView(root, {config: app.config, notice, error, onSignedIn: (session) => start(app, () => session)});
}

/** Enter with the session `get` returns; a 401 shows the sign-in screen. */
async function start(app, get) {
  try {
    await enter(app, await get());
  } catch (err) {
    if (err.status === 401) return;  // enter's 401 already led to the sign-in screen (leave)
    app.user = null;
    useSession({});
    errorPage(app.view, "The Kiln API is not answering", err.message);
  }
}

async function signOut(app) {
  const button = document.getElementById("sign-out");
  button.disabled = true;
  try {
    await api.signOut();
    leave(app, SIGNED_OUT);
  } catch (err) {
    if (err.status === 401) leave(app, SIGNED_OUT);  // it had ended already
    else toast(`Could not sign out: ${err.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

/** The reason of a failed OIDC sign-in the API sent the browser back with; taken out of the address bar. */
function oidcError() {
  const params = new URLSearchParams(window.location.search);
  const reason = params.get("signin_error");
  if (reason === null) return "";
  params.delete("signin_error");
  const search = params.toString();
  history.replaceState(null, "", window.location.pathname + (search ? `?${search}` : "") + window.location.hash);
  return `Signing in with OIDC failed: ${reason}`;
}

async function boot() {
  const view = document.getElementById("view");
  const failed = oidcError();
  let config;
  let openapi;
  try {
    [config, openapi] = await Promise.all([api.config(), api.openapi()]);
  } catch (err) {
    errorPage(view, "The Kiln API is not answering", err.message);
    return;
  }
  const features = {
    // Download links only where the API serves artifact files (feature-detected, not assumed).
    artifactDownload: Object.keys(openapi.paths).some((p) => ARTIFACT_FILE.test(p)),
  };
  const app = {config, openapi, features, view, user: null, access: null, live: null, cleanup: () => {},
    unpill: () => {}};
  window.kiln = {features};
  window.addEventListener("hashchange", () => app.user && app.live && route(app));
  document.getElementById("sign-out").addEventListener("click", () => signOut(app));
  if (config.auth === "off") {
    await start(app, async () => ({user: await api.me(), csrf_token: null}));
    return;
  }
  try {
    const session = await api.session();
    await start(app, () => session);
  } catch (err) {
    if (err.status === 401) showSignIn(app, "", failed);
    else errorPage(view, "The Kiln API is not answering", err.message);
  }
}

boot();
