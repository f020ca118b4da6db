// The API page: lists this server's endpoints from its own OpenAPI document. No dependencies,
// no external requests; the document is fetched with the API key in the X-API-Key header (the
// search page's key, kept in this browser's localStorage), never with the key in a URL.
"use strict";
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function schemaLine(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.properties) {
    const req = new Set(schema.required || []);
    return "{ " + Object.entries(schema.properties).map(([k, v]) =>
      `${k}${req.has(k) ? "" : "?"}: ${v.type || (v.$ref ? v.$ref.split("/").pop() : "any")}`).join(", ") + " }";
  }
  return schema.type || "";
}

function render(spec) {
  const box = $("endpoints");
  box.replaceChildren();
  $("info").textContent = `${spec.info.title} ${spec.info.version}`;
  box.append(el("p", spec.info.description || ""));
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const card = el("section", undefined, "endpoint");
      card.dataset.path = path;
      card.append(el("h2", `${method.toUpperCase()} ${path}`));
      if (op.summary) card.append(el("p", op.summary, "muted"));
      if (op.description) card.append(el("p", op.description));
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        for (const [type, c] of Object.entries(body)) card.append(el("p", `body ${type}: ${schemaLine(c.schema)}`, "muted"));
      }
      const codes = Object.entries(op.responses || {}).map(([code, r]) => `${code} ${r.description || ""}`.trim());
      if (codes.length) card.append(el("p", `answers: ${codes.join("; ")}`, "muted"));
      box.append(card);
    }
  }
}

async function load() {
  const key = $("key").value.trim();
  const st = $("status");
  try {
    const res = await fetch("openapi.json", { headers: key ? { "X-API-Key": key } : {} });
    const body = await res.json();
    if (res.status === 401) {
      $("key-box").hidden = false;
      st.textContent = "this server needs its API key: enter it above";
      return;
    }
    if (!res.ok) throw new Error(`${res.status}: ${body.detail || res.statusText}`);
    st.textContent = "";
    render(body);
    document.body.dataset.state = "done";
  } catch (e) {
    st.textContent = `cannot read the OpenAPI document (${e.message})`;
    document.body.dataset.state = "error";
  }
}

$("key").value = localStorage.getItem("clipforge-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("clipforge-key", $("key").value.trim()); load(); });
load();
