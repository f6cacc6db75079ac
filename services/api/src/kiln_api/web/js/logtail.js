// A live log tail: seeded from the REST tail, extended by the notifier's log batches, auto-scrolling while the
// reader is at the bottom. The socket replays the job's log history, which overlaps the REST tail: a line
// older than the newest seeded one is history (in the tail already, or older than the tail shows); at that
// very instant a multiset of (stream, text) tells the seeded lines from new ones. Nothing shows twice. Lines
// are kept in time order, the API's order: the trainer's own log lines (through the SDK) and the output the runner
// captures come through different publishers, so a line may arrive after a later one from the other source.

import {h, logText} from "./dom.js";

const FOLLOW_SLACK_PX = 24;


/** Microseconds since the epoch from an ISO time (Date.parse stops at milliseconds; log lines come faster). */
export function micros(iso) {
  const fraction = /\.(\d+)/.exec(iso);
  const us = fraction ? Number((fraction[1] + "000000").slice(0, 6)) : 0;
  return Math.floor(Date.parse(iso) / 1000) * 1e6 + us;
}

export class LogTail {
  constructor(maxLines = 3000) {
    this.maxLines = maxLines;
    this.seededUntil = -Infinity;  // time of the newest seeded line
    this.atLast = new Map();        // (stream, text) -> how many seeded lines carry exactly that time
    this.count = 0;
    this.follow = true;
    this.lines = h("div", {class: "log-lines", role: "log", "aria-live": "off", tabindex: "0"});
    this.followButton = h("button", {class: "btn btn-small", type: "button", onclick: () => this.setFollow(true)},
      "Follow");
    this.el = h("section", {class: "card logs", dataset: {lines: "0"}},
      h("header", {class: "card-head"}, h("h3", {}, "Log"), this.followButton), this.lines);
    this.lines.addEventListener("scroll", () => {
      const atBottom = this.lines.scrollHeight - this.lines.scrollTop - this.lines.clientHeight < FOLLOW_SLACK_PX;
      if (atBottom !== this.follow) this.setFollow(atBottom, false);
    });
    this.setFollow(true, false);
  }

  setFollow(on, scroll = true) {
    this.follow = on;
    this.followButton.classList.toggle("active", on);
    this.followButton.textContent = on ? "Following" : "Follow";
    if (on && scroll) this.scroll();
  }

  /** Lines from GET /logs: {time, stream, text}, oldest first. */
  seed(rows) {
    const lines = [];
    for (const r of rows) {
      const t = micros(r.time);
      if (t > this.seededUntil) { this.seededUntil = t; this.atLast.clear(); }
      const key = `${r.stream}|${r.text}`;
      if (t === this.seededUntil) this.atLast.set(key, (this.atLast.get(key) || 0) + 1);
      lines.push([r.stream, r.text, t]);
    }
    this.append(lines);
  }

  /** Lines of one log batch event: {t, stream, text}. */
  add(lines) {
    const fresh = [];
    for (const l of lines) {
      const t = micros(l.t);
      if (t < this.seededUntil) continue;
      const key = `${l.stream}|${l.text}`;
      const left = t === this.seededUntil ? this.atLast.get(key) : 0;
      if (left) { this.atLast.set(key, left - 1); continue; }
      fresh.push([l.stream, l.text, t]);
    }
    this.append(fresh);
  }

  append(rows) {
    if (!rows.length) return;
    let frag = document.createDocumentFragment();
    let lastT = this.lines.lastElementChild ? Number(this.lines.lastElementChild.dataset.t) : -Infinity;
    for (const [stream, text, t] of rows) {
      const line = h("div", {class: `log-line log-${stream}`, dataset: {t: String(t)}},
        logText(text) || " ");
      if (!(t < lastT)) {  // the usual case: not older than anything shown (or no time)
        frag.append(line);
        lastT = t;
        continue;
      }
      this.lines.append(frag);  // keep what came before it in place, then insert this one where it belongs
      frag = document.createDocumentFragment();
      let next = this.lines.lastElementChild;
      while (next.previousElementSibling && Number(next.previousElementSibling.dataset.t) > t) {
        next = next.previousElementSibling;
      }
      this.lines.insertBefore(line, next);
    }
    this.lines.append(frag);
    this.count += rows.length;
    while (this.lines.childElementCount > this.maxLines) this.lines.firstElementChild.remove();
    this.el.dataset.lines = String(this.count);
    if (this.follow) this.scroll();
  }

  scroll() {
    requestAnimationFrame(() => { this.lines.scrollTop = this.lines.scrollHeight; });
  }
}
