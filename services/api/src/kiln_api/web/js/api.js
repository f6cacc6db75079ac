// The REST API, same origin as the page.
//
// Signed in, the page holds no credential of its own: the session is the HttpOnly cookie the API set, which
// script cannot read. What script does hold, in memory only, is the session's CSRF token: request() sends it with
// every state-changing call, and reports every 401 (a session that ended) to the page, which then asks to sign in.

export class ApiError extends Error {
  /** `detail` is FastAPI's: a string, or a list of {loc, msg, type} for validation errors (422). */
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);
const auth = {csrf: null, onLost: () => {}};

/** The signed-in session's CSRF token (null: none), and what to do when the API answers 401 to a call. */
export function useSession({csrf = null, onLost = () => {}} = {}) {
  auth.csrf = csrf;
  auth.onLost = onLost;
}

/** `signIn`: a call whose 401 means "wrong key" or "not signed in yet", not "the session ended". */
async function request(method, path, body, {signIn = false} = {}) {
  const init = {method, headers: {Accept: "application/json"}, credentials: "same-origin"};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (!SAFE.has(method) && auth.csrf) init.headers["X-CSRF-Token"] = auth.csrf;
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `API unreachable: ${err.message}`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (response.ok) return data;
  const error = new ApiError(response.status, data && data.detail !== undefined ? data.detail : text);
  if (response.status === 401 && !signIn) auth.onLost(error.message);
  throw error;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

const V1 = "/api/v1";
const job = (id) => `${V1}/jobs/${encodeURIComponent(id)}`;

export const api = {
  config: () => request("GET", `${V1}/config`),
  openapi: () => request("GET", "/openapi.json"),
  /** {user, csrf_token, expires_at} of the cookie's session; 401 when there is none. */
  session: () => request("GET", `${V1}/session`, undefined, {signIn: true}),
  /** Exchange an API key for the session cookie; the key goes nowhere else. */
  signIn: (apiKey) => request("POST", `${V1}/session`, {api_key: apiKey}, {signIn: true}),
  signOut: () => request("DELETE", `${V1}/session`, undefined, {signIn: true}),
  me: () => request("GET", `${V1}/me`),
  /** The projects you may read, each with your `role`. */
  projects: () => request("GET", `${V1}/projects`),
  /** {ticket, expires_at, renew_within_s} for a notifier socket watching exactly these jobs and projects. */
  ticket: ({jobs = [], projects = []}) => request("POST", `${V1}/ws-tickets`, {jobs, projects}),
  jobs: (params) => request("GET", `${V1}/jobs${query(params)}`),
  job: (id) => request("GET", job(id)),
  create: (body) => request("POST", `${V1}/jobs`, body),
  start: (id) => request("POST", `${job(id)}/start`),
  cancel: (id) => request("POST", `${job(id)}/cancel`),
  rerun: (id) => request("POST", `${job(id)}/rerun`),
  /** {key: {steps, values}}; `kind` "epoch" (x = epoch) or "metrics" (x = the SDK's step). */
  metrics: async (id, {keys, kind} = {}) =>
    (await request("GET", `${job(id)}/metrics${query({keys: keys && keys.join(","), kind})}`)).series,
  logs: (id, tail = 500) => request("GET", `${job(id)}/logs${query({tail})}`),
};

/** Parse a FastAPI 422 into {"train.epochs": "message", ...}; entries without a body field go under "". */
export function fieldErrors(detail) {
  const out = {};
  if (!Array.isArray(detail)) {
    out[""] = typeof detail === "string" ? detail : JSON.stringify(detail);
    return out;
  }
  for (const err of detail) {
    const loc = (err.loc || []).filter((p) => p !== "body");
    const key = loc.join(".");
    const msg = String(err.msg || "invalid").replace(/^Value error, /, "");
    out[key] = out[key] ? `${out[key]}; ${msg}` : msg;
  }
  return out;
}
