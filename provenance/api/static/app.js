// The provenance web page: upload (drop, pick, paste) -> /v1/scan; search -> /v1/search/{caption,text}.
// Everything shown comes from the JSON API; text is inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "provenance-api-key";
const SEARCH_K = 24;
const VERDICT_TEXT = {
  exact: "Exact copy", replica: "Replica", similar: "Similar", novel: "No copy found", error: "Error",
};

const state = { health: null, maxUpload: 20 * 1024 * 1024, busy: false, blobUrls: [], scan: null, openers: new Map() };

// ------------------------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

async function api(path, options = {}, key = apiKey()) {
  const headers = new Headers(options.headers || {});
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
    if (response.status === 401 && !options.quietAuth) showKeyForm();
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
  $("key-help").textContent = "Keys are given by the operator of this server." + contactText();
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

const COPY = new Set(["exact", "replica"]);

function renderScan(record, file) {
  state.scan = { record, file, covered: new Set() };
  const verdict = record.verdict;
  const index = (state.health && state.health.index) || "this index";
  // one entry per training image (a match may come from several descriptors), copies first
  const seen = new Set();
  const matches = record.matches.filter((m) => !seen.has(m.id) && seen.add(m.id));
  let copies = matches.filter((m) => COPY.has(m.verdict));
  if (!copies.length && COPY.has(verdict) && matches.length) copies = [matches[0]];
  const others = matches.filter((m) => !copies.includes(m));
  state.scan.copies = copies;

  const answer = $("answer");
  const top = copies[0];
  if (top) {
    // the record's verdict is the answer (it weighs every descriptor); the matches' own verdicts pick the copies
    const exact = verdict === "exact";
    $("answer-heading").textContent = exact
      ? `Found: an exact copy of your image is in the index \u201c${index}\u201d`
      : `Found: a copy of your image is in the index \u201c${index}\u201d`;
    $("answer-text").textContent = (exact
      ? "The same picture, at most resized or re-compressed."
      : "The same picture, edited: cropped, resized, recoloured, re-compressed or shown inside another image.") +
      (copies.length > 1 ? ` The index holds ${copies.length} copies of it.` : "");
    $("results-summary").textContent = `${VERDICT_TEXT[verdict] || "Copy"} found in \u201c${index}\u201d: ${top.id}.`;
  } else {
    $("answer-heading").textContent = `No copy of this image in the index \u201c${index}\u201d`;
    $("answer-text").textContent = verdict === "similar"
      ? "Some indexed images look alike (the same kind of scene), but none is a copy of yours."
      : "We searched the index for copies of it, edited ones included, and found none.";
    $("results-summary").textContent = `No copy found in \u201c${index}\u201d.`;
  }
  answer.classList.toggle("found", Boolean(top));

  const preview = $("upload-preview");
  if (file && file.type.startsWith("image/")) {
    const url = URL.createObjectURL(file);
    state.blobUrls.push(url);
    preview.src = url;
    preview.alt = "Your image: " + record.path;
    preview.hidden = false;
  } else {
    preview.hidden = true;
  }
  // a verified copy's region (thorough scans): a box on the upload and on the matched training image
  const region = top && top.region;
  drawRegion(preview, region && !preview.hidden ? region.query : null);
  $("match-figure").hidden = !top;
  if (top) {
    const img = $("match-image");
    img.alt = top.caption ? `Training image: ${top.caption}` : `Training image ${top.id}`;
    setThumbnail(img, top.id);
    drawRegion(img, region ? region.corpus : null);
    $("match-caption").textContent = `In the index: ${top.id}`;
  }
  renderAnswerEvidence(record, top);
  renderOptoutState();
  $("match-details").hidden = !top;
  answer.hidden = false;

  setBadge($("upload-verdict"), verdict);
  const facts = [record.path, `${record.width}\u00d7${record.height}`];
  if (record.sha256) facts.push("sha256 " + record.sha256.slice(0, 16) + "\u2026");
  $("upload-facts").textContent = facts.join(" \u00b7 ");
  renderEvidence(record);
  $("evidence").hidden = false;

  const card = (m, i) => ({
    id: m.id, caption: m.caption, scoreLabel: scoreLabel(m), verdict: m.verdict, top: i === 0 && COPY.has(m.verdict),
    region: m.region ? m.region.corpus : null, optedOut: m.opted_out, match: m,
  });
  $("grid-heading").textContent = copies.length === 1 ? "The copy in the index" : `The ${copies.length} copies in the index`;
  $("grid-heading").hidden = copies.length === 0;
  renderGrid(copies.map(card));
  const n = others.length;
  $("nearest-summary").textContent = top
    ? `Show ${n} other nearby image${n === 1 ? "" : "s"} (not copies)`
    : `Show the ${n} nearest image${n === 1 ? "" : "s"} (not copies)`;
  $("nearest").open = false;
  $("nearest").hidden = n === 0;
  renderGrid(others.map((m) => card(m, -1)), $("nearest-grid"));
}

function renderAnswerEvidence(record, top) {
  // the reasons for the answer, in words a non-specialist reads right
  const list = $("answer-evidence");
  list.replaceChildren();
  const say = (text) => { const li = document.createElement("li"); li.textContent = text; list.append(li); };
  if (!top) {
    const s = record.scores || {};
    if (s.sscd != null) {
      say(`The closest image scores ${s.sscd.toFixed(2)} on copy detection (SSCD), where copies score near 1 ` +
        "and unrelated photos near 0.");
    }
    return;
  }
  const extra = record.extra || {};
  if (extra.identical_file === top.id) say("The file is byte-for-byte the same as the indexed one (same SHA-256).");
  for (const line of matchEvidence(top, record.scores || {})) say(line);
  if (extra.sscd_view === "centre") say("Found by looking at the centre of your image (a photo inside a screenshot or frame).");
}

function matchEvidence(m, scores) {
  // one match's evidence, in words: its descriptor's score, and the record's other scores when it is the top match
  const out = [];
  const sscd = m.descriptor === "sscd" ? m.score : scores.sscd;
  const pdq = m.descriptor === "pdq" ? m.distance : scores.pdq_distance;
  if (sscd != null) {
    out.push(`Copy-detection similarity (SSCD) ${sscd.toFixed(2)} out of 1: copies score high, unrelated photos near 0.`);
  }
  // PDQ is evidence only when it is close (unrelated photos differ in about 128 of its 256 bits); edits such as a
  // crop move it far, which is what copy detection is for, so a far hash is not shown as if it argued against
  if (pdq != null && pdq <= 32) {
    out.push(pdq === 0 ? "Its perceptual hash (PDQ) is identical to yours."
      : `Its perceptual hash (PDQ) differs from yours in only ${pdq} of 256 bits (unrelated photos: about 128).`);
  }
  if (m.descriptor === "clip") out.push(`Meaning similarity (CLIP) ${m.score.toFixed(2)}: the same kind of content, not necessarily a copy.`);
  if (m.region) out.push("The copy covers the part of each image marked with a box.");
  return out;
}

function renderOptoutState() {
  // the opt-out state of the copies, and whether this server lets the owner opt out
  const copies = (state.scan && state.scan.copies) || [];
  const covered = copies.filter((m) => m.opted_out || state.scan.covered.has(m.id));
  const line = $("optout-state");
  line.replaceChildren();
  if (covered.length) {
    const badge = document.createElement("span");
    badge.className = "badge opted-out";
    badge.textContent = "opted out";
    const o = covered[0].opted_out;
    const who = o && o.claimant ? ` by ${o.claimant}` : "";
    line.append(badge, document.createTextNode(covered.length === copies.length
      ? ` Already opted out${who}: the registry asks that ${copies.length === 1 ? "this copy is" : "these copies are"} not used for training.`
      : ` ${covered.length} of the ${copies.length} copies are opted out${who}.`));
  }
  line.hidden = !covered.length;
  const h = state.health || {};
  const help = $("optout-help");
  let why = "";
  if (copies.length && !h.registry) why = "This server keeps no do-not-train registry, so it cannot take opt-outs.";
  else if (copies.length && !h.auth && !h.anonymous_writes) {
    why = "This server takes opt-outs only with an API key, and its operator has not set keys up." + contactText();
  }
  help.textContent = why;
  help.hidden = !why;
  $("optout-button").hidden = !copies.length || Boolean(why) || covered.length === copies.length;
}

function contactText() {
  const c = state.health && state.health.contact;
  return c ? ` Contact the operator: ${c}.` : " Ask the people who run this server.";
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
    // the detector's own flag (its threshold was chosen on data), not its raw probability, which reads as a
    // certainty it is not
    const flagged = wm.visible.flagged === true;
    const thorough = (wm.visible.input_sizes || []).includes(512) ? " (thorough check)" : "";
    addRow(list, "Visible watermark", (flagged
      ? "flagged: the detector sees a visible watermark; it can be wrong on busy photos"
      : "not flagged") + thorough, flagged);
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
      cards = body.matches.map((m) => ({ id: m.id, caption: m.caption, scoreLabel: scoreLabel(m), match: m, search: "text" }));
    } else {
      const body = await api(`/v1/search/caption?q=${encodeURIComponent(q)}&k=${SEARCH_K}`);
      // the BM25 score means nothing to a reader: the order says it, and the summary says how it was made
      cards = body.hits.map((h, i) => ({ id: h.id, caption: h.caption, scoreLabel: `#${i + 1}`, search: "caption" }));
    }
    const n = cards.length;
    $("results-summary").textContent = !n ? `No training images for \u201c${q}\u201d.`
      : mode === "text"
        ? `${n} training image${n === 1 ? "" : "s"} closest in meaning to \u201c${q}\u201d, closest first.`
        : `${n} training image${n === 1 ? "" : "s"} whose caption contains \u201c${q}\u201d, best first: ` +
          "captions where your words are a larger part of the text, and rarer words, rank higher.";
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
  state.scan = null;
  $("answer").hidden = true;
  $("evidence").hidden = true;
  $("nearest").hidden = true;
  $("grid").replaceChildren();
  $("nearest-grid").replaceChildren();
  $("grid-heading").hidden = true;
}

