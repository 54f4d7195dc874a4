// The tcc web console: a page over the coordinator's JSON API (/api/...).
//
// Three views, chosen by the URL's fragment: the transaction list (#/),
// one transaction (#/txn/ID) and the endpoints (#/endpoints). Live updates
// come as Server-Sent Events, read with fetch (not EventSource) so that
// the bearer token can go in a header. Every value from the server is put
// on the page as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "tcc-console-token";
const PAGE_SIZE = 50;
const SUMMARY_EVERY_MS = 5000;

const $ = (id) => document.getElementById(id);

/// An element with attributes (`class`, `data-*`, `title`, ...) and
/// children (elements or text).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// ------------------------------------------------------------ the server

class ApiError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (token()) h.Authorization = `Bearer ${token()}`;
  return h;
}

/// The JSON answer of `path`, or an ApiError with the server's code and
/// message. A 401 shows the sign-in form.
async function api(path, options) {
  let res;
  try {
    res = await fetch(path, Object.assign({ headers: headers(options && options.headers) }, options));
  } catch (e) {
    throw new ApiError(0, "UNAVAILABLE", `the coordinator did not answer (${e.message})`);
  }
  let body = null;
  try {
    body = await res.json();
  } catch (_) {
    body = null;
  }
  if (!res.ok) {
    const code = (body && body.code) || `HTTP ${res.status}`;
    const message = (body && body.message) || res.statusText;
    if (res.status === 401) showLogin(message);
    throw new ApiError(res.status, code, message);
  }
  return body;
}

function post(path, body) {
  return api(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body || {}),
  });
}

/// Reads the Server-Sent Events of `path` until it ends or `signal`
/// aborts. Calls `on.open()` once the server has answered (it is
/// subscribed from then on), `on.data(object)` per `data:` event, and
/// `on.resync()` when the server says changes were skipped. Resolves when
/// the stream ends; rejects on an error (an `error` event included).
async function stream(path, signal, on) {
  const res = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!res.ok) {
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      body = null;
    }
    if (res.status === 401) showLogin(body && body.message);
    throw new ApiError(res.status, (body && body.code) || `HTTP ${res.status}`, (body && body.message) || "");
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  setLive(true);
  if (on.open) on.open();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length === 0) continue;
      if (event === "error") throw new ApiError(0, "STREAM", data.join("\n"));
      if (event === "resync") {
        if (on.resync) on.resync();
        continue;
      }
      try {
        on.data(JSON.parse(data.join("\n")));
      } catch (e) {
        console.error("bad event", e);
      }
    }
  }
}

/// Keeps `stream(path)` open while `signal` has not aborted: reconnects
/// after a second when it drops (unless `on.until()` says it is done), and
/// then calls `on.resync()`, since changes may have been missed meanwhile.
/// Returns a promise that resolves once the first connection is open (or
/// has failed): what is read after it misses no change.
function keepStreaming(path, signal, on) {
  let opened;
  const first = new Promise((resolve) => {
    opened = resolve;
  });
  signal.addEventListener("abort", () => opened());
  (async () => {
    let reconnected = false;
    while (!signal.aborted) {
      try {
        await stream(path, signal, {
          data: on.data,
          resync: on.resync,
          open: () => {
            opened();
            if (reconnected && on.resync) on.resync();
          },
        });
        if (on.until && on.until()) return;
      } catch (e) {
        if (signal.aborted) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          showError(e);
          setLive(false);
          opened();
          return;
        }
      }
      // A first try that failed: the page goes on without live updates
      // until a reconnection works.
      opened();
      reconnected = true;
      setLive(false);
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  })();
  return first;
}

// ------------------------------------------------------------ page parts

function setLive(on) {
  const live = $("live");
  live.textContent = on ? "live" : "reconnecting";
  live.className = on ? "live on" : "live off";
}

