// The REST API, same origin as the page.

export class ApiError extends Error {
  /** `detail` is FastAPI's: a string, or a list of {loc, msg, type} for validation errors (422). */
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

async function request(method, path, body) {
  const init = {method, headers: {Accept: "application/json"}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `API unreachable: ${err.message}`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!response.ok) throw new ApiError(response.status, data && data.detail !== undefined ? data.detail : text);
  return data;
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
