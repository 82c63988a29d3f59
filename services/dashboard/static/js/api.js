// The dashboard's JSON API (docs/dashboard-api.md), same origin, session cookie.
// A 401 anywhere means the session is gone: the app sends the person to log-in and
// brings them back to the page they were on (a chat draft survives in sessionStorage).

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `request failed (${status})`);
    this.status = status;
    this.code = e.code || "http_" + status;
    this.field = e.field || null;
    this.body = body;
  }
}

const listeners = new Set();
/** Called with the ApiError whenever the session is found expired. */
export function onExpired(fn) {
  listeners.add(fn);
}

export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, { error: { code: "network", message: "The server cannot be reached. Try again." } });
  }
  const text = res.status === 204 ? "" : await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (res.status === 429) {
      const after = res.headers.get("Retry-After") || data?.error?.retry_after_s;
      if (after) err.message = `${err.message} (try again in ${after} s)`;
    }
    if (res.status === 401 && err.code === "not_authenticated") listeners.forEach((fn) => fn(err));
    throw err;
  }
  return data;
}

export const get = (p) => api("GET", p);
export const post = (p, b = {}) => api("POST", p, b);
export const put = (p, b) => api("PUT", p, b);
export const patch = (p, b) => api("PATCH", p, b);
export const del = (p, b) => api("DELETE", p, b);

/** The API's answer for "who am I", or null when nobody is logged in (no redirect). */
export async function whoami() {
  try {
    const res = await fetch("/api/me", { credentials: "same-origin", headers: { Accept: "application/json" } });
    return res.ok ? await res.json() : null;
  } catch {
    return null;
  }
}