function showError(e) {
  const box = $("error");
  box.textContent = e instanceof Error ? e.message : String(e);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

function showLogin(message) {
  for (const v of ["view-list", "view-txn", "view-endpoints"]) $(v).hidden = true;
  $("login").hidden = false;
  if (message) $("login-why").textContent = message;
  $("token").focus();
}

function stateBadge(state) {
  return el("span", { class: `badge s-${state}` }, state);
}

function ago(ms, now) {
  if (!ms) return "";
  const s = Math.round(((now || Date.now()) - ms) / 1000);
  const abs = Math.abs(s);
  const text = abs < 60 ? `${abs} s` : abs < 3600 ? `${Math.floor(abs / 60)} min` : abs < 86400 ? `${Math.floor(abs / 3600)} h` : `${Math.floor(abs / 86400)} d`;
  return s >= 0 ? `${text} ago` : `in ${text}`;
}

function when(ms) {
  return ms ? el("span", { title: new Date(ms).toISOString() }, ago(ms)) : el("span", { class: "muted" }, "—");
}

function duration(ms) {
  if (ms === null || ms === undefined) return "none";
  const s = Math.round(ms / 1000);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// ---------------------------------------------------------------- summary

let summaryTimer = null;

async function refreshSummary() {
  try {
    const s = await api("/api/summary");
    $("meta").textContent = `v${s.version} · ${s.access === "policy" ? "policy enforced" : "open access"}`;
    const counts = $("counts");
    const order = ["ACTIVE", "CONFIRMING", "CANCELLING", "FAILED_TO_CONFIRM", "FAILED_TO_CANCEL"];
    const entries = Object.entries(s.counts).sort(([a], [b]) => order.indexOf(a) - order.indexOf(b));
    counts.replaceChildren(
      ...entries.map(([state, n]) =>
        el("a", { class: `count s-${state}`, href: "#/", title: `show ${state}`, "data-filter": state },
          el("span", { class: "count-label" }, state), " ",
          el("span", { class: "count-n", "data-count-state": state }, n))));
    $("oldest").textContent = `oldest unfinished: ${duration(s.oldest_unfinished_age_ms)}`;
    $("metrics").replaceChildren(
      ...s.metrics.map((m) => el("span", { class: "metric", title: `${m.name}: ${m.help}` },
        m.name.replace(/^tcc_/, "").replace(/_total$/, ""), " ", el("b", {}, Math.round(m.value)))));
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) showError(e);
  }
}

function summarySoon() {
  if (summaryTimer) return;
  summaryTimer = setTimeout(() => {
    summaryTimer = null;
    refreshSummary();
  }, 500);
}

// ---------------------------------------------------------- list of txns

const filters = { states: "", minAgeMs: 0, service: "" };
/// The rows shown, by transaction id (each row keeps its version).
let listRows = new Map();
let nextToken = "";
/// The newest page request: answers to older ones are dropped.
let loadSeq = 0;
/// While the first page is read: the changes streamed meanwhile (by id,
/// the newest of each), which may be newer than what the page says.
let meanwhile = null;

function onListChange(t) {
  if (meanwhile) {
    const seen = meanwhile.get(t.transaction_id);
    if (!seen || seen.version < t.version) meanwhile.set(t.transaction_id, t);
  }
  upsertRow(t);
}

function filterQuery() {
  const q = new URLSearchParams();
  if (filters.states) q.set("states", filters.states);
  if (filters.minAgeMs) q.set("min_age_ms", String(filters.minAgeMs));
  if (filters.service) q.set("service", filters.service);
  q.set("page_size", String(PAGE_SIZE));
  return q;
}

function matches(t) {
  if (filters.states && !filters.states.split(",").includes(t.state)) return false;
  if (filters.service && !t.participants.some((p) => p.service === filters.service)) return false;
  if (filters.minAgeMs && Date.now() - t.created_ms < filters.minAgeMs) return false;
  return true;
}

function txnRow(t) {
  return el("tr", { class: "txn-row", "data-txn-id": t.transaction_id, "data-version": t.version },
    el("td", {}, el("a", { class: "txn-link", href: `#/txn/${t.transaction_id}` }, el("code", {}, t.transaction_id))),
    el("td", { class: "state" }, stateBadge(t.state)),
    el("td", { class: "services" }, t.participants.map((p) =>
      el("span", { class: `svc p-${p.status}`, title: `${p.service}: ${p.status}${p.last_error ? ` (${p.last_error})` : ""}` }, p.service))),
    el("td", {}, when(t.created_ms)),
    el("td", {}, t.state === "ACTIVE" ? when(t.deadline_ms) : el("span", { class: "muted" }, "—")),
    el("td", { class: "reason" }, t.reason));
}

/// Puts `t` in the list: replaces its row if it is there and older (even
/// if it no longer matches the filters: the operator sees what became of
/// it); adds it at the end if it matches them and the list is complete.
function upsertRow(t) {
  const tbody = $("txns").tBodies[0];
  const old = listRows.get(t.transaction_id);
  if (old) {
    if (Number(old.dataset.version) >= t.version) return;
    const row = txnRow(t);
    old.replaceWith(row);
    listRows.set(t.transaction_id, row);
    return;
  }
  if (nextToken || !matches(t)) return;
  const row = txnRow(t);
  tbody.append(row);
  listRows.set(t.transaction_id, row);
  $("list-empty").hidden = true;
}

/// Reads the first page (`first`: the list starts again) or the next one.
async function loadPage(first) {
  const seq = ++loadSeq;
  const q = filterQuery();
  if (!first && nextToken) q.set("page_token", nextToken);
  if (first) meanwhile = new Map();
  const page = await api(`/api/transactions?${q}`);
  if (seq !== loadSeq) return;
  const newer = first ? meanwhile : new Map();
  const tbody = $("txns").tBodies[0];
  if (first) {
    meanwhile = null;
    tbody.replaceChildren();
    listRows = new Map();
  }
  for (const read of page.transactions) {
    const streamed = newer.get(read.transaction_id);
    const t = streamed && streamed.version > read.version ? streamed : read;
    const old = listRows.get(t.transaction_id);
    if (old && Number(old.dataset.version) >= t.version) continue;
    const row = txnRow(t);
    if (old) old.replaceWith(row);
    else tbody.append(row);
    listRows.set(t.transaction_id, row);
  }
  nextToken = page.next_page_token;
  // Transactions begun while the page was read.
  for (const t of newer.values()) upsertRow(t);
  $("more").hidden = !nextToken;
  $("list-empty").hidden = listRows.size > 0 || Boolean(nextToken);
}

async function showList(signal) {
  $("view-list").hidden = false;
  $("filter-state").value = filters.states;
  $("filter-age").value = filters.minAgeMs ? String(filters.minAgeMs / 1000) : "";
  $("filter-service").value = filters.service;
  // Subscribed before the list is read; versions keep the newest. When
  // changes were skipped (the stream fell behind, or reconnected), the
  // first page is read again, at most once a second.
  let reloading = null;
  const resync = () => {
    if (reloading) return;
    reloading = setTimeout(() => {
      reloading = null;
      if (!signal.aborted) loadPage(true).catch(showError);
    }, 1000);
  };
  await keepStreaming("/api/watch", signal, {
    data: (t) => {
      onListChange(t);
      summarySoon();
    },
    resync,
  });
  if (!signal.aborted) await loadPage(true);
}

// --------------------------------------------------------- one transaction

/// The transaction on the page: its id, and the newest record of it.
let shownId = null;
let shown = null;

function fact(name, value) {
  return el("div", { class: "fact" }, el("dt", {}, name), el("dd", {}, value));
}

function renderTxn(t) {
  if (t.transaction_id !== shownId || (shown && shown.version > t.version)) return;
  shown = t;
  $("txn-id").textContent = t.transaction_id;
  const state = $("txn-state");
  state.textContent = t.state;
  state.className = `state badge s-${t.state}`;
  $("txn-facts").replaceChildren(
    fact("Owner", t.owner || el("span", { class: "muted" }, "none (open access)")),
    fact("Created", when(t.created_ms)),
    fact("Deadline", t.state === "ACTIVE" ? when(t.deadline_ms) : el("span", { class: "muted" }, "decided")),
    fact("Decided", when(t.decided_ms)),
    fact("Finished", when(t.finished_ms)),
    fact("Reason", t.reason || el("span", { class: "muted" }, "—")),
    fact("Version", t.version));
  $("action-retry").hidden = !t.state.startsWith("FAILED_");
  $("action-cancel").hidden = t.state !== "ACTIVE";
  $("action-deliver").hidden = !(t.state === "CONFIRMING" || t.state === "CANCELLING");
  $("participants").tBodies[0].replaceChildren(...t.participants.map((p) =>
    el("tr", { "data-service": p.service },
      el("td", { class: "service" }, p.service),
      el("td", {}, el("code", {}, p.partial_id)),
      el("td", { class: "status" }, el("span", { class: `badge p-${p.status}` }, p.status)),
      el("td", { class: "attempts" }, p.attempts),
      el("td", { class: "last-error" }, p.last_error),
      el("td", {}, p.next_attempt_ms ? when(p.next_attempt_ms) : el("span", { class: "muted" }, "—")),
      el("td", {}, `${p.command_count} (${p.topic_bytes} B)`),
      el("td", {}, p.status === "FAILED"
        ? el("button", { type: "button", class: "resolve", "data-service": p.service }, "Resolve by hand")
        : null))));
  $("history").replaceChildren(...t.history.map((h) =>
    el("li", {}, el("span", { class: "at", title: new Date(h.at_ms).toISOString() }, new Date(h.at_ms).toLocaleTimeString()),
      " ", stateBadge(h.state), " ", h.cause)));
}

function renderCommands(topics) {
  const out = $("topics");
  const entries = Object.entries(topics);
  if (entries.length === 0) {
    out.replaceChildren(el("p", { class: "muted" }, "no topic"));
    return;
  }
  out.replaceChildren(...entries.map(([service, topic]) =>
    el("div", { class: "topic", "data-service": service },
      el("h4", {}, service, topic.truncated ? el("span", { class: "muted" }, " (first commands only)") : null),
      topic.commands.length === 0
        ? el("p", { class: "muted" }, "no command")
        : el("table", { class: "cmds" },
          el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "Type"), el("th", {}, "Key"), el("th", {}, "Size"), el("th", {}, "Payload"))),
          el("tbody", {}, topic.commands.map((c) => el("tr", {},
            el("td", {}, c.sequence),
            el("td", {}, el("code", {}, c.type)),
            el("td", {}, c.key),
            el("td", {}, `${c.size} B`),
            el("td", {}, payload(c)))))))));
}

