// Pieces of the job page that are pure functions of the job's state: each returns fresh elements.

import {ACTIVE, bytes, clock, duration, h, logText, num, runSeconds, shortMetric, statusChip} from "./dom.js";

/** Overall progress (epochs) and the current epoch's batches, with speed and a locally ticking ETA. */
export function progressPanel(job, progress) {
  if (!ACTIVE.has(job.status) && !job.started_at && !job.epoch) return null;  // ended before it ever ran
  const epochs = job.epochs || progress?.epochs || job.spec?.train?.epochs || null;
  const active = ACTIVE.has(job.status);
  let epochDone = job.epoch || 0;
  let batchFrac = 0;
  if (active && progress && progress.batches) {
    epochDone = progress.epoch - 1;
    batchFrac = Math.min(1, progress.batch / progress.batches);
  }
  const overall = job.status === "completed" ? 1 : epochs ? Math.min(1, (epochDone + batchFrac) / epochs) : 0;
  const eta = active && progress?.etaAt ? (progress.etaAt - Date.now()) / 1000 : null;
  const current = active && progress ? progress.epoch : Math.max(job.epoch || 0, 0);
  const parts = [];
  if (active && !progress && !job.epoch) {
    parts.push(job.status === "running" ? "preparing (model, dataset checks)" : `waiting (${job.status})`);
  } else if (active && progress) {
    parts.push(`batch ${progress.batch}/${progress.batches}`);
    if (progress.images_per_s) parts.push(`${num(progress.images_per_s, 3)} img/s`);
    if (eta !== null && eta > 0) parts.push(`ETA ${duration(eta)}`);
  } else if (!active) {
    parts.push(`ran ${duration(runSeconds(job))}`);
  }
  return h("section", {class: "card progress", dataset: {epoch: String(current)}},
    h("div", {class: "progress-row"},
      h("span", {class: "progress-label"}, `Epoch ${current || 0}${epochs ? ` / ${epochs}` : ""}`),
      h("span", {class: "muted"}, parts.join(" · "))),
    bar(overall, `st-${job.status}`, "Overall progress"),
    active && progress ? bar(batchFrac, "bar-batch", "Batches of this epoch") : null);
}

function bar(fraction, cls, label) {
  const pct = Math.round(fraction * 1000) / 10;
  return h("div", {class: `bar ${cls}`, role: "progressbar", "aria-label": label, "aria-valuemin": "0",
    "aria-valuemax": "100", "aria-valuenow": String(pct)}, h("div", {class: "bar-fill", style: `width:${pct}%`}));
}

/** Why an attempt ended badly, with the trainer's last lines when the finished event carried them. */
export function failurePanel(job, lastLogs) {
  if (job.status === "completed" || ACTIVE.has(job.status)) return null;
  // A cancel is what someone asked for: its exit code and class say nothing more.
  const exit = job.status === "cancelled" ? "" : [
    job.exit_code !== null && job.exit_code !== undefined ? `exit code ${job.exit_code}` : null,
    job.exit_class].filter(Boolean).join(", ");
  return h("section", {class: `card failure failure-${job.status}`},
    h("strong", {}, job.status === "cancelled" ? "Cancelled" : job.status === "lost" ? "Lost" : "Failed"),
    job.reason ? h("span", {class: "failure-reason"}, `: ${job.reason}`) : null,
    exit ? h("span", {class: "muted"}, ` (${exit})`) : null,
    lastLogs && lastLogs.length ? h("pre", {class: "last-logs"}, lastLogs.map(logText).join("\n")) : null);
}

export function timelinePanel(timeline) {
  return h("section", {class: "card timeline"},
    h("h3", {}, "Timeline"),
    timeline.length ? h("ol", {class: "steps"}, timeline.map((t) => h("li", {dataset: {status: t.status}},
      h("span", {class: `dot st-${t.status}`}),
      h("div", {},
        h("div", {}, statusChip(t.status), t.attempt > 1 ? h("span", {class: "muted"}, ` attempt ${t.attempt}`) : null),
        h("div", {class: "muted small"}, clock(t.time)),
        t.reason ? h("div", {class: "small reason"}, t.reason) : null)))) : h("p", {class: "muted"}, "Not started."));
}

