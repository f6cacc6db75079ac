// WebSocket tickets (docs/websocket.md): what one notifier socket may watch, signed by the API, and how long
// before the socket must show a fresh one. Pure functions; js/live.js does the asking and the sending.

export const SUBPROTOCOL = "kiln.v1";
export const TICKET_PREFIX = "kiln.ticket.";
export const CLOSE_UNAUTHORIZED = 4401;

/** The ticket request for subscription keys ("job:<id>", "project:<id>"): {jobs: [...], projects: [...]}. */
export function scopeOf(keys) {
  const scope = {jobs: [], projects: []};
  for (const key of keys) {
    const [kind, ...rest] = key.split(":");
    (kind === "job" ? scope.jobs : scope.projects).push(rest.join(":"));
  }
  return scope;
}

// A handshake header line holds at most 8 KiB (docs/websocket.md): a ticket naming many jobs goes in the first frame.
const MAX_HEADER_TICKET = 4096;

/** How a socket presents `ticket`: in its subprotocol offer, or (a long one) as its first frame; never in the URL,
 * which ends up in access logs. */
export function offer(ticket) {
  if (ticket.length > MAX_HEADER_TICKET) return {protocols: [SUBPROTOCOL], first: {op: "auth", ticket}};
  return {protocols: [SUBPROTOCOL, TICKET_PREFIX + ticket], first: null};
}

/** Issue time (Unix seconds) written in a ticket (a JWT); null when it cannot be read. */
export function issuedAt(ticket) {
  try {
    const payload = JSON.parse(atob(ticket.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return Number.isFinite(payload.iat) ? payload.iat : null;
  } catch {
    return null;
  }
}

/** Milliseconds after fetching `ticket` at which to renew it: at 80 % of the shorter of the API's renew_within_s
 * and the notifier's own allowance. The notifier announces its deadline (`expires_at`, Unix seconds) when it
 * accepts a ticket; its distance from the ticket's issue time compares two server clocks, so a browser clock
 * that is off changes nothing. */
export function renewAfterMs(ticket, renewWithinS, notifierExpiresAt = null) {
  let window = renewWithinS;
  const iat = issuedAt(ticket);
  if (iat !== null && Number.isFinite(notifierExpiresAt) && notifierExpiresAt > iat) {
    window = Math.min(window, notifierExpiresAt - iat);
  }
  return Math.max(1000, window * 800);
}
