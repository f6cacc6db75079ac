// The job page: live charts, progress, log tail, timeline, reproducibility record, artifacts; cancel / re-run.
//
// It subscribes to the job on the shared socket *before* reading the REST API, so nothing falls between the
// two: the socket replays the job's history and then follows it live, the REST answers fill in whatever the
// streams no longer hold, and every merge is idempotent (metrics by step, logs by line, status by rank).

import {CANCEL, CREATE, RERUN, START} from "./access.js";
import {api} from "./api.js";
import {GROUPS, LiveChart, MetricStore, groupOf, metricStyle} from "./charts.js";
import {ACTIVE, clock, debounce, duration, fill, h, num, primaryMetric, runSeconds, statusChip, statusWins, toast}
  from "./dom.js";
import {artifactsPanel, bestOf, failurePanel, progressPanel, recordPanel, timelinePanel, valuesPanel}
  from "./jobparts.js";
import {LogTail} from "./logtail.js";

export function jobView(root, {id, live, features, navigate, access, showProject}) {
  const s = {job: null, progress: null, lastLogs: null, timeline: [], artifacts: [], epochs: new MetricStore(),
    steps: new MetricStore(), charts: new Map(), buffered: [], cancelArmed: false};
  const logs = new LogTail();
  const slot = () => h("div", {class: "slot"});
  const parts = {head: slot(), progress: slot(), failure: slot(), timeline: slot(), record: slot(),
    artifacts: slot(), values: slot()};
  const charts = h("div", {class: "charts"});
  const waiting = h("p", {class: "muted charts-empty"}, "Charts appear with the first reported epoch.");
  fill(root, h("div", {class: "job-page", dataset: {jobId: id}},
    parts.head, parts.progress, parts.failure, waiting, charts,
    h("div", {class: "job-columns"}, logs.el,
      h("div", {class: "side"}, parts.timeline, parts.values, parts.artifacts, parts.record))));
  let closed = false;

  const dirty = new Set();
  let frame = 0;
  const render = (...names) => {
    names.forEach((n) => dirty.add(n));
    frame ||= requestAnimationFrame(() => {
      frame = 0;
      if (!s.job) return;
      for (const n of dirty) RENDER[n]();
      dirty.clear();
    });
  };
  const RENDER = {
    head: () => fill(parts.head, header()),
    progress: () => fill(parts.progress, progressPanel(s.job, s.progress)),
    failure: () => fill(parts.failure, failurePanel(s.job, s.lastLogs)),
    timeline: () => fill(parts.timeline, timelinePanel(s.timeline)),
    record: () => fill(parts.record, recordPanel(s.job)),
    artifacts: () => fill(parts.artifacts, artifactsPanel(id, s.artifacts, features.artifactDownload)),
    charts: drawCharts,
    values: () => fill(parts.values, valuesPanel(s.steps, singles())),
  };
  const ALL = Object.keys(RENDER);

  function header() {
    const job = s.job;
    const best = bestOf(s.epochs, primaryMetric(job.spec?.task)) || bestOf(s.epochs, "fitness");
    const active = ACTIVE.has(job.status);
    const button = (label, onclick, cls = "") => h("button", {class: `btn ${cls}`, type: "button", onclick}, label);
    const may = (operation) => access.may(operation, job.project);
    return h("header", {class: "job-head"},
      h("div", {class: "job-title"},
        h("h1", {}, job.name || job.id), statusChip(job.status),
        job.attempt > 1 ? h("span", {class: "muted"}, `attempt ${job.attempt}`) : null,
        job.name ? h("span", {class: "muted mono small", title: "job id"}, job.id) : null,
        h("div", {class: "actions"},
          job.status === "created" && may(START) ? button("Start", () => act(api.start(id)), "btn-primary") : null,
          active && may(CANCEL) ? button(s.cancelArmed ? "Confirm cancel" : "Cancel", cancel, "btn-danger") : null,
          may(RERUN) ? button("Re-run", rerun) : null,
          access.allowing(CREATE).length ? button("Edit as new", () => navigate(`#/new?from=${encodeURIComponent(id)}`))
            : null,
          button("Compare", () => navigate(`#/compare?ids=${encodeURIComponent(id)}`)),
          may(CANCEL) ? null : h("span", {class: "view-only", title: access.why(CANCEL, job.project)}, "view only"))),
      h("dl", {class: "meta"},
        meta("Project", job.project),
        meta("Model", job.spec?.model), meta("Dataset", h("span", {title: job.spec?.dataset}, job.spec?.dataset)),
        meta("Created", clock(job.created_at)), meta("Started", clock(job.started_at)),
        meta("Duration", h("span", {dataset: {tick: "duration"}}, duration(runSeconds(job)))),
        meta(best ? `Best ${best.label}` : "Best", best ? num(best.value) : "–")));
  }

  function meta(label, value) {
    return h("div", {}, h("dt", {}, label), h("dd", {}, value ?? "–"));
  }

  async function act(promise, message) {
    try {
      const job = await promise;
      if (message) toast(message);
      return job;
    } catch (err) {
      toast(err.message, "error");
      return null;
    }
  }

  async function cancel() {
    if (!s.cancelArmed) {  // two clicks: cancelling kills a training, an accidental click should not
      s.cancelArmed = true;
      render("head");
      setTimeout(() => { s.cancelArmed = false; render("head"); }, 4000);
      return;
    }
    s.cancelArmed = false;
    const job = await act(api.cancel(id), "Cancel requested");
    if (job) mergeDetail(job);
  }

  async function rerun() {
    const job = await act(api.rerun(id));
    if (job) navigate(`#/jobs/${encodeURIComponent(job.id)}`);
  }

  // -- state changes ----------------------------------------------------------------------------------------------

  function setStatus(status, attempt, reason, time) {
    const job = s.job;
    if (statusWins(job.status, job.attempt, status, attempt)) {
      Object.assign(job, {status, attempt});
      if (reason !== undefined) job.reason = reason;
      if (status === "running" && !job.started_at) job.started_at = time;
      if (!ACTIVE.has(status) && !job.finished_at) job.finished_at = time;
    }
    if (!s.timeline.some((t) => t.status === status && t.attempt === attempt)) {
      s.timeline.push({time, status, attempt, reason});
      s.timeline.sort((a, b) => Date.parse(a.time) - Date.parse(b.time));
    }
    render("head", "progress", "failure", "timeline", "charts");
  }

  function mergeDetail(detail) {
    const prev = s.job || {};
    const next = {...prev};
    for (const [k, v] of Object.entries(detail)) if (v !== null && v !== undefined) next[k] = v;
    // The REST read may lag the socket (the writer projects events asynchronously): the later status stays.
    if (prev.status && prev.status !== detail.status &&
        !statusWins(prev.status, prev.attempt, detail.status, detail.attempt)) {
      Object.assign(next, {status: prev.status, attempt: prev.attempt, reason: prev.reason});
    }
    next.epoch = Math.max(detail.epoch || 0, prev.epoch || 0) || detail.epoch;
    s.job = next;
    for (const t of detail.timeline || []) {
      if (!s.timeline.some((x) => x.status === t.status && x.attempt === t.attempt)) s.timeline.push(t);
    }
    s.timeline.sort((a, b) => Date.parse(a.time) - Date.parse(b.time));
    for (const a of detail.artifacts || []) addArtifact({...a, id: a.event_id});
    render(...ALL);
  }

  function addArtifact(a) {
    if (a.id && s.artifacts.some((x) => x.id === a.id)) return;
    s.artifacts.push(a);
    render("artifacts");
  }

  const refetch = debounce(async () => {
    const detail = await api.job(id).catch(() => null);
    if (detail) mergeDetail(detail);
  }, 800);

  function apply(ev) {
    const d = ev.data;
    switch (d.kind) {
      case "status":
        Object.assign(s.job, d.runner ? {runner: d.runner, host: d.host} : {});
        if (d.details && Object.keys(d.details).length) s.job.details = {...(s.job.details || {}), ...d.details};
        setStatus(d.status, ev.attempt, d.reason, ev.time);
        render("record");
        break;
      case "epoch":
        for (const [k, v] of Object.entries(d.metrics)) s.epochs.set(k, d.epoch, v);
        if (d.epoch_time !== null && d.epoch_time !== undefined && !d.metrics["time/epoch"]) {
          s.epochs.set("time/epoch", d.epoch, d.epoch_time);
        }
        s.job.epoch = Math.max(s.job.epoch || 0, d.epoch);
        s.job.epochs = d.epochs;
        render("charts", "head", "progress");
        break;
      case "metrics":
        for (const [k, v] of Object.entries(d.metrics)) s.steps.set(k, d.step, v);
        render("charts", "values");
        break;
      case "progress": {
        // The ETA counts down locally from the event's time; a replayed one is already in the past.
        const hasEta = d.eta_s !== null && d.eta_s !== undefined;
        s.progress = {...d, etaAt: hasEta ? Date.parse(ev.time) + d.eta_s * 1000 : null};
        s.job.epochs = d.epochs;
        render("progress");
        break;
      }
      case "artifact":
        addArtifact({...d, id: ev.id, attempt: ev.attempt, time: ev.time});
        break;
      case "finished":
        Object.assign(s.job, {exit_code: d.exit_code, exit_class: d.exit_class});
        s.lastLogs = d.last_logs;
        setStatus(d.status, ev.attempt, d.reason, ev.time);
        refetch();  // the authoritative record (artifacts, timings) once the writer has it
        break;
      case "log":
        logs.add(d.lines);
        break;
      default:
        break;
    }
  }

  // -- charts -----------------------------------------------------------------------------------------------------

  // Metrics the SDK logged: a key with several steps is a curve; one with a single value (final results,
  // model size) reads better as a number.
  const curves = () => s.steps.keys().filter((k) => s.steps.steps(k) > 1);
  const singles = () => s.steps.keys().filter((k) => s.steps.steps(k) === 1);

  function drawCharts() {
    const planned = () => s.job?.epochs || s.job?.spec?.train?.epochs || 0;
    const wanted = [];
    for (const g of GROUPS) {
      const keys = () => s.epochs.keys().filter((k) => groupOf(k) === g.id);
      if (keys().length) wanted.push({id: g.id, title: g.title, keys, store: s.epochs, xMax: planned});
    }
    if (curves().length) {
      wanted.push({id: "steps", title: "Logged metrics (by step)", keys: curves, store: s.steps, xLabel: "step"});
    }
    for (const w of wanted) {
      let chart = s.charts.get(w.id);
      if (!chart) {
        chart = new LiveChart({id: w.id, title: w.title, xLabel: w.xLabel, xMax: w.xMax,
          series: () => w.keys().map((k, i) => ({label: k, ...metricStyle(k, i)})),
          data: () => w.store.table(w.keys())});
        s.charts.set(w.id, chart);
        const order = [...GROUPS.map((g) => g.id), "steps"];
        const next = [...charts.children].find((el) => order.indexOf(el.dataset.chart) > order.indexOf(w.id));
        charts.insertBefore(chart.el, next || null);
      }
      chart.refresh();
    }
    waiting.hidden = wanted.length > 0;
    waiting.textContent = ACTIVE.has(s.job.status) ? "Charts appear with the first reported epoch."
      : "This job reported no metrics.";
  }

  // -- wiring -----------------------------------------------------------------------------------------------------

  const unsubscribe = live.subscribe({job_id: id}, {
    event: (ev) => (s.job ? apply(ev) : s.buffered.push(ev)),
  });

  (async () => {
    try {
      const [detail, epochSeries, stepSeries, tail] = await Promise.all([
        api.job(id), api.metrics(id, {kind: "epoch"}), api.metrics(id, {kind: "metrics"}), api.logs(id, 500)]);
      if (closed) return;
      s.epochs.load(epochSeries);
      s.steps.load(stepSeries);
      logs.seed(tail);
      mergeDetail(detail);
      showProject(detail.project);
      for (const ev of s.buffered.splice(0)) apply(ev);
    } catch (err) {
      if (closed) return;
      // 404 also when the job is in a project of someone else's: the API does not tell the two apart, nor do we.
      fill(root, h("div", {class: "card error-page"},
        h("h2", {}, err.status === 404 ? "Job not found" : "Job not available"), h("p", {}, err.message),
        h("a", {href: "#/jobs"}, "Back to jobs")));
    }
  })();

  // Only the clocks tick; the header (with its buttons, maybe focused) is rebuilt on changes alone.
  const ticker = setInterval(() => {
    if (!s.job || !ACTIVE.has(s.job.status)) return;
    const el = parts.head.querySelector("[data-tick=duration]");
    if (el) el.textContent = duration(runSeconds(s.job));
    render("progress");
  }, 1000);

  return () => {
    closed = true;
    unsubscribe();
    clearInterval(ticker);
    refetch.cancel();
    cancelAnimationFrame(frame);
    for (const c of s.charts.values()) c.destroy();
  };
}
