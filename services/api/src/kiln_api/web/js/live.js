// One WebSocket to the notifier's multi-job endpoint, shared by every view.
//
// Each subscription (a job, or every job of a project) keeps a cursor: the last stream sequence it got per
// stream (events, logs). When the socket drops (network, notifier restart, or code 1013 when this client
// was too slow) it reconnects with backoff and subscribes again *after* those cursors, so the notifier's
// replay fills the gap exactly; anything at or below a cursor is dropped here, so nothing is applied twice.

const STATE_EVENT = "state";

export class Live extends EventTarget {
  constructor(url) {
    super();
    this.url = url.replace(/\/$/, "") + "/api/v1/ws";
    this.subs = new Map();
    this.closing = new Map(); // key -> unsubscribes not yet confirmed: messages of that key are the old one's
    this.state = "connecting";
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.connects = 0;
    this.duplicates = 0;
  }

  /** Follow one job (events and log batches, history first) or a project (events from now on).
   *
   * handlers.event(event, message) gets each new event; handlers.ready({resumed}) runs when the notifier
   * acknowledged the subscription: `resumed` is true when it continues from a cursor. A second listener of
   * a subscription that is already open gets its events from then on. Returns the function that releases it.
   */
  subscribe(target, handlers) {
    const key = target.job_id ? `job:${target.job_id}` : `project:${target.project}`;
    const existing = this.subs.get(key);
    if (existing) {
      existing.listeners.add(handlers);
      return () => this.release(key, handlers);
    }
    const sub = {key, target, cursor: {events: null, logs: null}, listeners: new Set([handlers])};
    this.subs.set(key, sub);
    this.send(this.op("subscribe", sub));
    return () => this.release(key, handlers);
  }

  release(key, handlers) {
    const sub = this.subs.get(key);
    if (!sub) return;
    sub.listeners.delete(handlers);
    if (sub.listeners.size) return;
    this.subs.delete(key);
    if (this.send({op: "unsubscribe", ...sub.target})) this.closing.set(key, (this.closing.get(key) || 0) + 1);
  }

  op(op, sub) {
    const msg = {op, ...sub.target};
    if (sub.cursor.events !== null) msg.after_events = sub.cursor.events;
    if (sub.target.job_id && sub.cursor.logs !== null) msg.after_logs = sub.cursor.logs;
    return msg;
  }

  connect() {
    clearTimeout(this.timer);
    this.setState(this.connects ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.closing.clear();
    ws.onopen = () => {
      this.connects += 1;
      this.setState("live");
      for (const sub of this.subs.values()) this.send(this.op("subscribe", sub));
    };
    ws.onmessage = (e) => this.receive(e.data);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      // 1013 after a working connection: we were too slow and the notifier dropped us; our cursors are exact,
      // so come back at once. Anything else, or again: back off (0.5 s doubling to 5 s, with jitter).
      const fast = e.code === 1013 && this.attempt === 0;
      const delay = fast ? 200 : Math.min(5000, 500 * 2 ** this.attempt) * (0.75 + Math.random() / 2);
      this.attempt += 1;
      this.setState("reconnecting", e.code === 1013 ? "catching up" : `retry in ${Math.round(delay / 1000)}s`);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  /** Drop the connection and resume at once (the connection pill's click; also used by tests). */
  reconnect() {
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(4000, "client reconnect");
    this.connect();
  }

  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  receive(text) {
    this.attempt = 0;  // the connection works: the next drop starts the backoff afresh
    let msg;
    try { msg = JSON.parse(text); } catch { return; }
    if (msg.sub && this.closing.get(msg.sub)) {
      // Still the released subscription's tail (the notifier answers in order); a new one starts after it.
      if (msg.type === "unsubscribed" || (msg.type === "error" && /not subscribed/.test(msg.reason))) {
        this.closing.set(msg.sub, this.closing.get(msg.sub) - 1);
      }
      return;
    }
    const sub = msg.sub ? this.subs.get(msg.sub) : null;
    if (msg.type === "event") {
      if (!sub) return;
      const last = sub.cursor[msg.stream];
      if (last !== null && last !== undefined && msg.seq <= last) { this.duplicates += 1; return; }
      sub.cursor[msg.stream] = msg.seq;
      for (const l of sub.listeners) l.event?.(msg.event, msg);
    } else if (msg.type === "subscribed" && sub) {
      const resumed = msg.after_events !== null && msg.after_events !== undefined;
      for (const l of sub.listeners) l.ready?.({resumed});
    } else if (msg.type === "error") {
      if (sub && !/already subscribed/.test(msg.reason)) console.warn("kiln:", msg.sub, msg.reason);
      if (sub && /retry later/.test(msg.reason)) {  // NATS was busy or down: the socket lives on, try again
        setTimeout(() => this.subs.get(sub.key) === sub && this.send(this.op("subscribe", sub)), 2000);
      }
    }
    // "overflow" precedes a 1013 close and "unsubscribed" confirms a release: nothing to do for either.
  }

  setState(state, detail = "") {
    this.state = state;
    this.dispatchEvent(new CustomEvent(STATE_EVENT, {detail: {state, detail}}));
  }
}
