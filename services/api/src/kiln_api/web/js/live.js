// One WebSocket to the notifier's multi-job endpoint, shared by every view.
//
// Each subscription (a job, or every job of a project) keeps a cursor: the last stream sequence it got per
// stream (events, logs). When the socket drops (network, notifier restart, code 1013 when this client was too
// slow, 4401 when its ticket ran out) it reconnects with backoff and subscribes again *after* those cursors, so the
// notifier's replay fills the gap exactly; anything at or below a cursor is dropped here, so nothing is applied
// twice.
//
// With authentication on, a socket may watch only what its ticket names (js/tickets.js). Every connect asks the
// API for a ticket naming every subscription; a subscription the ticket lacks waits for a wider one, sent as a
// renewal, which also comes before the notifier's deadline. A renewal must cover everything the socket holds, or
// the notifier closes it: so a ticket that misses a subscription made while it was being fetched is not sent. An
// API that issues no tickets (503: not configured, as with authentication off) gets sockets without one.

import {CLOSE_UNAUTHORIZED, offer, renewAfterMs, scopeOf} from "./tickets.js";

const STATE_EVENT = "state";
const RETRY_RENEWAL_MS = 5000;

export class Live extends EventTarget {
  /** `issue(scope)` asks the API for a ticket ({ticket, renew_within_s}); without it, sockets carry none. */
  constructor(url, {issue = null} = {}) {
    super();
    this.url = url.replace(/\/$/, "") + "/api/v1/ws";
    this.issue = issue;
    this.subs = new Map();
    this.closing = new Map(); // key -> unsubscribes not yet confirmed: messages of that key are the old one's
    this.covered = new Set(); // keys the socket's ticket names
    this.denied = new Map();  // key -> why the API would not put it in a ticket (not found, or not yours)
    this.grant = null;        // the open socket's latest ticket {ticket, renew_within_s, keys, fetchedAt}; null: none
    this.state = "connecting";
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.renewTimer = null;
    this.refreshing = false;
    this.again = false;
    this.runs = 0;
    this.stopped = false;
    this.connects = 0;
    this.duplicates = 0;
    this.renewals = 0;
    this.unauthorized = 0;
  }

  /** Follow one job (events and log batches, history first) or a project (events from now on).
   *
   * handlers.event(event, message) gets each new event; handlers.ready({resumed}) runs when the notifier
   * acknowledged the subscription: `resumed` is true when it continues from a cursor; handlers.denied(reason) when
   * the API will not let this user watch it. A second listener of a subscription that is already open gets its
   * events from then on. Returns the function that releases it.
   */
  subscribe(target, handlers) {
    const key = target.job_id ? `job:${target.job_id}` : `project:${target.project}`;
    const existing = this.subs.get(key);
    if (existing) {
      existing.listeners.add(handlers);
      if (this.denied.has(key)) handlers.denied?.(this.denied.get(key));
      return () => this.release(key, handlers);
    }
    const sub = {key, target, cursor: {events: null, logs: null}, listeners: new Set([handlers])};
    this.subs.set(key, sub);
    if (this.allowed(key)) this.send(this.op("subscribe", sub));
    else this.refresh();
    return () => this.release(key, handlers);
  }

  release(key, handlers) {
    const sub = this.subs.get(key);
    if (!sub) return;
    sub.listeners.delete(handlers);
    if (sub.listeners.size) return;
    this.subs.delete(key);
    if (this.denied.delete(key)) return;  // never subscribed
    if (this.send({op: "unsubscribe", ...sub.target})) this.closing.set(key, (this.closing.get(key) || 0) + 1);
  }

  allowed(key) {
    return !this.grant || this.covered.has(key);
  }

  op(op, sub) {
    const msg = {op, ...sub.target};
    if (sub.cursor.events !== null) msg.after_events = sub.cursor.events;
    if (sub.target.job_id && sub.cursor.logs !== null) msg.after_logs = sub.cursor.logs;
    return msg;
  }