function renderGrid(cards, grid = $("grid")) {
  grid.replaceChildren();
  for (const card of cards) grid.append(renderCard(card));
}

function renderCard(card) {
  const { id, caption, scoreLabel: label, verdict, top, region, optedOut } = card;
  const li = document.createElement("li");
  li.className = "card" + (top ? " top-match" : "");
  li.dataset.id = id;
  // the whole card is one button: it opens the item's details (a dialog), never raw JSON
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card-button";
  button.setAttribute("aria-haspopup", "dialog");
  const img = document.createElement("img");
  img.alt = "";  // the button's text names the card; the details repeat the caption beside the image
  img.loading = "lazy";
  img.decoding = "async";
  img.width = 160;
  img.height = 120;
  img.addEventListener("error", () => {
    const placeholder = document.createElement("span");
    placeholder.className = "no-thumb";
    placeholder.textContent = "no thumbnail";
    img.replaceWith(placeholder);
  }, { once: true });
  setThumbnail(img, id);

  const body = document.createElement("span");
  body.className = "card-body";
  const cap = document.createElement("span");
  cap.className = "card-caption";
  cap.textContent = caption || "(no caption)";
  const score = document.createElement("span");
  score.className = "card-score";
  const strong = document.createElement("strong");
  strong.textContent = label;
  score.append(strong);
  if (verdict) {
    const badge = document.createElement("span");
    setBadge(badge, verdict);
    score.append(badge);
  }
  const marks = document.createElement("span");
  marks.className = "card-marks";
  const opted = document.createElement("span");
  opted.className = "badge opted-out";
  opted.textContent = "opted out";
  opted.hidden = !optedOut;
  marks.append(opted);
  const idLine = document.createElement("span");
  idLine.className = "card-id";
  idLine.textContent = id;
  body.append(cap, score, marks, idLine);
  button.append(img, body);
  button.addEventListener("click", () => openItem(card, button));
  li.append(button);
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
  // "novel" on a nearest image is not a finding: it says "not a copy", in grey
  el.className = "badge " + verdict;
  el.textContent = verdict === "novel" ? "not a copy" : verdict;
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

// ---------------------------------------------------------------------------- item details

const TRAINING_TEXT = {
  not_allowed: "Training not allowed", constrained: "Training allowed only under conditions",
  allowed: "Training allowed", unknown: "No do-not-train signal recorded",
};

function openDialog(dialog, opener) {
  // each dialog remembers what opened it: focus goes back there when it closes
  state.openers.set(dialog, opener || document.activeElement);
  if (!dialog.open) dialog.showModal();
}

async function openItem(card, opener) {
  const dialog = $("item-dialog");
  const body = $("item-body");
  body.replaceChildren();
  $("item-title").textContent = "Training image";
  const loading = document.createElement("p");
  loading.textContent = "Loading\u2026";
  body.append(loading);
  openDialog(dialog, opener);
  let item;
  try {
    item = await api(itemPath(card.id));  // with the key header when keys are on
  } catch (err) {
    loading.textContent = `${errorTitle(err)}: ${err.message}`;
    return;
  }
  if (!dialog.open) return;
  body.replaceChildren(renderItem(item, card));
  dialog.querySelector("[data-close]").focus();
}

function renderItem(item, card) {
  const frag = document.createDocumentFragment();
  const figure = document.createElement("figure");
  figure.className = "item-figure";
  const img = document.createElement("img");
  img.className = "item-image";
  img.alt = item.caption ? `Training image: ${item.caption}` : `Training image ${item.id}`;
  if (item.has_thumbnail) setThumbnail(img, item.id);
  else img.hidden = true;
  const cap = document.createElement("figcaption");
  cap.textContent = item.caption || "(no caption)";
  figure.append(img, cap);
  frag.append(figure);
  if (card.region) drawRegion(img, card.region);

  const extra = item.extra || {};
  const dl = document.createElement("dl");
  dl.className = "item-facts";
  const row = (term, value) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    if (value instanceof Node) dd.append(value); else dd.textContent = value;
    dl.append(dt, dd);
    return dd;
  };
  row("In the index", `${(state.health && state.health.index) || "this index"} \u00b7 ${item.id}` +
    (item.width ? ` \u00b7 ${item.width}\u00d7${item.height}` : ""));
  const licenseUrl = httpUrl(extra.license_url);
  row("License", item.license ? (licenseUrl ? link(item.license, licenseUrl) : item.license) : "not recorded");
  row("Author", firstText(extra, ["author", "creator", "artist", "photographer", "owner"]) || "not recorded");
  const origin = httpUrl(item.source) || httpUrl(extra.url) || httpUrl(extra.page_url) || httpUrl(extra.flickr_url) ||
    httpUrl(extra.coco_url);
  row("Origin", origin ? link(origin, origin) : "not recorded");

  const consent = extra.consent;
  const training = consent && consent.training ? consent.training : "unknown";
  const signals = consent && Array.isArray(consent.signals) ? consent.signals : [];
  row("Consent signals", TRAINING_TEXT[training] + (signals.length
    ? ": " + signals.map((g) => `${g.source} says \u201c${g.value}\u201d`).join("; ")
    : " for it in this index (its file's own signals, and its site's where the build read them)."));

  const h = state.health || {};
  const optedOut = item.opted_out || (card.match && card.match.opted_out);
  let optText;
  if (optedOut) {
    optText = document.createElement("span");
    const badge = document.createElement("span");
    badge.className = "badge opted-out";
    badge.textContent = "opted out";
    optText.append(badge, document.createTextNode(" " + describeOptout(optedOut)));
  } else optText = h.registry ? "Not opted out." : "This server keeps no do-not-train registry.";
  row("Opt-out", optText);

  const evidence = itemEvidence(card);
  if (evidence) row("Why it is shown", evidence);
  frag.append(dl);

  if (card.match && COPY.has(card.match.verdict) && !optedOut && !$("optout-button").hidden) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const b = document.createElement("button");
    b.type = "button";
    b.className = "primary";
    b.textContent = "This is my work: do not train";
    b.addEventListener("click", () => { $("item-dialog").close(); openOptout(); });
    actions.append(b);
    frag.append(actions);
  }
  return frag;
}

