// Calls to the HoVerServe API with the API key kept in this tab's session storage.

const KEY_NAME = "hoverserve.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

/** Headers with the Bearer key (when one is set) added to `extra`. */
export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** An Error carrying the API's `{"error": {"code", "message"}}` and the HTTP status. */
export async function responseError(response) {
  let code = `http_${response.status}`;
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch (_) { /* not JSON: keep the status */ }
  const error = new Error(message);
  error.status = response.status;
  error.code = code;
  return error;
}

/** fetch() with the key; rejects with responseError() unless the answer is 2xx. */
export async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) throw await responseError(response);
  return response;
}

export async function apiJson(path, options = {}) {
  return (await api(path, options)).json();
}

/** Binds an <input> to the stored key; `onChange` runs after every change. */
export function bindKeyField(input, onChange) {
  input.value = getKey();
  input.addEventListener("change", () => {
    setKey(input.value.trim());
    if (onChange) onChange();
  });
}

/**
 * Uploads `form` (FormData) to POST /v1/jobs with XMLHttpRequest, which reports upload progress
 * (fetch does not); resolves with the job status.
 */
export function submitJob(form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* left null */ }
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(body);
      } else {
        const error = new Error(body && body.error ? body.error.message : `HTTP ${xhr.status}`);
        error.status = xhr.status;
        reject(error);
      }
    });
    xhr.addEventListener("error", () => reject(new Error("the upload failed (network error)")));
    xhr.send(form);
  });
}

/** Downloads an API resource as a file (a link cannot send the Authorization header). */
export async function download(path, name) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function formatNumber(value, digits = 0) {
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits,
                                                 minimumFractionDigits: digits });
}
