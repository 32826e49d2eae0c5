// The server's own endpoints, with the API key the page asked for once (kept in this browser's localStorage).
// Every failure becomes an ApiError whose message a person can read: the server's own error text when it sent
// one (OpenAI's {"error": {"message": ...}}), else what went wrong on the way.

const KEY = "mertools.apiKey";

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.name = "ApiError";
    this.status = status; // 0: no HTTP answer at all
  }
}

function stored() {
  try { return localStorage.getItem(KEY) || ""; } catch { return ""; } // storage may be disabled
}
let current = stored(); // what every call sends (also when storage is disabled)

export function apiKey() {
  return current;
}

export function setApiKey(key) {
  current = key || "";
  try { key ? localStorage.setItem(KEY, key) : localStorage.removeItem(KEY); } catch { /* kept for this page only */ }
}

// What an HTTP header can carry: printable ASCII, no spaces (a key pasted with a line break would fail in fetch
// with an opaque TypeError; say why instead).
export function keyProblem(key) {
  if (!key) return "the key is empty";
  if (!/^[\x21-\x7e]+$/.test(key)) return "an API key is printable ASCII without spaces or line breaks";
  return null;
}

function headers(extra = {}) {
  const h = { ...extra };
  if (current) h.Authorization = "Bearer " + current;
  return h;
}

export async function errorMessage(resp) {
  let text = "";
  try { text = await resp.text(); } catch { /* the body is gone: the status says enough */ }
  if (resp.status === 401) {
    return current ? "the server refused this API key (401)" : "this server needs an API key (401)";
  }
  let message = "";
  try { message = JSON.parse(text).error.message; } catch { message = text.trim().slice(0, 300); }
  const status = `HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
  return message ? `${status}: ${message}` : status;
}

// fetch(path) with the key; resolves to the Response when it is 2xx, else throws an ApiError.
export async function request(path, options = {}) {
  const problem = current ? keyProblem(current) : null;
  if (problem) throw new ApiError(`the stored API key cannot be sent: ${problem}`, 401);
  let resp;
  try {
    resp = await fetch(path, { ...options, headers: headers(options.headers) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`cannot reach the server (${e.message || e})`, 0);
  }
  if (!resp.ok) throw new ApiError(await errorMessage(resp), resp.status);
  return resp;
}

export async function getJSON(path, options = {}) {
  const resp = await request(path, options);
  try { return await resp.json(); } catch { throw new ApiError(`${path} did not answer JSON`, resp.status); }
}

// The events of a server-sent-event stream ("data: {...}\n\n", ending with "data: [DONE]") as parsed objects.
export async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (!data) continue;
      let event;
      try { event = JSON.parse(data); } catch { throw new ApiError(`the stream sent something that is not JSON: ${data.slice(0, 80)}`); }
      yield event;
    }
  }
  throw new ApiError("the stream ended before the reply finished (the server stopped or the connection dropped)");
}
