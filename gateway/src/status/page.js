// The status page: asks for the API key, keeps it in this variable only
// (never in the URL, a cookie or storage), and polls GET v1/status with it.
"use strict";

const REFRESH_MS = 1000;
const TIMEOUT_MS = 5000;

let key = null;
let timer = null;
let generation = 0;

const $ = (id) => document.getElementById(id);

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function age(seconds) {
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function render(status) {
  const gw = status.gateway;
  $("summary").textContent =
    `${gw.spawner} runners, sandbox ${gw.sandbox}, up ${age(gw.uptime_seconds)}, v${gw.version}` +
    (gw.draining ? " — draining" : "");
  const clients = status.sessions.filter((s) => s.purpose === "client").length;
  $("count-sessions").textContent = clients;
  $("count-max").textContent = `of ${gw.max_sessions} (MAX_SESSIONS, with warm runners)`;
  $("count-runners").textContent = status.runners.total;
  $("runner-kind").textContent =
    `${status.runners.kind}; ${status.runners.connected} connected, ${status.runners.single_request} single-request`;
  $("count-pool").textContent = `${status.pool.ready} / ${status.pool.target}`;
  $("pool-detail").textContent =
    `ready; ${status.pool.claims} claims, ${status.pool.misses} misses, ${status.pool.recycled} recycled`;
  $("count-in-flight").textContent = gw.requests_in_flight;
  $("gateway-detail").textContent = gw.draining ? "draining" : "serving";
  $("api-budget").textContent = status.platform_api_budget == null ? "n/a" : status.platform_api_budget;

  const rows = status.sessions.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.session = s.id;
    tr.append(
      cell(s.id, "id"),
      cell(s.purpose),
      cell(s.state, `state-${s.state}`),
      cell(age(s.age_seconds)),
      cell(s.calls),
      cell(s.in_flight),
      cell(s.transport),
      cell(s.server || "default"),
      cell(s.runner),
    );
    return tr;
  });
  $("sessions").tBodies[0].replaceChildren(...rows);
  $("no-sessions").hidden = rows.length > 0;

  const errors = status.recent_errors.map((e) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(`${age(Math.max(0, (status.now_unix_ms - e.at_unix_ms) / 1000))} ago`),
      cell(e.code),
      cell(e.method),
      cell(e.session, "id"),
      cell(e.message, "message"),
    );
    return tr;
  });
  $("errors").tBodies[0].replaceChildren(...errors);
  $("no-errors").hidden = errors.length > 0;
}

async function refresh(mine) {
  const abort = new AbortController();
  const deadline = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    const response = await fetch("v1/status", { headers, cache: "no-store", credentials: "omit", signal: abort.signal });
    if (mine !== generation) return;
    if (response.status === 401) {
      forget("The gateway refused that key.");
      return;
    }
    if (!response.ok) throw new Error(`the gateway answered ${response.status}`);
    const status = await response.json();
    if (mine !== generation) return;
    render(status);
    $("fetch-error").textContent = "";
    $("live").className = "on";
    $("status").hidden = false;
    $("key-form").hidden = true;
    $("forget").hidden = false;
  } catch (error) {
    if (mine !== generation) return;
    $("live").className = "off";
    $("fetch-error").textContent = `Cannot refresh: ${error.message}. Retrying.`;
  } finally {
    clearTimeout(deadline);
  }
  if (mine === generation) timer = setTimeout(() => refresh(mine), REFRESH_MS);
}

function forget(message) {
  generation += 1;
  clearTimeout(timer);
  key = null;
  $("status").hidden = true;
  $("forget").hidden = true;
  $("key-form").hidden = false;
  $("live").className = "";
  $("form-error").textContent = message || "";
  $("key").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value;
    $("key").value = "";
    $("form-error").textContent = "";
    generation += 1;
    clearTimeout(timer);
    refresh(generation);
  });
  $("forget").addEventListener("click", () => forget(""));
  $("key").focus();
});
