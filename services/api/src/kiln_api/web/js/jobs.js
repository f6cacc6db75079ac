// The jobs list: live status, progress and best metric per job, a status filter, selection for comparing.

import {CANCEL} from "./access.js";
import {api} from "./api.js";
import {ACTIVE, ago, clock, debounce, duration, fill, h, num, primaryMetric, runSeconds, shortMetric, shortPath,
  statusChip, statusWins, toast} from "./dom.js";

const FILTERS = [["all", "All"], ["active", "Active"], ["running", "Running"], ["queued", "Queued"],
  ["completed", "Completed"], ["failed", "Failed"], ["cancelled", "Cancelled"], ["lost", "Lost"]];
const LIMIT = 200;
const MAX_PROJECTS = 100;  // what one ticket (and one notifier socket) may name

export function jobsView(root, {live, params, navigate, access}) {
  const filter = FILTERS.some(([f]) => f === params.get("status")) ? params.get("status") : "all";
  const jobs = new Map();
  const best = new Map();
  const selected = new Set((params.get("selected") || "").split(",").filter(Boolean));
  const armed = new Set();
  let closed = false;
  const subs = new Map();
  const tbody = h("tbody");
  const compareButton = h("button", {class: "btn", type: "button", disabled: true, onclick: () =>
    navigate(`#/compare?ids=${[...selected].map(encodeURIComponent).join(",")}`)}, "Compare");
  const empty = h("div", {class: "empty", hidden: true});

  fill(root, h("div", {class: "jobs-page"},
    h("header", {class: "page-head"}, h("h1", {}, "Jobs"),
      h("div", {class: "actions"}, compareButton, h("a", {class: "btn btn-primary", href: "#/new"}, "New job"))),
    h("nav", {class: "filters", "aria-label": "Filter by status"}, FILTERS.map(([f, label]) =>
      h("a", {class: `filter${f === filter ? " active" : ""}`, href: f === "all" ? "#/jobs" : `#/jobs?status=${f}`,
        dataset: {filter: f}, "aria-current": f === filter ? "page" : null}, label))),
    h("div", {class: "card table-card"}, h("table", {class: "list jobs"},
      h("thead", {}, h("tr", {}, h("th", {class: "sel"}, ""), ["Name", "Model", "Dataset", "Status", "Progress",
        "Best", "Started", "Duration", ""].map((t) => h("th", {}, t)))), tbody), empty)));

  const shown = () => [...jobs.values()].filter((j) =>
    filter === "all" || (filter === "active" ? ACTIVE.has(j.status) : j.status === filter));

  let frame = 0;
  const render = () => {
    frame ||= requestAnimationFrame(() => {
      frame = 0;
      const rows = shown();
      fill(tbody, rows.map(row));
      empty.hidden = rows.length > 0;
      fill(empty, jobs.size || filter !== "all" ? "No jobs match this filter." : h("span", {},
        "No jobs yet. ", h("a", {href: "#/new"}, "Start one.")));
      compareButton.disabled = selected.size === 0;
      compareButton.textContent = selected.size ? `Compare (${selected.size})` : "Compare";
    });
  };

  function row(j) {
    const b = best.get(j.id);
    const pct = j.epochs ? Math.min(100, (100 * (j.status === "completed" ? j.epochs : j.epoch || 0)) / j.epochs) : 0;
    return h("tr", {dataset: {jobId: j.id, status: j.status}},
      h("td", {class: "sel"}, h("input", {type: "checkbox", checked: selected.has(j.id), "aria-label": "compare",
        onchange: (e) => { e.target.checked ? selected.add(j.id) : selected.delete(j.id); render(); }})),
      h("td", {}, h("a", {href: `#/jobs/${encodeURIComponent(j.id)}`, class: "job-link"}, j.name || j.id),
        h("div", {class: "muted small mono"}, j.id.slice(0, 12))),
      h("td", {class: "mono small"}, j.spec?.model),
      h("td", {class: "small", title: j.spec?.dataset}, shortPath(j.spec?.dataset)),
      h("td", {}, statusChip(j.status), j.reason && !ACTIVE.has(j.status) && j.status !== "completed"
        ? h("div", {class: "small muted reason", title: j.reason}, j.reason) : null),
      h("td", {class: "progress-cell"}, j.epochs ? h("div", {}, h("span", {class: "small"},
        `${j.epoch || 0}/${j.epochs}`), h("div", {class: `bar bar-mini st-${j.status}`},
        h("div", {class: "bar-fill", style: `width:${pct}%`}))) : h("span", {class: "muted"}, "–")),
      h("td", {title: b ? b.key : ""},
        b ? h("span", {}, num(b.value), h("span", {class: "muted small"}, ` ${b.label}`)) : "–"),
      h("td", {title: clock(j.started_at)}, ago(j.started_at)),
      h("td", {dataset: {duration: j.id}}, duration(runSeconds(j))),
      h("td", {class: "row-actions"}, ACTIVE.has(j.status) && access.may(CANCEL, j.project) ? h("button", {class: "btn btn-small btn-danger",
        type: "button", onclick: () => cancel(j.id)}, armed.has(j.id) ? "Confirm" : "Cancel") : null));
  }

  async function cancel(id) {
    if (!armed.has(id)) {
      armed.add(id);
      render();
      setTimeout(() => { armed.delete(id); render(); }, 4000);
      return;
    }
    armed.delete(id);
    try {
      const job = await api.cancel(id);
      merge(job);
      toast("Cancel requested");
    } catch (err) {
      toast(err.message, "error");
    }
  }

  function merge(j) {
    const old = jobs.get(j.id);
    if (old && old.status !== j.status && !statusWins(old.status, old.attempt, j.status, j.attempt)) {
      j = {...j, status: old.status, attempt: old.attempt, reason: old.reason};
    }
    jobs.set(j.id, {...old, ...j});
    render();
  }

  const reload = debounce(async () => {
    try {
      const list = await api.jobs({limit: LIMIT, status: ["all", "active"].includes(filter) ? null : filter});
      if (closed) return;
      const fresh = new Set(list.map((j) => j.id));
      for (const id of jobs.keys()) if (!fresh.has(id)) jobs.delete(id);
      // Keep the server's order (newest first) while merging in what the socket already told us.
      const merged = new Map();
      for (const j of list) { merge(j); merged.set(j.id, jobs.get(j.id)); }
      jobs.clear();
      for (const [id, j] of merged) jobs.set(id, j);
      follow(new Set([...list.map((j) => j.project), ...access.projects()]));
      fetchBest(list);
      render();
    } catch (err) {
      toast(err.message, "error");
    }
  }, 150);

  // Every project this user may read: a job created in any of them appears without a reload.
  function follow(projects) {
    for (const p of projects) {
      if (subs.size >= MAX_PROJECTS) break;
      if (!subs.has(p)) subs.set(p, live.subscribe({project: p}, {event: onEvent, ready: () => reload()}));
    }
  }

  function onEvent(ev) {
    const j = jobs.get(ev.job_id);
    if (!j) { reload(); return; }  // a job this list has not seen yet
    const d = ev.data;
    if (d.kind === "status" || d.kind === "finished") {
      if (statusWins(j.status, j.attempt, d.status, ev.attempt)) {
        Object.assign(j, {status: d.status, attempt: ev.attempt, reason: d.reason});
        if (d.status === "running" && !j.started_at) j.started_at = ev.time;
        if (d.kind === "finished") j.finished_at = ev.time;
      }
    } else if (d.kind === "epoch") {
      Object.assign(j, {epoch: Math.max(j.epoch || 0, d.epoch), epochs: d.epochs});
      const key = primaryMetric(j.spec?.task);
      const v = d.metrics[key] ?? d.metrics.fitness;
      const k = d.metrics[key] !== undefined ? key : "fitness";
      const b = best.get(j.id);
      if (v !== undefined && (!b || v > b.value)) best.set(j.id, {key: k, label: shortMetric(k), value: v});
    } else if (d.kind === "progress") {
      j.epochs = d.epochs;
    } else {
      return;
    }
    render();
  }

  // The list endpoint has no metric column: ask for each job's primary metric, a few requests at a time,
  // once for ended jobs (their best no longer changes).
  const fetched = new Set();
  async function fetchBest(list) {
    const todo = list.filter((j) => j.epoch && !(fetched.has(j.id) && !ACTIVE.has(j.status)));
    const worker = async () => {
      for (let j = todo.shift(); j; j = todo.shift()) {
        fetched.add(j.id);
        const key = primaryMetric(j.spec?.task);
        if (closed) return;
        const series = await api.metrics(j.id, {keys: [key, "fitness"], kind: "epoch"}).catch(() => ({}));
        const k = series[key] ? key : "fitness";
        const values = (series[k]?.values || []).filter((v) => v !== null);
        if (values.length) best.set(j.id, {key: k, label: shortMetric(k), value: Math.max(...values)});
        render();
      }
    };
    await Promise.all([worker(), worker(), worker()]);
  }

  const ticker = setInterval(() => {
    for (const cell of tbody.querySelectorAll("[data-duration]")) {
      const j = jobs.get(cell.dataset.duration);
      if (j && ACTIVE.has(j.status)) cell.textContent = duration(runSeconds(j));
    }
  }, 1000);
  const onVisible = () => document.visibilityState === "visible" && reload();
  document.addEventListener("visibilitychange", onVisible);

  follow(new Set(access.projects()));
  reload();

  return () => {
    closed = true;
    for (const unsub of subs.values()) unsub();
    clearInterval(ticker);
    cancelAnimationFrame(frame);
    reload.cancel();
    document.removeEventListener("visibilitychange", onVisible);
  };
}
