// The provenance web page: upload (drop, pick, paste) -> /v1/scan; search -> /v1/search/{caption,text}.
// Everything shown comes from the JSON API; text is inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "provenance-api-key";
const SEARCH_K = 24;
const VERDICT_TEXT = {
  exact: "Exact copy", replica: "Replica", similar: "Similar", novel: "No copy found", error: "Error",
};

const state = { health: null, maxUpload: 20 * 1024 * 1024, busy: false, blobUrls: [] };

// ------------------------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, "network", "Cannot reach the server. Is it still running?");
  }
  const isJson = (response.headers.get("content-type") || "").includes("application/json");
  const body = isJson ? await response.json() : null;
  if (!response.ok) {
    const err = body && body.error ? body.error : { code: "http_" + response.status, message: response.statusText };
    if (response.status === 401) showKeyForm();
    throw new ApiError(response.status, err.code, err.message);
  }
  return body;
}

function itemPath(id) { return "/v1/items/" + encodeURIComponent(id); }

// ---------------------------------------------------------------------------- status

async function loadHealth() {
  let body = null;
  try {
    const response = await fetch("/healthz");
    body = await response.json();
  } catch (e) {
    $("server-status").textContent = "Cannot reach the server.";
    setTimeout(loadHealth, 3000);
    return;
  }
  state.health = body;
  state.maxUpload = body.max_upload_bytes || state.maxUpload;
  $("limit-help").textContent = `Up to ${formatBytes(state.maxUpload)}.`;
  if (body.status === "loading") {
    $("server-status").textContent = "Loading the index and models\u2026";
    setTimeout(loadHealth, 1000);
    return;
  }
  if (body.status === "error") {
    $("server-status").textContent = "The server could not load its index: " + (body.error || "unknown error");
    return;
  }
  const c = body.checks || {};
  const checks = [...(c.descriptors || []).map((d) => d.toUpperCase())];
  if (c.visible) checks.push("visible watermark");
  renderScanOptions(body.options || []);
  if (c.invisible) checks.push("invisible watermarks");
  if (c.c2pa) checks.push("C2PA");
  if (c.metadata) checks.push("generator metadata");
  $("server-status").textContent =
    `Index \u201c${body.index}\u201d \u00b7 ${body.items.toLocaleString()} images \u00b7 checks: ${checks.join(", ")}`;
  const textOption = $("search-mode").querySelector('option[value="text"]');
  textOption.disabled = !body.text_search;
  if (body.text_search) {
    $("search-mode").value = "text";
    updateSearchHelp();
  }
}

// One checkbox per option a scan request may set (the library's ScanOptions, listed by /healthz): adding an
// option there adds its box here. Options that cannot run on this server are not offered.
function renderScanOptions(options) {
  const box = $("scan-options");
  box.replaceChildren();
  for (const o of options) {
    if (!o.available) continue;
    const label = document.createElement("label");
    label.className = "check-option";
    label.id = `option-${o.name}`;
    const input = document.createElement("input");
    input.type = "checkbox";
    input.name = o.name;
    input.checked = o.default === true;
    const text = document.createElement("span");
    text.textContent = o.title + " ";
    const help = document.createElement("span");
    help.className = "drop-help";
    help.textContent = `(${o.description})`;
    text.append(help);
    label.append(input, text);
    box.append(label);
  }
}

function scanQuery() {
  const params = new URLSearchParams({ match_verdicts: "true" });
  for (const input of $("scan-options").querySelectorAll("input[type=checkbox]")) {
    params.set(input.name, String(input.checked));
  }
  return params.toString();
}

function updateSearchHelp() {
  $("search-help").textContent = $("search-mode").value === "text"
    ? "Meaning search ranks training images by how well they match your words (OpenCLIP)."
    : "Caption search finds every caption containing all the words; \"quotes\" keep a phrase and word* matches a prefix.";
}

// ---------------------------------------------------------------------------- messages

function showError(title, message) {
  const box = $("error");
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  box.append(strong, document.createTextNode(message));
  box.hidden = false;
}

function clearError() { $("error").hidden = true; $("error").replaceChildren(); }

function errorTitle(err) {
  switch (err.code) {
    case "not_an_image": return "Not an image";
    case "invalid_options": return "Options that cannot go together";
    case "too_large": return "File too large";
    case "too_many_pixels": return "Image too large";
    case "unauthorized": return "API key needed";
    case "loading": return "Still loading";
    default: return "Something went wrong";
  }
}

