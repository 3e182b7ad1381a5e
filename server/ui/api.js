// The API of this server, with the key from sessionStorage as the Bearer header. Errors come
// back as ApiError with the server's message ({"error": {"message", "param", "code"}}).

const KEY = "monet.key";

export class ApiError extends Error {
  constructor(status, message, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => (value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY)),
};

const listeners = new Set();
export function onAuthError(fn) { listeners.add(fn); }

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const k = key.get();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param ?? null;
    }
  } catch { /* not JSON: keep the status line */ }
  const error = new ApiError(response.status, message, param);
  if (response.status === 401 || response.status === 403) listeners.forEach((fn) => fn(error));
  return error;
}

// fetch; no answer or a non-2xx status throws ApiError (an abort stays an AbortError).
async function send(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server did not answer (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

// fetch, then the JSON body; a non-2xx status throws ApiError. Returns {data, response}.
export async function call(method, path, { body, headers: extra, signal } = {}) {
  const init = { method, headers: headers(extra), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await send(path, init);
  const text = await response.text();
  return { data: text ? JSON.parse(text) : null, response };
}

export const get = (path, opts) => call("GET", path, opts).then((r) => r.data);
export const post = (path, body, opts) => call("POST", path, { ...opts, body }).then((r) => r.data);

// Server-sent events of POST `path`: onOpen(response) once, onChunk(json) per `data:` event
// until `data: [DONE]`. An error event ({"error": ...}) throws ApiError.
export async function stream(path, body, { onOpen, onChunk, signal } = {}) {
  const init = { method: "POST", signal, body: JSON.stringify(body),
                 headers: headers({ "Content-Type": "application/json",
                                    Accept: "text/event-stream" }) };
  const response = await send(path, init);
  if (onOpen) onOpen(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message,
                                          chunk.error.param);
      onChunk(chunk);
    }
    if (done) return;
  }
}

// GET /jobs/{id} every `every` ms until it is done; onProgress(job) each time. Resolves to the
// finished job (succeeded or failed); never blocks the page; `signal` stops following.
export async function follow(jobId, onProgress, { every = 400, signal } = {}) {
  for (;;) {
    const job = await get(`/jobs/${encodeURIComponent(jobId)}`, { signal });
    onProgress(job);
    if (job.status === "succeeded" || job.status === "failed") return job;
    await new Promise((resolve) => setTimeout(resolve, every));
  }
}
