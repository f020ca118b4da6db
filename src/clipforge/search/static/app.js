// clipforge search page: no dependencies, no external requests; talks to this server only.
// The API key (when the server asks for one) is sent in the X-API-Key header only, never in a
// URL (URLs land in access logs and browser history): thumbnails are fetched with the header
// and shown from blob: URLs.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let clsFile = null;
let lastQuery = null;  // what the shown results answer: {text} or {file}; their maps explain it

function apiKey() { return $("key").value.trim(); }
function authHeaders() { const k = apiKey(); return k ? { "X-API-Key": k } : {}; }
function setState(s) { document.body.dataset.state = s; }
function status(el, text, error) {
  el.textContent = text;
  if (error) el.dataset.error = "1"; else delete el.dataset.error;
}

async function call(path, options) {
  const res = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : res.statusText;
    throw new Error(`${res.status}: ${detail}`);
  }
  return body;
}

function kValue() { return Math.max(1, Math.min(200, parseInt($("k").value, 10) || 12)); }
function filterValue() {
  const raw = $("filter").value.trim();
  if (!raw) return null;
  try { return JSON.parse(raw); } catch (_) { throw new Error("the filter is not valid JSON"); }
}

let thumbGeneration = 0;  // a newer search abandons the thumbnails still loading for an older one

async function loadThumb(img, id, generation) {
  try {
    const res = await fetch(`thumbnail/${encodeURIComponent(id)}`, { headers: authHeaders() });
    if (!res.ok || generation !== thumbGeneration) return;
    const url = URL.createObjectURL(await res.blob());
    img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
    img.addEventListener("error", () => URL.revokeObjectURL(url), { once: true });
    img.src = url;
  } catch (_) { /* no thumbnail: the card still shows the score and name */ }
}

function render(results) {
  const grid = $("results");
  grid.replaceChildren();
  const generation = ++thumbGeneration;
  for (const r of results) {
    const card = document.createElement("figure");
    card.className = "result";
    card.dataset.id = r.id;
    card.dataset.path = r.path;
    card.dataset.score = r.score;
    const img = document.createElement("img");
    img.alt = r.caption || r.path;
    loadThumb(img, r.id, generation);
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = r.caption || r.path.split("/").pop();
    name.title = r.path;
    meta.append(score, name, explainToggle(img, () => {
      const form = new FormData();
      form.append("id", String(r.id));
      if (lastQuery && lastQuery.file) form.append("query_image", lastQuery.file, lastQuery.file.name || "image");
      else form.append("text", lastQuery ? lastQuery.text : "");
      return form;
    }));
    card.append(img, meta);
    grid.append(card);
  }
}

async function runSearch(build, label) {
  const st = $("status");
  setState("busy");
  status(st, `searching ${label}…`);
  $("search-btn").disabled = true;
  try {
    const t0 = performance.now();
    const body = await call("search", build());
    render(body.results);
    status(st, `${body.results.length} results for ${label} in ${Math.round(performance.now() - t0)} ms`);
    setState("done");
  } catch (e) {
    render([]);
    status(st, e.message, true);
    setState("error");
  } finally {
    $("search-btn").disabled = false;
  }
}

// A toggle that swaps ``img`` between what it shows and the explanation map the server draws for
// ``buildForm()``'s request (fetched once, on the first click). Several toggles may share one
// image (the classifier's labels): the last one clicked shows its map.
function explainToggle(img, buildForm) {
  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = "explain-toggle";
  btn.textContent = "why?";
  btn.title = "show where the model finds the query in this image";
  let mapUrl = null;
  btn.addEventListener("click", async (e) => {
    e.stopPropagation();
    if (img.activeToggle === btn) {
      img.src = img.dataset.original; img.dataset.explained = "0"; img.activeToggle = null;
      btn.textContent = "why?"; return;
    }
    btn.disabled = true;
    try {
      if (!mapUrl) {
        const res = await fetch("explain", { method: "POST", body: buildForm(), headers: authHeaders() });
        if (!res.ok) {
          let detail = res.statusText;
          try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
          throw new Error(`${res.status}: ${detail}`);
        }
        btn.dataset.method = res.headers.get("X-Explain-Method") || "";
        mapUrl = URL.createObjectURL(await res.blob());
      }
      if (img.activeToggle) img.activeToggle.textContent = "why?";
      else img.dataset.original = img.src;
      img.activeToggle = btn;
      img.src = mapUrl; img.dataset.explained = "1"; btn.textContent = "image";
    } catch (err) {
      btn.title = err.message; btn.textContent = "no map";
    } finally {
      btn.disabled = false;
    }
  });
  return btn;
}