function payload(c) {
  if (c.payload_json !== null && c.payload_json !== undefined) {
    return el("pre", { class: "json" }, JSON.stringify(c.payload_json, null, 2));
  }
  if (c.payload_text !== null && c.payload_text !== undefined) return el("pre", { class: "text" }, c.payload_text);
  const more = c.size * 2 > c.payload_hex.length ? " …" : "";
  return el("pre", { class: "hex", title: "not text: shown as hex" }, c.payload_hex.replace(/(..)/g, "$1 ").trim() + more);
}

async function showTxn(id, signal) {
  $("view-txn").hidden = false;
  shownId = id;
  shown = null;
  const detail = await api(`/api/transactions/${encodeURIComponent(id)}`);
  if (signal.aborted) return;
  renderTxn(detail);
  renderCommands(detail.commands);
  // The stream starts with the current state, so a reconnection misses
  // nothing.
  keepStreaming(`/api/watch?transaction_id=${encodeURIComponent(id)}`, signal, {
    data: (t) => {
      renderTxn(t);
      summarySoon();
    },
    until: () => shown && (shown.state === "CONFIRMED" || shown.state === "CANCELLED"),
  });
}

// ---------------------------------------------------------------- actions

/// Asks before acting: `text`, an optional reason (required when
/// `needReason`); on OK runs `act(reason)`, whose answer (the
/// transaction) is shown.
function confirmAction(text, okLabel, reasonLabel, needReason, act) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  $("confirm-reason-label").hidden = !reasonLabel;
  $("confirm-reason-label").firstChild.textContent = `${reasonLabel || "Reason"} `;
  $("confirm-reason").value = "";
  $("confirm-error").hidden = true;
  $("confirm-ok").onclick = async () => {
    const reason = $("confirm-reason").value.trim();
    if (needReason && !reason) {
      $("confirm-error").textContent = "Say why: the reason is kept in the transaction's history.";
      $("confirm-error").hidden = false;
      return;
    }
    $("confirm-ok").disabled = true;
    try {
      const t = await act(reason);
      dialog.close();
      clearError();
      renderTxn(t);
      summarySoon();
    } catch (e) {
      $("confirm-error").textContent = e.message;
      $("confirm-error").hidden = false;
    } finally {
      $("confirm-ok").disabled = false;
    }
  };
  dialog.showModal();
}