/** What reproduces the run: the exact spec that was submitted and the facts the runner recorded. */
export function recordPanel(job) {
  const spec = job.spec || {};
  const facts = Object.entries(job.details || {});
  const specRows = [["model", spec.model], ["dataset", spec.dataset], ["task", spec.task], ["pool", spec.pool],
    ["rerun of", job.rerun_of]];
  if (!job.details?.runner) specRows.push(["runner", [job.runner, job.host].filter(Boolean).join(" @ ") || null]);
  const train = Object.entries(spec.train || {});
  const copy = () => navigator.clipboard?.writeText(JSON.stringify(spec, null, 2));
  return h("section", {class: "card record"},
    h("header", {class: "card-head"}, h("h3", {}, "Reproducibility"),
      h("button", {class: "btn btn-small", type: "button", onclick: copy, title: "Copy the spec as JSON"},
        "Copy spec")),
    kvTable([...specRows, ...facts]),
    h("details", {}, h("summary", {}, `Training arguments (${train.length})`), kvTable(train)));
}

function kvTable(rows) {
  const shown = rows.filter(([, v]) => v !== null && v !== undefined && v !== "");
  return h("table", {class: "kv"}, h("tbody", {}, shown.map(([k, v]) =>
    h("tr", {}, h("th", {}, k), h("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v))))));
}

/** Files the job stored, newest version of each name first; older versions (per-epoch checkpoints) folded.
 *
 * A download link where the API serves artifact files, otherwise the stored URI to copy.
 */
export function artifactsPanel(jobId, artifacts, canDownload) {
  const newest = new Map();
  for (const a of artifacts) {
    const seen = newest.get(a.name);
    if (!seen || Date.parse(a.time) >= Date.parse(seen.time)) newest.set(a.name, a);
  }
  const latest = [...newest.values()];
  const older = artifacts.filter((a) => !latest.includes(a));
  const table = (rows) => h("table", {class: "list compact"},
    h("thead", {}, h("tr", {}, ["name", "epoch", "size", "sha256"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.map((a) => artifactRow(jobId, a, canDownload))));
  return h("section", {class: "card artifacts"},
    h("h3", {}, `Artifacts (${latest.length})`),
    latest.length ? table(latest) : h("p", {class: "muted"}, "None yet."),
    older.length ? h("details", {}, h("summary", {}, `Earlier versions (${older.length})`), table(older)) : null);
}

function artifactRow(jobId, a, canDownload) {
  const copy = () => navigator.clipboard?.writeText(a.uri);
  return h("tr", {dataset: {artifact: a.name}},
    h("td", {}, canDownload
      ? h("a", {href: `/api/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(a.name)}`,
        download: a.name, title: a.uri}, a.name)
      : h("span", {title: a.uri}, a.name, " ",
        h("button", {class: "btn btn-small link", type: "button", onclick: copy, title: `Copy ${a.uri}`},
          "copy path"))),
    h("td", {}, a.epoch ?? "–"), h("td", {}, bytes(a.size)),
    h("td", {class: "mono small", title: a.sha256}, (a.sha256 || "").slice(0, 12)));
}

/** Values the SDK logged once (final metrics, model size), as a table. */
export function valuesPanel(store, keys) {
  if (!keys.length) return null;
  return h("section", {class: "card values"}, h("h3", {}, "Logged values"),
    h("table", {class: "kv"}, h("tbody", {}, keys.map((k) => h("tr", {}, h("th", {}, k),
      h("td", {}, num(store.values(k)[0])))))));
}

/** Best value of the task's primary metric so far. */
export function bestOf(store, key) {
  const values = store.values(key);
  return values.length ? {key, label: shortMetric(key), value: Math.max(...values)} : null;
}