  async connect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    clearTimeout(this.renewTimer);
    const run = ++this.runs;
    Object.assign(this, {grant: null, covered: new Set()});
    this.setState(this.connects ? "reconnecting" : "connecting");
    let grant = null;
    if (this.issue) {
      try {
        grant = await this.ticket();
      } catch (err) {
        if (run !== this.runs || this.stopped) return;
        if (err.status !== 503) {
          this.retry(false, `no ticket: ${err.message}`);
          return;
        }
      }
      if (run !== this.runs || this.stopped) return;  // a newer connect, or signed out, while it was fetched
    }
    const how = grant && offer(grant.ticket);
    const ws = how ? new WebSocket(this.url, how.protocols) : new WebSocket(this.url);
    this.ws = ws;
    this.closing.clear();
    ws.onopen = () => {
      this.connects += 1;
      if (!grant) this.setState("live");  // with a ticket: once the notifier says it is accepted
      if (how?.first) ws.send(JSON.stringify(how.first));
      this.covered = grant ? grant.keys : new Set();
      this.grant = grant;
      for (const sub of this.subs.values()) if (this.allowed(sub.key)) this.send(this.op("subscribe", sub));
      if (grant) {
        this.schedule();
        if ([...this.subs.keys()].some((k) => !this.allowed(k) && !this.denied.has(k))) this.refresh();
      }
    };
    ws.onmessage = (e) => this.receive(e.data);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearTimeout(this.renewTimer);
      this.covered = new Set();
      this.grant = null;
      if (this.stopped) return;
      if (e.code === CLOSE_UNAUTHORIZED) this.unauthorized += 1;
      // 1013 (we were too slow) or 4401 (the ticket ran out) after a working connection: our cursors are exact,
      // so come back at once, with a new ticket. Anything else, or again: back off.
      const fast = (e.code === 1013 || e.code === CLOSE_UNAUTHORIZED) && this.attempt === 0;
      this.retry(fast, e.code === 1013 ? "catching up" : e.code === CLOSE_UNAUTHORIZED ? "renewing access" : null);
    };
  }

  /** Connect again after a delay: 0.2 s when `fast`, else 0.5 s doubling to 5 s, with jitter. */
  retry(fast, detail) {
    const delay = fast ? 200 : Math.min(5000, 500 * 2 ** this.attempt) * (0.75 + Math.random() / 2);
    this.attempt += 1;
    this.setState("reconnecting", detail || `retry in ${Math.round(delay / 1000)}s`);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  /** Drop the connection and resume at once (the connection pill's click; also used by tests). */
  reconnect() {
    if (this.stopped) return;
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(4000, "client reconnect");
    this.connect();
  }

  /** End for good (sign-out): close the socket, forget every subscription, renew nothing. */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.renewTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "signed out");
    this.subs.clear();
    this.closing.clear();
    this.denied.clear();
    this.setState("off");
  }

  // -- tickets ----------------------------------------------------------------------------------------------------

  /** A ticket for every subscription the API allows; one it refuses is marked denied and left out. */
  async ticket() {
    for (;;) {
      const keys = [...this.subs.keys()].filter((k) => !this.denied.has(k));
      const fetchedAt = Date.now();
      try {
        const answer = await this.issue(scopeOf(keys));
        return {...answer, keys: new Set(keys), fetchedAt};
      } catch (err) {
        if (err.status !== 404 || !keys.length) throw err;
        await this.findDenied(keys);  // the API names only the first refused one: ask about each
      }
    }
  }

  async findDenied(keys) {
    let found = 0;
    for (const key of keys) {
      try {
        await this.issue(scopeOf([key]));
      } catch (err) {
        if (err.status !== 404) throw err;
        found += 1;
        this.denied.set(key, err.message);
        for (const l of this.subs.get(key)?.listeners || []) l.denied?.(err.message);
      }
    }
    if (!found) throw new Error("the API refused a ticket for these subscriptions");
  }

  /** Renew before the deadline, from the time the socket's ticket was fetched. */
  schedule(notifierExpiresAt = null) {
    clearTimeout(this.renewTimer);
    const {ticket, renew_within_s: within, fetchedAt} = this.grant;
    const due = fetchedAt + renewAfterMs(ticket, within, notifierExpiresAt) - Date.now();
    this.renewTimer = setTimeout(() => this.refresh(), Math.max(0, due));
  }

  /** Send the open socket a fresh ticket for every subscription (renewal, or a subscription it lacks). */
  async refresh() {
    if (!this.grant || this.stopped) return;  // a socket without a ticket has nothing to renew
    if (this.refreshing) { this.again = true; return; }
    this.refreshing = true;
    try {
      do {
        this.again = false;
        const ws = this.ws;
        if (!ws || ws.readyState !== WebSocket.OPEN) return;  // connect() gets a ticket of its own
        const grant = await this.ticket();
        if (this.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
        if ([...this.subs.keys()].some((k) => !grant.keys.has(k) && !this.denied.has(k))) {
          this.again = true;  // subscribed while it was fetched: sending it would drop that one (4401)
          continue;
        }
        this.send({op: "renew", ticket: grant.ticket});
        const before = this.covered;
        Object.assign(this, {covered: grant.keys, grant});
        this.renewals += 1;
        this.schedule();
        for (const sub of this.subs.values()) {
          if (!before.has(sub.key) && grant.keys.has(sub.key)) this.send(this.op("subscribe", sub));
        }
      } while (this.again);
    } catch (err) {
      // The socket keeps its deadline meanwhile; past it the notifier closes with 4401 and connect() starts over.
      console.warn("kiln: ticket renewal failed:", err.message);
      if (!this.stopped) this.renewTimer = setTimeout(() => this.refresh(), RETRY_RENEWAL_MS);
    } finally {
      this.refreshing = false;
    }
  }

  // -- messages ---------------------------------------------------------------------------------------------------

  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  receive(text) {
    let msg;
    try { msg = JSON.parse(text); } catch { return; }
    // The connection works: the next drop starts the backoff afresh (an error, e.g. a refused ticket, does not).
    if (msg.type !== "error") this.attempt = 0;
    if (msg.type === "authorized" || msg.type === "renewed") {
      if (msg.type === "authorized") this.setState("live");
      if (this.grant) this.schedule(msg.expires_at);
      return;
    }
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
      if (!/already subscribed/.test(msg.reason)) console.warn("kiln:", msg.sub || "", msg.reason);
      if (sub && /not covered by this ticket/.test(msg.reason)) {
        this.covered.delete(sub.key);
        this.refresh();
      } else if (sub && /retry later/.test(msg.reason)) {  // NATS was busy or down: the socket lives on, try again
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
