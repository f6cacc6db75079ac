// DOM building, formatting and job-status helpers shared by every view.

/** Build an element: h("a", {href: "#/", class: "x", onclick: fn}, "text", child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// -- job status -----------------------------------------------------------------------------------------------------

export const STATUSES = ["created", "queued", "starting", "running", "completed", "failed", "cancelled", "lost"];
export const ACTIVE = new Set(["created", "queued", "starting", "running"]);
const RANK = Object.fromEntries(STATUSES.map((s, i) => [s, i]));

/** Same rule as kiln_contracts.status_wins: terminal sticks, newer attempt wins, lifecycle only moves forward. */
export function statusWins(current, currentAttempt, next, nextAttempt) {
  if (!current) return true;
  if (!ACTIVE.has(current)) return false;
  if (nextAttempt !== currentAttempt) return nextAttempt > currentAttempt;
  return RANK[next] > RANK[current];
}

export function statusChip(status) {
  return h("span", {class: `chip st-${status}`, dataset: {status}}, status);
}

// -- formatting -----------------------------------------------------------------------------------------------------

export function num(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a < 0.001) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

export function ago(iso) {
  if (!iso) return "–";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export function clock(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** Last two path segments: enough to recognise a dataset without the long prefix. */
export function shortPath(path) {
  if (!path) return "";
  const parts = String(path).split("/").filter(Boolean);
  return parts.length <= 2 ? path : `…/${parts.slice(-2).join("/")}`;
}

/** Seconds a job has run: until it finished, or until now while it runs. */
export function runSeconds(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : (ACTIVE.has(job.status) ? Date.now() : null);
  return end === null ? null : (end - Date.parse(job.started_at)) / 1000;
}

// -- metrics --------------------------------------------------------------------------------------------------------

const PRIMARY = {
  detect: "metrics/mAP50-95(B)", obb: "metrics/mAP50-95(B)", segment: "metrics/mAP50-95(M)",
  pose: "metrics/mAP50-95(P)", classify: "metrics/accuracy_top1",
};

/** The metric that ranks a job's epochs (higher is better), by task; fitness when the task's own one is missing. */
export function primaryMetric(task) {
  return PRIMARY[task] || PRIMARY.detect;
}

export function shortMetric(key) {
  return key.replace(/^metrics\//, "").replace(/_top1$/, " top1");
}

/** Debounce: run `fn` once, `ms` after the last call. */
export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

// Colour and cursor codes of terminal output (ESC [ ... letter) mean nothing in a web page: every place that shows
// log text goes through logText.
const ANSI = /\x1b\[[0-9;?]*[A-Za-z]/g;

/** A log line as the page shows it: without terminal control sequences. */
export function logText(text) {
  return (text || "").replace(ANSI, "");
}

let toastHost = null;

/** A short message at the bottom of the page; `kind` is "error" or "info". */
export function toast(text, kind = "info") {
  toastHost ??= document.getElementById("toasts");
  const el = h("div", {class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status"}, text);
  toastHost.append(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
}