function showKeyForm() { $("key-form").hidden = false; $("key-input").focus(); }

function setBusy(busy, message) {
  state.busy = busy;
  $("drop-zone").setAttribute("aria-busy", String(busy));
  $("results").setAttribute("aria-busy", String(busy));
  document.querySelector("#search-form button").disabled = busy;
  if (message) $("results-summary").textContent = message;
}

// ---------------------------------------------------------------------------- upload

async function scanFile(file) {
  if (!file || state.busy) return;
  clearError();
  resetResults();
  if (file.size > state.maxUpload) {
    $("results-summary").textContent = "";
    showError("File too large", `${file.name} is ${formatBytes(file.size)}; the limit is ${formatBytes(state.maxUpload)}.`);
    return;
  }
  setBusy(true, `Checking ${file.name}\u2026`);
  const form = new FormData();
  form.append("file", file, file.name || "pasted-image");
  try {
    const record = await api(`/v1/scan?${scanQuery()}`, { method: "POST", body: form });
    renderScan(record, file);
  } catch (err) {
    $("results-summary").textContent = "";
    showError(errorTitle(err), err.message);
  } finally {
    setBusy(false);
  }
}

function renderScan(record, file) {
  const verdict = record.verdict;
  const top = record.matches[0];
  let summary = `${VERDICT_TEXT[verdict] || verdict}`;
  if (top && verdict !== "novel") summary += ` \u2014 closest training image: ${top.id}`;
  $("results-summary").textContent = `${summary}. ${record.matches.length} nearest training images shown.`;

  const preview = $("upload-preview");
  if (file && file.type.startsWith("image/")) {
    const url = URL.createObjectURL(file);
    state.blobUrls.push(url);
    preview.src = url;
    preview.alt = "Your upload: " + record.path;
    preview.hidden = false;
  } else {
    preview.hidden = true;
  }
  // a verified copy's region (thorough scans): a box on the upload and on the matched training image
  const region = (record.matches.find((m) => m.region) || {}).region;
  drawRegion(preview, region && !preview.hidden ? region.query : null);
  setBadge($("upload-verdict"), verdict);
  const facts = [record.path, `${record.width}\u00d7${record.height}`];
  if (record.sha256) facts.push("sha256 " + record.sha256.slice(0, 16) + "\u2026");
  $("upload-facts").textContent = facts.join(" \u00b7 ");
  renderEvidence(record);
  $("evidence").hidden = false;

  $("grid-heading").textContent = "Nearest training images";
  $("grid-heading").hidden = false;
  renderGrid(record.matches.map((m, i) => ({
    id: m.id, caption: m.caption, scoreLabel: scoreLabel(m), verdict: m.verdict, top: i === 0 && verdict !== "novel",
    region: m.region ? m.region.corpus : null,
  })));
}

function drawRegion(img, box) {
  // box [x0, y0, x1, y1], relative 0..1, drawn over what the img shows (its object-fit is contain)
  let frame = img.parentElement;
  if (!frame.classList.contains("region-frame")) {
    frame = document.createElement("span");
    frame.className = "region-frame";
    img.replaceWith(frame);
    frame.append(img);
  }
  frame.querySelectorAll(".region-box").forEach((el) => el.remove());
  if (!box) return;
  const mark = document.createElement("span");
  mark.className = "region-box";
  mark.title = "where the copy is";
  frame.append(mark);
  const place = () => {
    const W = img.clientWidth, H = img.clientHeight, w = img.naturalWidth, h = img.naturalHeight;
    if (!w || !h || !W || !H) return;
    const s = Math.min(W / w, H / h), dw = w * s, dh = h * s;
    const x = img.offsetLeft + (W - dw) / 2, y = img.offsetTop + (H - dh) / 2;
    Object.assign(mark.style, {
      left: `${x + box[0] * dw}px`, top: `${y + box[1] * dh}px`,
      width: `${(box[2] - box[0]) * dw}px`, height: `${(box[3] - box[1]) * dh}px`,
    });
  };
  img.addEventListener("load", place);
  new ResizeObserver(place).observe(img);
  place();
}