function searchText(text) {
  lastQuery = { text };
  return runSearch(() => {
    const body = { text, k: kValue() };
    const f = filterValue();
    if (f) body.filter = f;
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }, `“${text}”`);
}

function searchImage(file) {
  lastQuery = { file };
  return runSearch(() => {
    const form = new FormData();
    form.append("image", file, file.name || "image");
    form.append("k", String(kValue()));
    const f = filterValue();
    if (f) form.append("filter", JSON.stringify(f));
    return { method: "POST", body: form };
  }, `image ${file.name || ""}`.trim());
}

function wireDrop(zone, input, onFile) {
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { if (input.files.length) onFile(input.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) onFile(f);
  });
}

function setClassifyImage(file) {
  clsFile = file;
  $("cls-name").textContent = file.name || "image";
  const img = $("cls-preview");
  img.activeToggle = null;  // maps of the previous image no longer apply
  img.dataset.explained = "0";
  $("cls-results").replaceChildren();
  img.src = URL.createObjectURL(file);
  img.hidden = false;
}

async function classify() {
  const st = $("cls-status");
  const list = $("cls-results");
  if (!clsFile) { status(st, "choose an image first", true); return; }
  const labels = $("labels").value.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
  if (!labels.length) { status(st, "give at least one label", true); return; }
  const templates = $("templates").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const form = new FormData();
  form.append("image", clsFile, clsFile.name || "image");
  for (const l of labels) form.append("labels", l);
  for (const t of templates) form.append("templates", t);
  setState("busy");
  status(st, "classifying…");
  $("classify-btn").disabled = true;
  try {
    const body = await call("classify", { method: "POST", body: form });
    list.replaceChildren();
    for (const r of body.results) {
      const li = document.createElement("li");
      li.className = "label-row";
      li.dataset.label = r.label;
      li.dataset.probability = r.probability;
      li.textContent = `${r.label} — ${(100 * r.probability).toFixed(1)}%`;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * r.probability).toFixed(1)}%`;
      const file = clsFile;
      li.append(explainToggle($("cls-preview"), () => {
        const form = new FormData();
        form.append("image", file, file.name || "image");
        form.append("label", r.label);
        for (const t of templates) form.append("templates", t);
        return form;
      }), bar);
      list.append(li);
    }
    status(st, `${body.templates.length} template(s)`);
    setState("done");
  } catch (e) {
    list.replaceChildren();
    status(st, e.message, true);
    setState("error");
  } finally {
    $("classify-btn").disabled = false;
  }
}

async function init() {
  $("key").value = localStorage.getItem("clipforge-key") || "";
  $("key").addEventListener("change", () => localStorage.setItem("clipforge-key", apiKey()));
  if (params.get("k")) $("k").value = params.get("k");
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("query").value.trim();
    if (q) searchText(q);
  });
  $("classify-form").addEventListener("submit", (e) => { e.preventDefault(); classify(); });
  wireDrop($("drop"), $("drop-file"), searchImage);
  wireDrop($("cls-drop"), $("cls-file"), setClassifyImage);
  try {
    const h = await call("health", { method: "GET" });
    $("info").textContent = `${h.items} images · ${h.index} index · model ${h.model}`;
    $("key-box").hidden = !h.auth;
  } catch (e) {
    $("info").textContent = `server unreachable (${e.message})`;
  }
  const q = params.get("q");
  if (q) { $("query").value = q; await searchText(q); }
}

init();