function actionPath(id, action) {
  return `/api/transactions/${encodeURIComponent(id)}/${action}`;
}

function wireActions() {
  $("confirm-back").addEventListener("click", () => $("confirm").close());
  // Each action names the transaction shown when it was asked for, not
  // whatever is shown when OK is pressed.
  $("action-retry").addEventListener("click", () => {
    const id = shown.transaction_id;
    const failed = shown.participants.filter((p) => p.status === "FAILED").map((p) => p.service);
    confirmAction(
      `Retry transaction ${id}? Its failed participants (${failed.join(", ")}) are called again with the same decision.`,
      "Retry", null, false, () => post(actionPath(id, "retry")));
  });
  $("action-cancel").addEventListener("click", () => {
    const id = shown.transaction_id;
    confirmAction(
      `Cancel transaction ${id}? Every participant rolls back; this cannot be undone.`,
      "Cancel the transaction", "Reason (optional)", false, (reason) => post(actionPath(id, "cancel"), { reason }));
  });
  $("action-deliver").addEventListener("click", () => {
    const id = shown.transaction_id;
    confirmAction(
      `Deliver transaction ${id} now? Its pending participants are called at once, skipping what is left of their backoff.`,
      "Deliver now", null, false, () => post(actionPath(id, "deliver-now")));
  });
  $("participants").addEventListener("click", (ev) => {
    const button = ev.target.closest("button.resolve");
    if (!button) return;
    const id = shown.transaction_id;
    const service = button.dataset.service;
    confirmAction(
      `Resolve ${service} in transaction ${id} by hand? Say what was done: the coordinator will not call ${service} again for it.`,
      "Resolve", "Reason (required)", true, (reason) => post(actionPath(id, "resolve"), { service, reason }));
  });
  // Leaving the page closes the question.
  window.addEventListener("hashchange", () => {
    if ($("confirm").open) $("confirm").close();
  });
}