function itemEvidence(card) {
  if (card.search === "caption") return "Its caption contains your words.";
  if (card.search === "text") return `Close in meaning to your words (CLIP similarity ${card.match.score.toFixed(2)}).`;
  const m = card.match;
  if (!m) return null;
  const scores = state.scan && state.scan.copies[0] === m ? state.scan.record.scores || {} : {};
  const verdict = COPY.has(m.verdict) ? `${VERDICT_TEXT[m.verdict]} of your image.` : "Not a copy of your image: one of the nearest.";
  return [verdict, ...matchEvidence(m, scores)].join(" ");
}

function describeOptout(o) {
  const by = {
    content: "with a copy of the image (it and its copies)", id: "by its id", url: "by its URL",
    domain: `with everything from ${o.value}`,
  };
  const who = o.claimant ? ` Claimed by ${o.claimant}.` : "";
  const proof = o.by === "domain" ? (o.ownership === "shown" ? " Site ownership shown." : " Site ownership asserted, not shown.") : "";
  return `Opted out ${by[o.by] || ""}.${who}${proof}`;
}

function httpUrl(v) { return typeof v === "string" && /^https?:\/\//i.test(v) ? v : null; }

function firstText(obj, keys) {
  for (const k of keys) if (typeof obj[k] === "string" && obj[k].trim()) return obj[k].trim();
  return null;
}

function link(text, href) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

// ---------------------------------------------------------------------------- opt-out

async function openOptout() {
  const scan = state.scan;
  if (!scan || !scan.file) return;
  const h = state.health || {};
  $("optout-form").hidden = false;
  $("optout-done").hidden = true;
  $("optout-error").hidden = true;
  $("optout-confirm").checked = false;
  $("optout-submit").disabled = true;  // until the server has said what the opt-out covers
  $("optout-key-box").hidden = !h.auth;
  $("optout-key-help").textContent = h.auth
    ? "Opting out needs an API key with opt-out permission (the optout:write scope). A key that only reads " +
      "is not enough. Keys are given by the operator of this server, who checks who is asking." + contactText()
    : "";
  const coverage = $("optout-coverage");
  coverage.textContent = "Checking what this opt-out covers\u2026";
  openDialog($("optout-dialog"), $("optout-button").hidden ? null : $("optout-button"));
  const form = new FormData();
  form.append("file", scan.file, scan.file.name || "image");
  try {
    const p = await api("/v1/optout/preview", { method: "POST", body: form });
    scan.preview = p;
    coverage.replaceChildren(...coverageText(p));
    $("optout-submit").disabled = false;
  } catch (err) {
    coverage.textContent = "";
    showDialogError(errorTitle(err), err.message);
  }
}

function coverageText(p) {
  const n = p.covered;
  const lead = document.createElement("p");
  const strong = document.createElement("strong");
  strong.textContent = `${n} indexed cop${n === 1 ? "y" : "ies"} in the index \u201c${p.index}\u201d`;
  lead.append("This opt-out covers your image and ", strong,
    " (exact copies and edited replicas, as the scan judges them), and any copy indexed later.");
  const out = [lead];
  if (p.items.length) {
    const ul = document.createElement("ul");
    ul.className = "covered-list";
    for (const it of p.items) {
      const li = document.createElement("li");
      li.textContent = `${it.id} (${it.verdict})`;
      ul.append(li);
    }
    if (n > p.items.length) {
      const li = document.createElement("li");
      li.textContent = `and ${n - p.items.length} more`;
      ul.append(li);
    }
    out.push(ul);
  }
  const what = document.createElement("p");
  what.className = "hint";
  what.textContent = "Indexes built with the registry skip these images, and every scan marks them as opted out. " +
    "The claim is recorded with your name; the image itself is not stored, only its fingerprint.";
  out.push(what);
  if (p.already) {
    const already = document.createElement("p");
    already.textContent = "This image is already opted out. " + describeOptout(p.already);
    out.push(already);
  }
  return out;
}

function showDialogError(title, message) {
  const box = $("optout-error");
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  box.append(strong, document.createTextNode(message));
  box.hidden = false;
}

function optoutErrorTitle(err) {
  if (err.code === "unauthorized") return "This API key is not valid";
  if (err.code === "forbidden") return "This API key may only read";
  if (err.code === "writes_disabled") return "This server does not take opt-outs";
  if (err.code === "domain_proof_failed") return "Your site does not show the line yet";
  if (err.code === "invalid_optout") return "Check the website";
  return errorTitle(err);
}

async function submitOptout(event) {
  event.preventDefault();
  const scan = state.scan;
  $("optout-error").hidden = true;
  if (!$("optout-confirm").checked) {
    showDialogError("Please confirm", "Tick the box to say this is your work.");
    $("optout-confirm").focus();
    return;
  }
  const claimant = $("optout-claimant").value.trim();
  const domain = $("optout-domain").value.trim();
  const key = $("optout-key").value.trim() || apiKey();
  const quiet = { quietAuth: true };
  $("optout-submit").disabled = true;
  try {
    const form = new FormData();
    form.append("file", scan.file, scan.file.name || "image");
    if (claimant) form.append("claimant", claimant);
    const made = await api("/v1/optout", { method: "POST", body: form, ...quiet }, key);
    const o = made.optouts[0];
    let proof = null;
    if (domain) {
      proof = await api("/v1/optout", {
        method: "POST", headers: { "Content-Type": "application/json" }, ...quiet,
        body: JSON.stringify({ domains: [domain], claimant: claimant || null }),
      }, key);
    }
    state.optoutKey = key;
    const ids = (scan.preview ? scan.preview.items : []).map((it) => it.id);
    for (const id of ids) scan.covered.add(id);
    markOptedOut(ids, o);
    showOptoutDone(made.covered[o.id], proof);
  } catch (err) {
    showDialogError(optoutErrorTitle(err), err.message);
    $("optout-submit").disabled = false;
  }
}

function markOptedOut(ids, o) {
  // the copies the server said it covers carry the badge now; the next scan reads it from the server
  const reason = { optout: o.id, by: o.kind, value: o.value, claimant: o.claimant, ownership: o.ownership };
  for (const m of state.scan.copies) if (ids.includes(m.id) && !m.opted_out) m.opted_out = reason;
  for (const li of document.querySelectorAll("#grid li, #nearest-grid li")) {
    if (ids.includes(li.dataset.id)) li.querySelector(".badge.opted-out").hidden = false;
  }
  renderOptoutState();
}

function showOptoutDone(covered, proof) {
  const index = (state.scan.preview && state.scan.preview.index) || "the index";
  const n = covered == null ? "its" : `${covered}`;
  $("optout-done-text").textContent =
    `Opted out. Your image and ${n} cop${covered === 1 ? "y" : "ies"} in \u201c${index}\u201d are on the do-not-train registry.`;
  const box = $("domain-proof");
  box.hidden = !proof;
  if (proof) {
    const d = proof.optouts[0];
    const token = proof.domain_tokens[d.value];
    $("domain-proof-result").textContent = "";
    if (token) {
      $("domain-proof-text").textContent = `${d.value} is opted out, ownership asserted. To show the site is yours, ` +
        `publish this line in the file ${d.value}/.well-known/provenance-optout.txt (served over HTTPS), then check:`;
      $("domain-token").textContent = token;
      $("domain-token").hidden = false;
      $("domain-check").hidden = false;
      $("domain-check").dataset.domain = d.value;
    } else {
      $("domain-proof-text").textContent = `${d.value} is opted out; its ownership is already shown.`;
      $("domain-token").hidden = true;
      $("domain-check").hidden = true;
    }
  }
  $("optout-form").hidden = true;
  $("optout-done").hidden = false;
  $("optout-done-text").focus();
}

async function checkDomain() {
  const domain = $("domain-check").dataset.domain;
  const result = $("domain-proof-result");
  result.textContent = "Checking\u2026";
  try {
    const r = await api("/v1/optout", {
      method: "POST", headers: { "Content-Type": "application/json" }, quietAuth: true,
      body: JSON.stringify({ domains: [domain], prove: true }),
    }, state.optoutKey);
    result.textContent = r.optouts[0].ownership === "shown" ? `Done: ${domain} is shown to be yours.` : "Not shown yet.";
  } catch (err) {
    result.textContent = `${optoutErrorTitle(err)}: ${err.message}`;
  }
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
  $("optout-button").addEventListener("click", openOptout);
  $("match-details").addEventListener("click", () => {
    const m = state.scan && state.scan.copies[0];
    if (m) openItem({ id: m.id, caption: m.caption, match: m, region: m.region ? m.region.corpus : null }, $("match-details"));
  });
  $("optout-form").addEventListener("submit", submitOptout);
  $("domain-check").addEventListener("click", checkDomain);
  for (const dialog of document.querySelectorAll("dialog")) {
    dialog.addEventListener("click", (e) => { if (e.target.closest("[data-close]")) dialog.close(); });
    dialog.addEventListener("close", () => {
      // focus goes back where it was (Escape closes a modal dialog natively), unless another dialog is open now
      const back = state.openers.get(dialog);
      state.openers.delete(dialog);
      if (back && document.contains(back) && !document.querySelector("dialog[open]")) back.focus();
    });
  }
  loadHealth();
}

init();
