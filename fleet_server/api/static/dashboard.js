/* edge-fleet dashboard: fetches the JSON API every few seconds and fills the page.
 * The viewer's token (read or admin) lives in sessionStorage only and is sent as a bearer header.
 * Data is always inserted with textContent, never as HTML. */
"use strict";
(() => {
  const TOKEN_KEY = "edge-fleet.token";
  const body = document.body;
  const params = new URLSearchParams(window.location.search);
  const refreshParam = Number(params.get("refresh"));
  const refreshSeconds = refreshParam >= 0.5 && refreshParam <= 300 ? refreshParam : Number(body.dataset.refresh) || 5;

  // --- small helpers -----------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  function node(tag, text, cls) {
    const n = document.createElement(tag);
    if (text !== undefined && text !== null) n.textContent = String(text);
    if (cls) n.className = cls;
    return n;
  }
  function link(href, text, cls) { const a = node("a", text, cls); a.href = href; return a; }
  function setText(id, text) { const n = $(id); if (n) n.textContent = text === null || text === undefined || text === "" ? "–" : String(text); }
  function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); return n; }
  function when(ts) {
    if (typeof ts !== "number") return "–";
    return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }
  function ago(ts) {
    if (typeof ts !== "number") return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }
  function pill(text, kind) { return node("span", text, `pill ${kind || ""}`); }
  function statePill(state) {
    const s = state || "unknown";
    const kind = {in_sync: "ok", applied: "ok", succeeded: "ok", running: "info", syncing: "info",
      failed: "bad", refused: "bad", rolled_back: "warn", drifted: "warn", halted: "bad",
      paused: "warn", waiting_approval: "warn", rolling_back: "warn", aborted: "muted",
      superseded: "muted", pending: "muted", sync_succeeded: "ok", sync_failed: "bad", sync_refused: "bad",
      sync_rolled_back: "warn", drift_detected: "warn", drift_corrected: "ok", resumed: "info"}[s] || "muted";
    return pill(s, kind);
  }
  function onlinePill(online) { return online ? pill("online", "ok") : pill("offline", "muted"); }
  function status(text, kind) { const n = $("status-line"); n.textContent = text || ""; n.className = `status-line ${kind || ""}`; }

  // --- token -------------------------------------------------------------------------------------
  function token() { return window.sessionStorage.getItem(TOKEN_KEY) || ""; }
  function showToken() {
    const held = token() !== "";
    $("token-state").textContent = held ? "token held" : "read-only";
    $("token-state").className = `token-state ${held ? "held" : ""}`;
    $("token-forget").hidden = !held;
    $("token-input").hidden = held;
    $("token-use").hidden = held;
    document.querySelectorAll("[data-needs-token]").forEach((n) => { n.hidden = !held; });
    const ro = $("actions-readonly"); if (ro) ro.hidden = held;
    const controls = $("action-controls"); if (controls) controls.hidden = !held;
    if (ro && body.dataset.adminConfigured !== "true") {
      ro.hidden = false;
      ro.textContent = "Read-only: this server has no admin token configured, so it takes no operator action.";
      if (controls) controls.hidden = true;
    }
  }
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token-input").value.trim();
    if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    showToken(); refreshNow();
  });
  $("token-forget").addEventListener("click", () => {
    window.sessionStorage.removeItem(TOKEN_KEY); showToken(); refreshNow();
  });

  // --- API ---------------------------------------------------------------------------------------
  async function api(path, options) {
    const headers = {"Accept": "application/json"};
    if (token()) headers["Authorization"] = `Bearer ${token()}`;
    if (options && options.actor) headers["X-Actor"] = options.actor;
    const init = {method: "GET", headers, cache: "no-store"};
    if (options && options.method) init.method = options.method;
    if (options && options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response;
    try { response = await fetch(path, init); } catch (err) {
      return {ok: false, status: 0, data: {error: "the fleet server cannot be reached"}};
    }
    let data = null;
    try { data = await response.json(); } catch (err) { data = {error: `answer ${response.status} is not JSON`}; }
    return {ok: response.ok, status: response.status, data};
  }
  function explain(res) {
    const reason = (res.data && res.data.error) || `HTTP ${res.status}`;
    if (res.status === 401) return `${reason}: paste a token above`;
    return reason;
  }

  // --- fleet overview ----------------------------------------------------------------------------
  function labelTerms() {
    return params.getAll("label").flatMap((v) => v.split(/[\s,]+/)).filter((v) => v !== "");
  }
  function filterQuery(offset) {
    const q = new URLSearchParams();
    for (const term of labelTerms()) q.append("label", term);
    if (params.get("sync_state")) q.set("sync_state", params.get("sync_state"));
    if (params.get("online")) q.set("online", params.get("online"));
    for (const key of ["id_prefix", "sort", "order"]) if (params.get(key)) q.set(key, params.get(key));
    q.set("limit", "100");
    q.set("offset", String(offset));
    return q;
  }
  function pageHref(offset) {
    const q = new URLSearchParams(params);
    q.set("offset", String(Math.max(0, offset)));
    return `/?${q}`;
  }
  function filterHref(key, value) {
    const q = new URLSearchParams();
    if (key === "label") q.set("label", [...new Set([...labelTerms(), value])].join(" "));
    else q.set(key, value);
    if (params.get("refresh")) q.set("refresh", params.get("refresh"));
    return `/?${q}`;
  }
  function bars(container, entries, hrefOf) {
    clear(container);
    const max = Math.max(1, ...entries.map((e) => e[1]));
    for (const [name, count] of entries) {
      const row = node("div", null, "bar-row");
      row.appendChild(hrefOf ? link(hrefOf(name), name, "bar-name") : node("span", name, "bar-name"));
      const track = node("span", null, "bar-track");
      const fill = node("span", null, `bar-fill st-${name}`);
      fill.style.width = `${(100 * count) / max}%`;
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(node("span", count, "bar-count"));
      container.appendChild(row);
    }
    if (entries.length === 0) container.appendChild(node("span", "none", "muted"));
  }
  function driftText(drift) {
    if (!drift || !drift.count) return "none";
    return `${drift.count} ${drift.corrected ? "corrected" : "drifted"}`;
  }
  function initOverview() {
    $("f-label").value = labelTerms().join(" ");
    $("f-state").value = params.get("sync_state") || "";
    $("f-online").value = params.get("online") || "";
    $("f-id").value = params.get("id_prefix") || "";
    window.Dashboard.sortHeaders($("device-table"));
    for (const key of ["refresh", "sort", "order"]) {  // a new filter keeps the sort and the refresh period
      if (!params.get(key)) continue;
      const hidden = node("input"); hidden.type = "hidden"; hidden.name = key; hidden.value = params.get(key);
      $("filters").appendChild(hidden);
    }
    $("filters").addEventListener("submit", () => {
      for (const field of $("filters").querySelectorAll("input, select")) {
        if (field.value === "") field.disabled = true;  // keep the URL short: no empty filters
      }
    });
    const offset = Math.max(0, Number(params.get("offset")) || 0);
    $("prev-page").addEventListener("click", () => { window.location.href = pageHref(offset - 100); });
    $("next-page").addEventListener("click", () => { window.location.href = pageHref(offset + 100); });
  }
  async function refreshOverview() {
    const offset = Math.max(0, Number(params.get("offset")) || 0);
    const [summary, list] = await Promise.all([api("/api/v1/summary"), api(`/api/v1/devices?${filterQuery(offset)}`)]);
    // The fleet-wide counts never depend on the filters: drawn first, whatever the listing says.
    if (summary.ok) {
      const s = summary.data;
      setText("sum-devices", s.devices); setText("sum-online", s.online); setText("sum-offline", s.offline);
      bars($("sum-states"), Object.entries(s.by_sync_state), (name) => filterHref("sync_state", name));
      bars($("sum-releases"), s.releases.map((r) => [r.release === null ? "none" : `release ${r.release}`, r.devices]));
    }
    const tbody = clear($("device-table").tBodies[0]);
    if (!list.ok) {
      const tr = node("tr"); const td = node("td", `filter refused: ${explain(list)}`, "bad filter-error"); td.colSpan = 8;
      tr.appendChild(td); tbody.appendChild(tr);
      $("page-info").textContent = ""; $("prev-page").disabled = true; $("next-page").disabled = true;
      throw new Error(explain(list));
    }
    if (!summary.ok) throw new Error(explain(summary));
    for (const d of list.data.devices) {
      const tr = node("tr"); tr.dataset.device = d.id;
      const idCell = node("td"); idCell.appendChild(link(`/devices/${encodeURIComponent(d.id)}`, d.id)); tr.appendChild(idCell);
      const on = node("td"); on.appendChild(onlinePill(d.online)); tr.appendChild(on);
      const st = node("td"); st.appendChild(statePill(d.sync_state)); tr.appendChild(st);
      tr.appendChild(node("td", d.release ?? "–"));
      tr.appendChild(node("td", driftText(d.drift), d.drift && d.drift.count ? "warn" : "muted"));
      const labels = node("td", null, "labels");
      for (const [k, v] of Object.entries(d.labels || {})) labels.appendChild(link(filterHref("label", `${k}=${v}`), `${k}=${v}`, "chip"));
      tr.appendChild(labels);
      tr.appendChild(node("td", d.last_event ? `${d.last_event} · ${ago(d.last_event_ts)}` : "–"));
      tr.appendChild(node("td", ago(d.last_seen)));
      tbody.appendChild(tr);
    }
    if (list.data.devices.length === 0) {
      const tr = node("tr"); const td = node("td", "no device matches these filters", "muted"); td.colSpan = 8;
      tr.appendChild(td); tbody.appendChild(tr);
    }
    const total = list.data.total;
    $("page-info").textContent = total ? `${offset + 1}–${offset + list.data.devices.length} of ${total}` : "0 devices";
    $("prev-page").disabled = offset === 0;
    $("next-page").disabled = offset + list.data.devices.length >= total;
  }

  // --- device detail -----------------------------------------------------------------------------
  function diskUsed(metrics) {
    const disks = metrics && metrics.disk;
    if (!disks || typeof disks !== "object") return null;
    const mount = disks["/"] || Object.values(disks)[0];
    return mount && typeof mount.percent_free === "number" ? 100 - mount.percent_free : null;
  }
  function series(samples, pick) {
    const points = [];
    for (const s of samples) {
      const v = pick(s.metrics || {});
      if (typeof v === "number" && Number.isFinite(v)) points.push([s.ts, v]);
    }
    return points;
  }
  async function refreshDevice() {
    const id = body.dataset.deviceId;
    const hours = Number($("health-hours").value) || 6;
    const [detail, health] = await Promise.all([
      api(`/api/v1/devices/${encodeURIComponent(id)}`),
      api(`/api/v1/devices/${encodeURIComponent(id)}/health?hours=${hours}`)]);
    if (!detail.ok) throw new Error(explain(detail));
    const d = detail.data.device;
    clear($("dev-online")).appendChild(onlinePill(d.online));
    clear($("dev-state")).appendChild(statePill(d.sync_state));
    setText("dev-release", d.release); setText("dev-revision", d.revision); setText("dev-profile", d.profile);
    const labels = clear($("dev-labels"));
    for (const [k, v] of Object.entries(d.labels || {})) labels.appendChild(node("span", `${k}=${v}`, "chip"));
    setText("dev-paused", d.paused ? `yes: ${d.pause_reason || "no reason given"}` : "no");
    const repeated = d.last_error && d.repeat_count
      ? ` (${d.repeat_count} sync(s) in a row, the last ${ago(d.repeat_last_seen)})` : "";
    setText("dev-error", d.last_error ? d.last_error + repeated : d.last_error); setText("dev-seen", `${when(d.last_seen)} (${ago(d.last_seen)})`);
    window.Dashboard.drawDrift(clear($("dev-drift")), d.drift);
    const samples = health.ok ? health.data.health : [];
    const now = Date.now() / 1000;
    const range = {xMin: now - hours * 3600, xMax: now, yMax: 100};
    Charts.line($("chart-cpu"), {...range, series: [{cls: "s-cpu", points: series(samples, (m) => m.cpu_percent)}]});
    Charts.line($("chart-memory"), {...range, series: [{cls: "s-memory", points: series(samples, (m) => m.memory_percent)}]});
    Charts.line($("chart-disk"), {...range, series: [{cls: "s-disk", points: series(samples, diskUsed)}]});
    const checks = clear($("dev-checks"));
    const newest = samples.length ? samples[samples.length - 1] : null;
    for (const c of (newest && newest.checks) || []) {
      const li = node("li"); li.appendChild(pill(c.ok ? "ok" : "failing", c.ok ? "ok" : "bad"));
      li.appendChild(node("span", ` ${c.name}${c.detail ? ` — ${c.detail}` : ""}`));
      checks.appendChild(li);
    }
    if (!checks.firstChild) checks.appendChild(node("li", "no health checks reported", "muted"));
    const tbody = clear($("event-table").tBodies[0]);
    for (const e of detail.data.events) {
      const tr = node("tr");
      tr.appendChild(node("td", when(e.ts)));
      const type = node("td"); type.appendChild(statePill(e.type)); tr.appendChild(type);
      tr.appendChild(node("td", e.release ?? "–")); tr.appendChild(node("td", e.step || "–"));
      tr.appendChild(node("td", e.reason || "–"));
      tbody.appendChild(tr);
    }
    if (!health.ok) throw new Error(explain(health));
  }

  // --- rollouts ----------------------------------------------------------------------------------
  // A wave's progress is {done, failed, pending, offline, ...} as the rollouts API groups it.
  const KINDS = ["done", "failed", "pending", "offline"];
  function progressOf(wave) {
    const p = (wave && wave.progress) || {};
    return Object.fromEntries(KINDS.map((k) => [k, Number(p[k]) || 0]));
  }
  function progressText(waves) {
    let done = 0, total = 0;
    for (const w of waves || []) {
      const p = progressOf(w); done += p.done; total += p.done + p.failed + p.pending + p.offline;
    }
    return total ? `${done}/${total} done` : "–";
  }
  function waveText(r) {
    const n = r.waves ? r.waves.length : r.wave_count;
    return n ? `${r.wave + 1} of ${n}` : String(r.wave + 1);
  }
  function releaseText(version, commit) {
    if (version === null || version === undefined) return "none";
    return commit ? `${version} (${String(commit).slice(0, 12)})` : String(version);
  }
  async function refreshRollouts() {
    const res = await api("/api/v1/rollouts");
    if (res.status === 404) throw new Error("this fleet server runs no rollout engine");
    if (!res.ok) throw new Error(explain(res));
    const tbody = clear($("rollout-table").tBodies[0]);
    for (const r of res.data.rollouts) {
      const tr = node("tr"); tr.dataset.rollout = r.id;
      const idCell = node("td"); idCell.appendChild(link(`/rollouts/${encodeURIComponent(r.id)}`, r.id)); tr.appendChild(idCell);
      tr.appendChild(node("td", releaseText(r.release, null)));
      const ph = node("td"); ph.appendChild(statePill(r.phase));
      if (r.superseded_by) ph.appendChild(node("span", ` superseded by ${r.superseded_by}`, "muted superseded"));
      tr.appendChild(ph);
      tr.appendChild(node("td", waveText(r)));
      tr.appendChild(node("td", progressText(r.waves)));
      tr.appendChild(node("td", when(r.created)));
      tbody.appendChild(tr);
    }
    if (res.data.rollouts.length === 0) {
      const tr = node("tr"); const td = node("td", "no rollout yet", "muted"); td.colSpan = 6;
      tr.appendChild(td); tbody.appendChild(tr);
    }
  }
  function waveSection(container, index, wave, samples, tripped) {
    let section = container.querySelector(`section[data-wave="${index}"]`);
    if (!section) {
      section = node("section", null, "wave"); section.dataset.wave = String(index);
      section.appendChild(node("h3"));
      section.appendChild(node("p", null, "wave-meta"));
      const devs = node("p", null, "wave-devices");
      const q = new URLSearchParams(params); q.set("wave", String(index + 1)); q.delete("offset"); q.delete("state");
      devs.appendChild(link(`${window.location.pathname}?${q}#ro-device-table`, "its devices", "wave-link"));
      devs.appendChild(node("span", null, "wave-tripped"));
      section.appendChild(devs);
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("class", "chart wave-chart"); svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", `wave ${index + 1} progress`);
      section.appendChild(svg);
      container.appendChild(section);
    }
    const p = progressOf(wave);
    section.querySelector("h3").textContent = `Wave ${index + 1}: ${wave.name || ""}` +
      (wave.pause_before ? " (approval before it starts)" : "") +
      (wave.promotion === "manual" ? " (approval after it passes)" : "");
    const meta = section.querySelector(".wave-meta");
    meta.textContent = `${p.done} done · ${p.failed} failed · ${p.pending} pending · ${p.offline} offline` +
      (wave.result ? ` · ${wave.result}` : "");
    for (const k of KINDS) meta.dataset[k] = String(p[k]);
    section.dataset.samples = String(samples.length);
    const trippedSpan = clear(section.querySelector(".wave-tripped"));
    if (tripped.length) {
      trippedSpan.appendChild(node("span", " · tripped a gate: ", "bad"));
      for (const t of tripped) trippedSpan.appendChild(link(`/devices/${encodeURIComponent(t)}`, t, "chip tripped"));
    }
    const points = samples.map((sample) => ({t: sample.ts, ...progressOf({progress: sample})}));
    // Each count holds until the next sample, and the last one until now: without this point the
    // final state (a finished wave's, above all) would be drawn zero pixels wide.
    if (points.length > 0 && wave.started) {
      points.push({t: Math.max(Date.now() / 1000, points[points.length - 1].t + 1), ...p});
    }
    Charts.stacked(section.querySelector("svg"), {
      times: points.map((q) => q.t),
      layers: KINDS.map((k) => ({cls: `s-${k}`, values: points.map((q) => q[k])})),
      emptyText: wave.devices === 0 ? "no device in this wave" : wave.started ? "no progress sampled yet" : "not started",
    });
  }
  // The phases in which the engine takes each action (it refuses the rest with 409 anyway).
  const ACTION_PHASES = {
    pause: ["pending", "running", "waiting_approval"], resume: ["paused"], promote: ["waiting_approval", "halted"],
    abort: ["pending", "running", "waiting_approval", "paused", "halted", "rolling_back"],
    rollback: ["running", "waiting_approval", "paused", "halted", "succeeded", "aborted"],
  };
  function gateReasons(g) {
    const d = g.detail || {};
    const td = node("td", (d.reasons || []).join("; ") || ((d.tripped || []).length ? "" : "–"));
    if ((d.tripped || []).length) {
      td.appendChild(node("span", `${td.textContent ? "; " : ""}tripped: `));
      for (const t of d.tripped) td.appendChild(link(`/devices/${encodeURIComponent(t)}`, t, "chip tripped"));
    }
    return td;
  }
  // The devices that tripped a gate of wave i, from its gate decisions (ids; linked to their pages).
  function trippedOf(r, i) {
    const ids = new Set();
    for (const g of r.gates || []) if (g.wave === i) for (const t of (g.detail && g.detail.tripped) || []) ids.add(t);
    return [...ids].sort();
  }
  // The rollout's devices, one page at a time (the summary carries no per-device map).
  const RO_PAGE = 100;
  function roOffset() { return Math.max(0, Number(params.get("offset")) || 0); }
  function roPageHref(offset) {
    const q = new URLSearchParams(params); q.set("offset", String(Math.max(0, offset)));
    return `${window.location.pathname}?${q}`;
  }
  function roDeviceQuery() {
    const q = new URLSearchParams({offset: String(roOffset()), limit: String(RO_PAGE)});
    if (params.get("wave")) q.set("wave", String(Number(params.get("wave")) - 1));
    if (params.get("state")) q.set("state", params.get("state"));
    return q;
  }
  function fillRolloutDevices(r, list, tripped) {
    setText("ro-device-count", r.device_count === undefined ? "" : `(${r.device_count} in the rollout)`);
    const waveSelect = $("ro-f-wave");
    if (waveSelect.options.length === 1) {
      (r.waves || []).forEach((w, i) => {
        const opt = node("option", `${i + 1}${w.name ? ` (${w.name})` : ""}`); opt.value = String(i + 1);
        waveSelect.appendChild(opt);
      });
      waveSelect.value = params.get("wave") || "";
    }
    const tbody = clear($("ro-device-table").tBodies[0]);
    for (const d of list.devices) {
      const tr = node("tr"); tr.dataset.device = d.id;
      const idCell = node("td"); idCell.appendChild(link(`/devices/${encodeURIComponent(d.id)}`, d.id)); tr.appendChild(idCell);
      tr.appendChild(node("td", d.wave + 1));
      const st = node("td"); st.appendChild(statePill(d.state)); tr.appendChild(st);
      const on = node("td"); on.appendChild(onlinePill(d.online)); tr.appendChild(on);
      tr.appendChild(node("td", d.version ?? "–"));
      const why = node("td", d.reason || "–");
      if (tripped.has(d.id)) { tr.classList.add("tripped"); why.prepend(pill("tripped a gate", "bad"), " "); }
      tr.appendChild(why);
      tbody.appendChild(tr);
    }
    if (list.devices.length === 0) {
      const tr = node("tr"); const td = node("td", "no device matches these filters", "muted"); td.colSpan = 6;
      tr.appendChild(td); tbody.appendChild(tr);
    }
    const offset = roOffset();
    $("ro-page-info").textContent = list.total ? `${offset + 1}–${offset + list.devices.length} of ${list.total}` : "0 devices";
    $("ro-prev-page").disabled = offset === 0;
    $("ro-next-page").disabled = offset + list.devices.length >= list.total;
  }
  async function refreshRollout() {
    const id = body.dataset.rolloutId;
    const [res, list] = await Promise.all([api(`/api/v1/rollouts/${encodeURIComponent(id)}`),
      api(`/api/v1/rollouts/${encodeURIComponent(id)}/devices?${roDeviceQuery()}`)]);
    if (!res.ok) throw new Error(explain(res));
    if (!list.ok) throw new Error(explain(list));
    const r = res.data.rollout || res.data;
    clear($("ro-phase")).appendChild(statePill(r.phase));
    body.dataset.phase = r.phase;
    for (const button of document.querySelectorAll("button.act")) {
      button.disabled = !(ACTION_PHASES[button.dataset.action] || []).includes(r.phase);
    }
    setText("ro-release", releaseText(r.release, r.commit));
    setText("ro-previous", releaseText(r.previous, null));
    setText("ro-plan", r.plan);
    setText("ro-wave", waveText(r));
    setText("ro-halted", r.halted_reason || "–");
    window.Dashboard.drawPreflight($("preflight"), r);
    const superseded = clear($("ro-superseded"));
    if (r.superseded_by) {
      superseded.appendChild(link(`/rollouts/${encodeURIComponent(r.superseded_by)}`, r.superseded_by));
      if (r.superseded_at) superseded.appendChild(node("span", ` at ${when(r.superseded_at)}`, "muted"));
    } else superseded.textContent = "–";
    const container = $("waves");
    (r.waves || []).forEach((wave, i) => {
      waveSection(container, i, wave, (r.samples || []).filter((sample) => sample.wave === i), trippedOf(r, i));
    });
    const tbody = clear($("gate-table").tBodies[0]);
    for (const g of [...(r.gates || [])].reverse()) {
      const tr = node("tr");
      tr.appendChild(node("td", when(g.at))); tr.appendChild(node("td", g.wave + 1));
      const verdict = node("td"); verdict.appendChild(pill(g.passed ? "passed" : "failed", g.passed ? "ok" : "bad"));
      tr.appendChild(verdict);
      tr.appendChild(gateReasons(g));
      tbody.appendChild(tr);
    }
    if (!tbody.firstChild) {
      const tr = node("tr"); const td = node("td", "no gate judged yet", "muted"); td.colSpan = 4;
      tr.appendChild(td); tbody.appendChild(tr);
    }
    fillRolloutDevices(r, list.data, new Set((r.waves || []).flatMap((w, i) => trippedOf(r, i))));
  }
  function initRollout() {
    $("ro-f-state").value = params.get("state") || "";
    if (params.get("refresh")) {
      const hidden = node("input"); hidden.type = "hidden"; hidden.name = "refresh"; hidden.value = params.get("refresh");
      $("ro-filters").appendChild(hidden);
    }
    $("ro-filters").addEventListener("submit", () => {
      for (const field of $("ro-filters").querySelectorAll("select")) {
        if (field.value === "") field.disabled = true;  // keep the URL short: no empty filters
      }
    });
    $("ro-prev-page").addEventListener("click", () => { window.location.href = roPageHref(roOffset() - RO_PAGE); });
    $("ro-next-page").addEventListener("click", () => { window.location.href = roPageHref(roOffset() + RO_PAGE); });
    wireActions((action) => `/api/v1/rollouts/${encodeURIComponent(body.dataset.rolloutId)}/${action}`);
  }
  // The operator buttons (button.act) of a page: each asks for the admin token and a reason, posts to
  // urlFor(action) with the actor, says what the server answered, and refreshes the page.
  function wireActions(urlFor) {
    for (const button of document.querySelectorAll("button.act")) {
      button.addEventListener("click", async () => {
        const action = button.dataset.action;
        const result = $("action-result");
        if (!token()) { result.textContent = `${action} refused: paste the admin token first`; result.className = "action-result bad"; return; }
        const reason = $("action-reason").value.trim();
        if (!reason) { result.textContent = `${action} refused: give a reason first (it goes to the audit log)`; result.className = "action-result bad"; return; }
        button.disabled = true;
        result.textContent = `${action}: sending…`; result.className = "action-result";  // no stale verdict meanwhile
        const res = await api(urlFor(action), {method: "POST", body: {reason}, actor: $("action-actor").value.trim()});
        button.disabled = false;
        result.textContent = res.ok ? `${action}: done` : `${action} refused: ${explain(res)}`;
        result.className = `action-result ${res.ok ? "ok" : "bad"}`;
        refreshNow();
      });
    }
  }

  // --- the refresh loop --------------------------------------------------------------------------
  const pages = {
    overview: {init: initOverview, refresh: refreshOverview},
    device: {init: () => {
      $("health-hours").addEventListener("change", () => refreshNow());
      wireActions((action) => `/api/v1/devices/${encodeURIComponent(body.dataset.deviceId)}/${action}`);
    }, refresh: refreshDevice},
    rollouts: {init: () => {}, refresh: refreshRollouts},
    rollout: {init: initRollout, refresh: refreshRollout},
  };
  let current = null, timer = null, running = false;
  async function refreshNow() {
    if (!current || running) return;
    running = true;
    window.clearTimeout(timer);
    try {
      if (body.dataset.readNeedsToken === "true" && !token()) {
        throw new Error("this fleet server needs a token to read the fleet: paste a token above");
      }
      await current.refresh();
      status(`updated ${new Date().toISOString().slice(11, 19)}Z`, "");
      body.dataset.updated = String(Number(body.dataset.updated || "0") + 1);
    } catch (err) {
      status(err.message, "bad");
    } finally {
      running = false;
      timer = window.setTimeout(refreshNow, refreshSeconds * 1000);
    }
  }
  // console.js (loaded after this file) adds its pages and reuses these helpers; every deferred
  // script has run when DOMContentLoaded fires, so the page starts then.
  window.Dashboard = {
    $, node, link, setText, clear, when, ago, pill, statePill, onlinePill, releaseText, api, explain,
    token, params, refreshNow, addPage: (name, page) => { pages[name] = page; },
  };
  document.addEventListener("DOMContentLoaded", () => {
    $("refresh-seconds").textContent = String(refreshSeconds);
    showToken();
    current = pages[body.dataset.page] || null;
    if (current) { current.init(); refreshNow(); }
  });
})();
