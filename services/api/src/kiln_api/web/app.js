// Kiln web page: hash routes (#/jobs, #/jobs/<id>, #/new, #/compare), one shared live connection.

import {api} from "./js/api.js";
import {compareView} from "./js/compare.js";
import {fill, h} from "./js/dom.js";
import {formView} from "./js/form.js";
import {jobView} from "./js/job.js";
import {jobsView} from "./js/jobs.js";
import {Live} from "./js/live.js";

const ARTIFACT_FILE = /^\/api\/v1\/jobs\/\{[^}]+\}\/artifacts\/\{[^}]+\}$/;
const LOOPBACK = new Set(["127.0.0.1", "localhost", "0.0.0.0", "::1", "[::1]"]);

/** The notifier's URL as the API reports it; a loopback host means "the machine serving this page". */
export function notifierUrl(configured, here = window.location) {
  const url = new URL(configured);
  if (LOOPBACK.has(url.hostname) && !LOOPBACK.has(here.hostname)) url.hostname = here.hostname;
  if (here.protocol === "https:" && url.protocol === "ws:") url.protocol = "wss:";
  return url.toString().replace(/\/$/, "");
}

function connectionPill(live) {
  const pill = document.getElementById("conn");
  const text = {connecting: "connecting…", live: "live", reconnecting: "reconnecting…"};
  const show = ({state, detail}) => {
    pill.dataset.state = state;
    pill.textContent = text[state] + (detail && state !== "live" ? ` (${detail})` : "");
    pill.title = `Live events from ${live.url}` + (state === "live" ? "" : "; click to retry now");
  };
  live.addEventListener("state", (e) => show(e.detail));
  pill.addEventListener("click", () => live.state !== "live" && live.reconnect());
  show({state: live.state, detail: ""});
}

async function boot() {
  const view = document.getElementById("view");
  let config;
  let openapi;
  try {
    [config, openapi] = await Promise.all([api.config(), api.openapi()]);
  } catch (err) {
    fill(view, h("div", {class: "card error-page"},
      h("h2", {}, "The Kiln API is not answering"), h("p", {}, err.message)));
    return;
  }
  const live = new Live(notifierUrl(config.notifier_url));
  const features = {
    // Download links only where the API serves artifact files (feature-detected, not assumed).
    artifactDownload: Object.keys(openapi.paths).some((p) => ARTIFACT_FILE.test(p)),
  };
  window.kiln = {live, features};
  connectionPill(live);
  live.connect();

  const navigate = (hash) => { window.location.hash = hash; };
  let cleanup = () => {};

  const route = () => {
    const [path, query] = window.location.hash.replace(/^#/, "").split("?");
    const params = new URLSearchParams(query || "");
    const [page, id] = path.split("/").filter(Boolean);
    cleanup();
    view.replaceChildren();
    window.scrollTo(0, 0);
    const ctx = {live, params, navigate, features, openapi};
    let section = "jobs";
    if (page === "jobs" && id) {
      cleanup = jobView(view, {...ctx, id: decodeURIComponent(id)});
      document.title = `Job ${decodeURIComponent(id).slice(0, 12)} · Kiln`;
    } else if (page === "new") {
      section = "new";
      cleanup = formView(view, ctx);
      document.title = "New job · Kiln";
    } else if (page === "compare") {
      section = "compare";
      cleanup = compareView(view, ctx);
      document.title = "Compare · Kiln";
    } else {
      cleanup = jobsView(view, ctx);
      document.title = "Jobs · Kiln";
    }
    for (const a of document.querySelectorAll("nav.main a")) {
      a.classList.toggle("active", a.dataset.section === section);
    }
  };
  window.addEventListener("hashchange", route);
  route();
}

boot();