function renderEvidence(record) {
  // the checks that ran on this image (the record says), else the server's
  const checks = record.checks || (state.health && state.health.checks) || {};
  const wm = record.watermarks || {};
  const list = $("evidence-list");
  list.replaceChildren();
  const scores = record.scores || {};
  const scoreParts = [];
  if (scores.sscd != null) scoreParts.push(`SSCD ${scores.sscd.toFixed(3)}`);
  if (scores.clip != null) scoreParts.push(`CLIP ${scores.clip.toFixed(3)}`);
  if (scores.pdq_distance != null) scoreParts.push(`PDQ distance ${scores.pdq_distance} bits`);
  addRow(list, "Best scores", scoreParts.join(" \u00b7 ") || "none", false);
  if (record.extra && record.extra.identical_file) addRow(list, "Identical file", record.extra.identical_file, true);
  if (record.extra && record.extra.sscd_view === "centre") {
    addRow(list, "Matched by", "the centre of the image (a photo inside a screenshot or frame)", true);
  }

  if (!checks.visible && wm.visible == null) addRow(list, "Visible watermark", "not checked", false);
  else if (wm.visible) {
    const p = wm.visible.probability;
    // the detector's own flag threshold, chosen on data (0.5 would flag about a quarter of clean photos)
    const flagged = wm.visible.flagged === true;
    const thorough = (wm.visible.input_sizes || []).includes(512) ? ", thorough check" : "";
    addRow(list, "Visible watermark", `${Math.round(p * 100)}% likely${flagged ? " (flagged)" : ""}${thorough}`, flagged);
  }
  if (!checks.invisible) addRow(list, "Invisible watermarks", "not checked", false);
  else if (wm.invisible && wm.invisible.length) {
    addRow(list, "Invisible watermarks", wm.invisible.map((m) =>
      `${m.scheme} (${Math.round(m.bit_accuracy * 100)}% bits, p=${m.p_value.toExponential(1)})` +
      (m.payload ? ` payload ${m.payload}` : "")).join("; "), true);
  } else addRow(list, "Invisible watermarks", "none found", false);

  if (!checks.c2pa) addRow(list, "C2PA", "not checked", false);
  else if (wm.c2pa) addRow(list, "C2PA", summarise(wm.c2pa), Boolean(wm.c2pa.ai_generated));
  else addRow(list, "C2PA", "no manifest", false);

  if (!checks.metadata) addRow(list, "Metadata", "not checked", false);
  else if (wm.metadata) addRow(list, "Metadata", summarise(wm.metadata), true);
  else addRow(list, "Metadata", "no generator metadata", false);

  if (record.extra && record.extra.memorization) addRow(list, "Memorization", summarise(record.extra.memorization), true);
}

function addRow(list, term, value, flagged) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dd.className = flagged ? "yes" : "no";
  list.append(dt, dd);
}

function summarise(obj) {
  // One line of "key: value" pairs of the scalar fields, which is what a reader scans for.
  const parts = [];
  for (const [k, v] of Object.entries(obj)) {
    if (v == null || v === "" || (Array.isArray(v) && !v.length)) continue;
    if (typeof v === "object" && !Array.isArray(v)) continue;
    parts.push(`${k.replace(/_/g, " ")}: ${Array.isArray(v) ? v.join(", ") : v}`);
    if (parts.length >= 6) break;
  }
  return parts.join(" \u00b7 ") || "present";
}

// ---------------------------------------------------------------------------- search

async function search(event) {
  event.preventDefault();
  if (state.busy) return;
  const q = $("search-input").value.trim();
  if (!q) { $("search-input").focus(); return; }
  const mode = $("search-mode").value;
  clearError();
  resetResults();
  setBusy(true, `Searching for \u201c${q}\u201d\u2026`);
  try {
    let cards;
    if (mode === "text") {
      const body = await api("/v1/search/text", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: q, k: SEARCH_K }),
      });
      cards = body.matches.map((m) => ({ id: m.id, caption: m.caption, scoreLabel: scoreLabel(m) }));
    } else {
      const body = await api(`/v1/search/caption?q=${encodeURIComponent(q)}&k=${SEARCH_K}`);
      cards = body.hits.map((h) => ({ id: h.id, caption: h.caption, scoreLabel: `match ${h.score.toFixed(2)}` }));
    }
    $("results-summary").textContent = cards.length
      ? `${cards.length} training image${cards.length === 1 ? "" : "s"} for \u201c${q}\u201d.`
      : `No training images for \u201c${q}\u201d.`;
    $("grid-heading").textContent = mode === "text" ? "Closest by meaning" : "Captions containing your words";
    $("grid-heading").hidden = cards.length === 0;
    renderGrid(cards);
  } catch (err) {
    $("results-summary").textContent = "";
    showError(errorTitle(err), err.message);
  } finally {
    setBusy(false);
  }
}