// ---------------------------------------------------------------- endpoints

async function showEndpoints() {
  $("view-endpoints").hidden = false;
  const list = await api("/api/endpoints");
  $("endpoints").tBodies[0].replaceChildren(...list.endpoints.map((e) =>
    el("tr", { "data-service": e.service },
      el("td", {}, e.service),
      el("td", {}, el("code", {}, e.endpoint)),
      el("td", {}, e.from_config ? "configured (--participant)" : "registered"),
      el("td", {}, e.expires_ms ? when(e.expires_ms) : el("span", { class: "muted" }, "no lease")),
      el("td", { class: "health" }, e.healthy
        ? el("span", { class: "badge p-ACKNOWLEDGED" }, "healthy")
        : el("span", { class: "badge p-FAILED" }, `failing (${e.consecutive_failures} in a row)`)))));
  $("endpoints-empty").hidden = list.endpoints.length > 0;
}

// ------------------------------------------------------------------ routing

let current = null;

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  $("login").hidden = true;
  for (const v of ["view-list", "view-txn", "view-endpoints"]) $(v).hidden = true;
  $("logout").hidden = !token();
  const hash = location.hash.replace(/^#/, "") || "/";
  try {
    if (hash.startsWith("/txn/")) await showTxn(decodeURIComponent(hash.slice(5)), signal);
    else if (hash === "/endpoints") await showEndpoints();
    else await showList(signal);
    clearError();
  } catch (e) {
    if (!signal.aborted && !(e instanceof ApiError && e.status === 401)) showError(e);
  }
}

function start() {
  wireActions();
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    filters.states = $("filter-state").value;
    const age = Number($("filter-age").value || "0");
    filters.minAgeMs = Number.isFinite(age) && age > 0 ? Math.round(age * 1000) : 0;
    filters.service = $("filter-service").value.trim();
    loadPage(true).then(clearError, showError);
  });
  $("more").addEventListener("click", () => loadPage(false).catch(showError));
  $("search-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = $("search").value.trim();
    if (!q) return;
    try {
      const found = await api(`/api/search?q=${encodeURIComponent(q)}`);
      location.hash = `#/txn/${found.transaction_id}`;
    } catch (e) {
      showError(e);
    }
  });
  $("counts").addEventListener("click", (ev) => {
    const link = ev.target.closest("a[data-filter]");
    if (!link) return;
    filters.states = link.dataset.filter;
    if (location.hash === "#/" || location.hash === "") {
      ev.preventDefault();
      route();
    }
  });
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    refreshSummary();
    route();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  window.addEventListener("hashchange", route);
  refreshSummary();
  setInterval(refreshSummary, SUMMARY_EVERY_MS);
  route();
}

document.addEventListener("DOMContentLoaded", start);
