// Calls to batchd's REST API with the operator's key. The key lives in this tab's
// sessionStorage only: it is sent as an Authorization header, never put in a URL or a
// cookie, and it is forgotten when the tab closes.

const KEY = "batchd.console.apiKey";

/** The key of this tab. */
export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  remember(key) {
    sessionStorage.setItem(KEY, key);
  },
  forget() {
    sessionStorage.removeItem(KEY);
  },
};

/** A refusal from batchd (OpenAI's error envelope), or no answer at all (status 0). */
export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

/** The headers of every call: the key, and no cached answers. */
export function authorization(extra = {}) {
  return { Authorization: `Bearer ${session.key ?? ""}`, ...extra };
}

/** `fetch` options every call shares: no cookies, no cache, no referrer. */
export const FETCH_OPTIONS = { credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" };

/** Calls `method path` with an optional JSON body; resolves to the JSON answer. */
export async function call(method, path, { body, signal } = {}) {
  const headers = authorization(body === undefined ? {} : { "Content-Type": "application/json" });
  let response;
  try {
    response = await fetch(path, {
      ...FETCH_OPTIONS,
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "batchd did not answer; is it running?");
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** The error of a refused response, with batchd's own message when it sent one. */
export async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  let param = null;
  try {
    const body = await response.json();
    if (body?.error?.message) {
      ({ message, code = null, param = null } = body.error);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code, param);
}

/** A list's filters as a query string (without `?`): `status` may repeat, metadata
 * pairs are `metadata[key]=value`, `stalled=true` only when set. Only the fields given
 * are written; the change feed takes neither `status` nor `stalled` (it refuses the
 * latter), so its callers leave them out and filter its changes themselves. */
export function filterQuery(filters, { withStatus = true, withStalled = true, withPaging = true } = {}) {
  const query = new URLSearchParams();
  if (withStatus) for (const status of filters.status ?? []) query.append("status", status);
  if (withStalled && filters.stalled) query.set("stalled", "true");
  if (filters.job_id) query.set("job_id", filters.job_id);
  for (const [key, value] of filters.metadata ?? []) query.append(`metadata[${key}]`, value);
  if (filters.created_after) query.set("created_after", filters.created_after);
  if (filters.created_before) query.set("created_before", filters.created_before);
  if (withPaging) {
    if (filters.after) query.set("after", filters.after);
    if (filters.limit) query.set("limit", filters.limit);
  }
  return query.toString();
}

/** The filters of a query string (the inverse of `filterQuery`). */
export function parseFilters(search) {
  const query = new URLSearchParams(search);
  const metadata = [];
  for (const [name, value] of query) {
    const key = name.match(/^metadata\[(.*)\]$/)?.[1];
    if (key !== undefined) metadata.push([key, value]);
  }
  return {
    status: query.getAll("status").flatMap((s) => s.split(",")).filter(Boolean),
    job_id: query.get("job_id") ?? "",
    metadata,
    created_after: query.get("created_after") ?? "",
    created_before: query.get("created_before") ?? "",
    stalled: query.get("stalled") === "true",
    after: query.get("after") ?? "",
    limit: query.get("limit") ?? "",
  };
}
