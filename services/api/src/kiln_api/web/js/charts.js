// Live charts on uPlot (vendor/uplot, loaded as the global `uPlot`): metric stores, grouping, and a chart that
// redraws at most once per animation frame however fast points arrive.

import {h, num} from "./dom.js";

const SI = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];

/** Axis ticks: short whatever the magnitude (3.01M, 12k, 0.0015, 2.5e-5). */
export function tick(v) {
  const a = Math.abs(v);
  if (a < 1e4) return num(v, 3);
  const [scale, suffix] = SI.find(([s]) => a >= s);
  return `${Number((v / scale).toPrecision(3))}${suffix}`;
}

export const PALETTE = ["#4f8cff", "#f5a524", "#17c964", "#f31260", "#9353d3", "#06b7db", "#ff7a45", "#8a94a6"];

/** Metric groups of the job page, in display order; a key goes to the first group that matches. */
export const GROUPS = [
  {id: "loss", title: "Losses", match: (k) => /loss/i.test(k)},
  {id: "val", title: "Validation metrics", match: (k) => k.startsWith("metrics/")},
  {id: "lr", title: "Learning rate", match: (k) => k.startsWith("lr/")},
  {id: "other", title: "Other", match: () => true},
];

export function groupOf(key) {
  return GROUPS.find((g) => g.match(key)).id;
}

/** Metric series of one job: key -> (step -> value); setting a point twice keeps the last value. */
export class MetricStore {
  constructor() {
    this.series = new Map();
  }

  set(key, step, value) {
    if (!this.series.has(key)) this.series.set(key, new Map());
    this.series.get(key).set(step, value);
  }

  /** Load the REST shape {key: {steps, values}}. */
  load(series) {
    for (const [key, s] of Object.entries(series || {})) s.steps.forEach((step, i) => this.set(key, step, s.values[i]));
  }

  keys() {
    return [...this.series.keys()].sort();
  }

  steps(key) {
    return this.series.get(key)?.size || 0;
  }

  values(key) {
    return [...(this.series.get(key)?.values() || [])].filter((v) => v !== null && v !== undefined);
  }

  /** uPlot's aligned table for `keys`: [xs, ys1, ys2, ...] with null where a series has no point. */
  table(keys) {
    const xs = [...new Set(keys.flatMap((k) => [...(this.series.get(k)?.keys() || [])]))].sort((a, b) => a - b);
    return [xs, ...keys.map((k) => xs.map((x) => this.series.get(k)?.get(x) ?? null))];
  }
}

const LOSS_COLOURS = {box: PALETTE[0], cls: PALETTE[1], dfl: PALETTE[2], seg: PALETTE[4], pose: PALETTE[5],
  kobj: PALETTE[6], angle: PALETTE[3]};

/** Colour and dash of one metric: losses share a colour per loss type, validation ones dashed. */
export function metricStyle(key, index) {
  const part = key.split("/").pop().replace(/_loss$/, "");
  const stroke = (groupOf(key) === "loss" && LOSS_COLOURS[part]) || PALETTE[index % PALETTE.length];
  return {stroke, dash: key.startsWith("val/") ? [6, 4] : undefined};
}

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** A titled card with one uPlot chart.
 *
 * spec.series() -> [{label, stroke, dash}] and spec.data() -> [xs, ...ys] in the same order; spec.xMax()
 * (optional) stretches the x axis to the planned end, so a live chart fills up from the left.
 */
export class LiveChart {
  constructor(spec) {
    this.spec = spec;
    this.plot = null;
    this.signature = "";
    this.pending = false;
    this.body = h("div", {class: "chart-body"});
    this.el = h("section", {class: "card chart", dataset: {chart: spec.id, points: "0"}},
      h("h3", {}, spec.title), this.body);
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resize.observe(this.body);
  }

  size() {
    return {width: Math.max(200, this.body.clientWidth), height: this.spec.height || 200};
  }

  /** Redraw on the next animation frame (many events in one frame draw once). */
  refresh() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const series = this.spec.series();
    const data = this.spec.data();
    const signature = JSON.stringify(series.map((s) => s.label));
    if (signature !== this.signature || !this.plot) this.build(series, data, signature);
    else this.plot.setData(data);
    this.showLatest();
    this.el.dataset.points = String(data[0].length);
    this.el.dataset.series = String(series.length);
  }

  /** Outside a hover, the legend shows each series' latest value rather than dashes. */
  showLatest() {
    const u = this.plot;
    if (u && (u.cursor.idx === null || u.cursor.idx === undefined) && u.data[0].length) {
      u.setLegend({idx: u.data[0].length - 1});
    }
  }

  build(series, data, signature) {
    this.plot?.destroy();
    this.signature = signature;
    const fg = css("--muted") || "#888";
    const grid = css("--grid") || "rgba(128,128,128,.15)";
    const axis = {stroke: fg, grid: {stroke: grid, width: 1}, ticks: {stroke: grid, width: 1}, font: "11px system-ui"};
    const xMax = this.spec.xMax;
    this.plot = new uPlot({
      ...this.size(),
      scales: {
        x: {time: false, range: (u, lo, hi) => [Math.min(lo ?? 1, 1), Math.max(hi ?? 1, xMax ? xMax() : 0, 2)]},
      },
      axes: [
        {...axis, label: this.spec.xLabel || "epoch", labelSize: 18, labelFont: "11px system-ui",
          incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000],
          values: (u, splits) => splits.map((v) => String(v))},
        {...axis, size: 58, values: (u, splits) => splits.map(tick)},
      ],
      series: [
        {label: this.spec.xLabel || "epoch"},
        ...series.map((s) => ({label: s.label, stroke: s.stroke, dash: s.dash, width: 2, spanGaps: true,
          points: {size: 6, fill: s.stroke}, value: (u, v) => num(v)})),
      ],
      legend: {live: true},
      cursor: {drag: {x: true, y: false}},
      hooks: {setCursor: [() => this.showLatest()]},
    }, data, this.body);
  }

  destroy() {
    this.resize.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }
}
