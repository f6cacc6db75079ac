// Compare: one metric of several jobs overlaid on one chart, live while any of them trains.

import {api} from "./api.js";
import {LiveChart, MetricStore, PALETTE} from "./charts.js";
import {fill, h, num, primaryMetric, shortPath, statusChip, statusWins, toast} from "./dom.js";

export function compareView(root, {params, live}) {
  const chosen = new Set((params.get("ids") || "").split(",").filter(Boolean));
  const jobs = new Map();     // id -> job (every recent job, for the picker)
  const stores = new Map();   // id -> MetricStore of its per-epoch metrics
  const subs = new Map();
  let metric = params.get("metric") || "";
  let closed = false;

  const picker = h("div", {class: "picker"});
  const select = h("select", {id: "compare-metric", "aria-label": "Metric",
    onchange: () => { metric = select.value; sync(); }});
  const summary = h("tbody");
  const label = (id) => jobs.get(id)?.name || id.slice(0, 12);
  const order = () => [...chosen].filter((id) => stores.has(id));
  const chart = new LiveChart({
    id: "compare", title: "Metric", height: 320,
    series: () => order().map((id) => ({label: `${label(id)} · ${id.slice(0, 6)}`, stroke: colour(id)})),
    data: () => (order().length ? uPlot.join(order().map((id) => stores.get(id).table([metric]))) : [[]]),
    xMax: () => Math.max(0, ...order().map((id) => jobs.get(id)?.epochs || 0)),
  });
  const colourOf = new Map();
  const colour = (id) => {
    if (!colourOf.has(id)) colourOf.set(id, PALETTE[colourOf.size % PALETTE.length]);
    return colourOf.get(id);
  };

  fill(root, h("div", {class: "compare-page"},
    h("header", {class: "page-head"}, h("h1", {}, "Compare"),
      h("label", {class: "inline"}, "Metric ", select)),
    h("div", {class: "compare-layout"},
      h("aside", {class: "card"}, h("h3", {}, "Jobs"), picker),
      h("div", {}, chart.el, h("div", {class: "card table-card"}, h("table", {class: "list"},
        h("thead", {}, h("tr", {}, ["Job", "Status", "Epochs", "Last", "Best"].map((t) => h("th", {}, t)))),
        summary))))));

  function sync() {
    const ids = [...chosen];
    const q = new URLSearchParams({ids: ids.join(",")});
    if (metric) q.set("metric", metric);
    history.replaceState(null, "", `#/compare?${q}`);
    const keys = [...new Set(order().flatMap((id) => stores.get(id).keys()))].sort();
    if (!metric || (!keys.includes(metric) && keys.length)) {
      const first = jobs.get(order()[0]);
      const preferred = first ? primaryMetric(first.spec?.task) : "";
      metric = keys.includes(preferred) ? preferred : keys.find((k) => k.startsWith("metrics/")) || keys[0] || "";
    }
    fill(select, keys.map((k) => h("option", {value: k, selected: k === metric}, k)));
    chart.el.querySelector("h3").textContent = metric || "Pick jobs to compare";
    const lowerIsBetter = /loss|time/.test(metric);
    fill(summary, order().map((id) => {
      const j = jobs.get(id);
      const values = stores.get(id).values(metric);
      const bestValue = values.length ? (lowerIsBetter ? Math.min(...values) : Math.max(...values)) : null;
      return h("tr", {dataset: {jobId: id}},
        h("td", {}, h("span", {class: "swatch", style: `background:${colour(id)}`}),
          h("a", {href: `#/jobs/${encodeURIComponent(id)}`}, label(id))),
        h("td", {}, statusChip(j.status)), h("td", {}, `${j.epoch || 0}/${j.epochs || j.spec?.train?.epochs || "?"}`),
        h("td", {}, num(values[values.length - 1])), h("td", {}, num(bestValue)));
    }));
    renderPicker();
    chart.refresh();
  }

  function renderPicker() {
    fill(picker, [...jobs.values()].map((j) => h("label", {class: "pick", dataset: {jobId: j.id}},
      h("input", {type: "checkbox", checked: chosen.has(j.id), onchange: (e) => toggle(j.id, e.target.checked)}),
      h("span", {class: "swatch", style: chosen.has(j.id) ? `background:${colour(j.id)}` : ""}),
      h("span", {class: "pick-name"}, j.name || j.id.slice(0, 12)),
      h("span", {class: "muted small"}, `${j.spec?.model || ""} · ${shortPath(j.spec?.dataset)}`),
      statusChip(j.status))));
  }

  async function toggle(id, on) {
    if (on) chosen.add(id); else chosen.delete(id);
    if (on) await load(id);
    sync();
  }

  async function load(id) {
    const job = jobs.get(id) || await api.job(id);
    if (closed) return;
    jobs.set(id, job);
    if (!subs.has(job.project)) subs.set(job.project, live.subscribe({project: job.project}, {event: onEvent}));
    const store = stores.get(id) || new MetricStore();
    store.load(await api.metrics(id, {kind: "epoch"}));
    if (!closed) stores.set(id, store);
  }

  function onEvent(ev) {
    const j = jobs.get(ev.job_id);
    if (!j || !chosen.has(ev.job_id)) return;
    const d = ev.data;
    if (d.kind === "epoch") {
      for (const [k, v] of Object.entries(d.metrics)) stores.get(ev.job_id)?.set(k, d.epoch, v);
      Object.assign(j, {epoch: Math.max(j.epoch || 0, d.epoch), epochs: d.epochs});
    } else if ((d.kind === "status" || d.kind === "finished")
        && statusWins(j.status, j.attempt, d.status, ev.attempt)) {
      Object.assign(j, {status: d.status, attempt: ev.attempt});
    } else {
      return;
    }
    sync();
  }

  (async () => {
    try {
      for (const j of await api.jobs({limit: 50})) jobs.set(j.id, j);
      await Promise.all([...chosen].map((id) => load(id).catch(() => chosen.delete(id))));
      if (!chosen.size) {  // nothing chosen yet: the two latest jobs that reported epochs
        for (const j of [...jobs.values()].filter((x) => x.epoch).slice(0, 2)) { chosen.add(j.id); await load(j.id); }
      }
    } catch (err) {
      toast(err.message, "error");
    }
    sync();
  })();

  return () => {
    closed = true;
    for (const unsub of subs.values()) unsub();
    chart.destroy();
  };
}