// ---------------------------------------------------------------------------- grid

function resetResults() {
  for (const url of state.blobUrls) URL.revokeObjectURL(url);
  state.blobUrls = [];
  $("evidence").hidden = true;
  $("grid").replaceChildren();
  $("grid-heading").hidden = true;
}

function renderGrid(cards) {
  const grid = $("grid");
  grid.replaceChildren();
  for (const card of cards) grid.append(renderCard(card));
}

function renderCard({ id, caption, scoreLabel: label, verdict, top, region }) {
  const li = document.createElement("li");
  li.className = "card" + (top ? " top-match" : "");
  li.dataset.id = id;
  const img = document.createElement("img");
  img.alt = caption ? `Training image: ${caption}` : `Training image ${id}`;
  img.loading = "lazy";
  img.decoding = "async";
  img.width = 160;
  img.height = 120;
  img.addEventListener("error", () => {
    const placeholder = document.createElement("div");
    placeholder.className = "no-thumb";
    placeholder.textContent = "no thumbnail";
    img.replaceWith(placeholder);
  }, { once: true });
  setThumbnail(img, id);

  const body = document.createElement("div");
  body.className = "card-body";
  const cap = document.createElement("p");
  cap.className = "card-caption";
  cap.textContent = caption || "(no caption)";
  const score = document.createElement("div");
  score.className = "card-score";
  const strong = document.createElement("strong");
  strong.textContent = label;
  score.append(strong);
  if (verdict) {
    const badge = document.createElement("span");
    setBadge(badge, verdict);
    score.append(badge);
  }
  const idLine = document.createElement("div");
  idLine.className = "card-id";
  const link = document.createElement("a");
  link.href = itemPath(id);
  link.textContent = id;
  link.title = "Item metadata (JSON)";
  idLine.append(link);
  body.append(cap, score, idLine);
  li.append(img, body);
  if (region) {
    img.classList.add("has-region");  // shown whole (contain), so the box lands on the right pixels
    drawRegion(img, region);
  }
  return li;
}

function setThumbnail(img, id) {
  const url = itemPath(id) + "/thumbnail";
  if (!apiKey()) { img.src = url; return; }
  // With an API key the image must be fetched with the header, then shown from a blob URL.
  fetch(url, { headers: { Authorization: `Bearer ${apiKey()}` } })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
    .then((blob) => { const u = URL.createObjectURL(blob); state.blobUrls.push(u); img.src = u; })
    .catch(() => img.dispatchEvent(new Event("error")));
}

function setBadge(el, verdict) {
  el.className = "badge " + verdict;
  el.textContent = verdict;
  el.title = VERDICT_TEXT[verdict] || verdict;
}

function scoreLabel(m) {
  if (m.descriptor === "pdq") return `PDQ ${m.distance != null ? m.distance + " bits" : m.score.toFixed(3)}`;
  return `${m.descriptor.toUpperCase()} ${m.score.toFixed(3)}`;
}

function formatBytes(n) {
  if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(n % (1024 * 1024) ? 1 : 0)} MB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KB`;
  return `${n} bytes`;
}

// ---------------------------------------------------------------------------- wiring

function init() {
  const zone = $("drop-zone");
  const input = $("file-input");
  zone.addEventListener("click", () => input.click());
  input.addEventListener("change", () => { scanFile(input.files[0]); input.value = ""; });

  // Dropping anywhere on the page works; the zone shows where.
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; zone.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; zone.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) scanFile(file);
  });
  document.addEventListener("paste", (e) => {
    const files = e.clipboardData ? [...e.clipboardData.files] : [];
    const file = files.find((f) => f.type.startsWith("image/")) || files[0];
    if (file) { e.preventDefault(); scanFile(file); }
  });

  $("search-form").addEventListener("submit", search);
  $("search-mode").addEventListener("change", updateSearchHelp);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    $("key-form").hidden = true;
    clearError();
  });
  loadHealth();
}

init();
