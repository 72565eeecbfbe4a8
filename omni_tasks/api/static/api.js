// The API's calls. Every URL is relative, so the page works under a path prefix; the
// bearer token lives in sessionStorage (this tab only) and travels as a header, never
// in a URL.

const TOKEN_KEY = "omni.token";

/** A 401: no token, or a wrong one. */
export class AuthError extends Error {}

/** Any other failed call, with the API's error message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

/** The token of this tab; null before one was given (empty: an API without one). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const value = token();
  return value ? { ...extra, Authorization: `Bearer ${value}` } : extra;
}

async function failure(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = body.error?.message ?? body.detail ?? JSON.stringify(body);
  } catch {
    // not JSON: the status line says enough
  }
  return response.status === 401 ? new AuthError(message) : new ApiError(response.status, message);
}

/** A JSON call: `call("v1/jobs", {method: "POST", body})`. */
export async function call(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (body !== undefined) {
    init.headers = headers({ "Content-Type": "application/json" });
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * A URL the API returned (image_url, audio_url...), made safe to send the token to:
 * kept when it is on this page's origin (api.public_url set right), else its `v1/...`
 * part on this page's base, so the token never goes to another origin.
 */
export function sameOrigin(url) {
  const parsed = new URL(url, document.baseURI);
  if (parsed.origin === location.origin) return parsed.href;
  const at = parsed.pathname.indexOf("/v1/");
  return at >= 0 ? parsed.pathname.slice(at + 1) + parsed.search : null;
}

/** A file the API serves (it needs the token), as an object URL for <img>, <video>... */
export async function objectUrl(url) {
  const target = sameOrigin(url);
  if (target === null) throw new ApiError(0, `cannot fetch ${url} from this page`);
  const response = await fetch(target, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}

/**
 * The Server-Sent Events of `path`, as {name, data} objects. Read with fetch, since
 * EventSource cannot send the Authorization header.
 */
export async function* events(path, signal) {
  const response = await fetch(path, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const parsed = parseEvent(block);
      if (parsed) yield parsed;
    }
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line === "" || line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}
