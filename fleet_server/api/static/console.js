/* edge-fleet dashboard, the operator console: the releases page (history, rollouts of each release,
 * starting a rollout) and the audit log page. Uses the helpers dashboard.js exposes; data is always
 * inserted as text. Actions are the same API calls as fleetctl's, with the admin token the viewer
 * pasted (sessionStorage only) as a bearer header and a reason the viewer must type. */
"use strict";
(() => {
  const D = window.Dashboard;
  if (!D) return;
  const {$, node, link, clear, when, pill, statePill, api, explain, token, params} = D;

  function emptyRow(tbody, text, span) {
    const tr = node("tr"); const td = node("td", text, "muted"); td.colSpan = span;
    tr.appendChild(td); tbody.appendChild(tr);
  }

  // --- releases ----------------------------------------------------------------------------------
  let startRelease = null;
  function openStart(version) {
    startRelease = version;
    $("start-release").textContent = String(version);
    $("start-result").textContent = ""; $("start-result").className = "action-result";
    $("start-panel").hidden = false;
    $("start-reason").focus();
  }
  async function refreshReleases() {
    const [releases, rollouts] = await Promise.all([api("/api/v1/releases?limit=100"),
      api("/api/v1/rollouts?limit=1000")]);
    if (!releases.ok) throw new Error(explain(releases));
    const byRelease = new Map();
    for (const r of rollouts.ok ? rollouts.data.rollouts : []) {
      if (!byRelease.has(r.release)) byRelease.set(r.release, []);
      byRelease.get(r.release).push(r);
    }
    const canStart = token() !== "" && rollouts.ok && document.body.dataset.adminConfigured === "true";
    const tbody = clear($("release-table").tBodies[0]);
    for (const rel of releases.data.releases) {
      const tr = node("tr"); tr.dataset.release = String(rel.version);
      tr.appendChild(node("td", rel.version));
      const commit = node("td", String(rel.commit || "").slice(0, 12), "mono"); commit.title = rel.commit || "";
      tr.appendChild(commit);
      const signers = node("td", null, "signers");
      for (const s of rel.signers || []) signers.appendChild(node("span", s, "chip mono"));
      if (!signers.firstChild) signers.textContent = "–";
      tr.appendChild(signers);
      tr.appendChild(node("td", when(rel.seen_at)));
      tr.appendChild(node("td", when(rel.committed_at)));
      const ros = node("td", null, "release-rollouts");
      for (const r of byRelease.get(rel.version) || []) {
        const item = node("div"); item.dataset.rollout = r.id;
        item.appendChild(link(`/rollouts/${encodeURIComponent(r.id)}`, r.id));
        item.appendChild(document.createTextNode(" "));
        item.appendChild(statePill(r.phase));
        ros.appendChild(item);
      }
      if (!ros.firstChild) ros.appendChild(node("span", rollouts.ok ? "none" : "–", "muted"));
      tr.appendChild(ros);
      const act = node("td"); act.dataset.needsToken = ""; act.hidden = token() === "";
      if (canStart) {
        const button = node("button", "Start rollout…", "start"); button.type = "button";
        button.addEventListener("click", () => openStart(rel.version));
        act.appendChild(button);
      }
      tr.appendChild(act);
      tbody.appendChild(tr);
    }
    if (releases.data.releases.length === 0) emptyRow(tbody, "no signed release recorded yet", 7);
    const refused = clear($("refused-table").tBodies[0]);
    for (const r of releases.data.refused || []) {
      const tr = node("tr"); tr.dataset.commit = String(r.commit || "");
      tr.appendChild(node("td", when(r.at)));
      const commit = node("td", String(r.commit || "").slice(0, 12), "mono"); commit.title = r.commit || "";
      tr.appendChild(commit);
      tr.appendChild(node("td", r.code || "–", "mono"));
      tr.appendChild(node("td", r.release === null || r.release === undefined ? "–" : String(r.release)));
      tr.appendChild(node("td", r.reason || ""));
      refused.appendChild(tr);
    }
    if (!refused.firstChild) emptyRow(refused, "no head refused", 5);
    if (!rollouts.ok && rollouts.status !== 404) throw new Error(explain(rollouts));
  }
  function initReleases() {
    $("start-cancel").addEventListener("click", () => { $("start-panel").hidden = true; startRelease = null; });
    $("start-plan-name").addEventListener("input", () => { $("start-plan-named").checked = true; });
    $("start-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const result = $("start-result");
      const fail = (text) => { result.textContent = text; result.className = "action-result bad"; };
      if (startRelease === null) return;
      if (!token()) { fail("start refused: paste the admin token first"); return; }
      const reason = $("start-reason").value.trim();
      if (!reason) { fail("start refused: give a reason (it goes to the audit log)"); return; }
      const request = {release: startRelease, reason};
      if ($("start-plan-named").checked) {
        const name = $("start-plan-name").value.trim();
        if (!name) { fail("start refused: name the plan, or choose the default plan"); return; }
        request.plan_name = name;
      }
      $("start-submit").disabled = true;
      const res = await api("/api/v1/rollouts", {method: "POST", body: request, actor: $("start-actor").value.trim()});
      $("start-submit").disabled = false;
      if (!res.ok) { fail(`start refused: ${explain(res)}`); return; }
      clear(result).appendChild(document.createTextNode(`started rollout `));
      result.appendChild(link(`/rollouts/${encodeURIComponent(res.data.id)}`, res.data.id));
      result.appendChild(document.createTextNode(` of release ${res.data.release} (plan ${res.data.plan})`));
      result.className = "action-result ok";
      D.refreshNow();
    });
  }

  // --- device table: sortable headers --------------------------------------------------------------
  // Each sortable header is a link to the same view sorted by its column (?sort=&order=); clicking
  // the current sort column flips its direction. The server sorts (then by id) and pages.
  function sortHeaders(table) {
    const sort = params.get("sort") || "id";
    const order = params.get("order") === "desc" ? "desc" : "asc";
    for (const th of table.querySelectorAll("th[data-sort]")) {
      const key = th.dataset.sort;
      const current = key === sort;
      const q = new URLSearchParams(params);
      q.delete("offset");
      q.set("sort", key);
      q.set("order", current && order === "asc" ? "desc" : "asc");
      const label = th.textContent;
      clear(th).appendChild(link(`${window.location.pathname}?${q}`, label, "sort"));
      if (current) {
        th.setAttribute("aria-sort", order === "asc" ? "ascending" : "descending");
        th.appendChild(node("span", order === "asc" ? " ▲" : " ▼", "sort-mark"));
      }
    }
  }
  D.sortHeaders = sortHeaders;

  // --- device drift --------------------------------------------------------------------------------
  // The drift the device reports in its status: {count, corrected, resources}. A resource is its id
  // (kind:name) and, when the device says so, what differs ({id, expected, found}); an agent that
  // reports ids only gets "not reported" in that column, nothing guessed.
  function drawDrift(container, drift) {
    if (!drift || !drift.count) { container.appendChild(node("span", "no drift reported", "muted")); return; }
    container.appendChild(node("p", `${drift.count} resource(s) ${drift.corrected ? "drifted and were corrected" : "drifted"}`,
      drift.corrected ? "ok" : "warn"));
    const table = node("table", null, "drift-diff"); table.id = "drift-table";
    const head = node("tr");
    for (const h of ["Resource", "Kind", "Expected", "Found on the device"]) head.appendChild(node("th", h));
    table.appendChild(node("thead")).appendChild(head);
    const tbody = table.appendChild(node("tbody"));
    for (const entry of drift.resources || []) {
      const item = entry && typeof entry === "object" ? entry : {id: entry};
      const id = String(item.id ?? "?");
      const tr = node("tr"); tr.dataset.resource = id;
      tr.appendChild(node("td", id, "mono"));
      tr.appendChild(node("td", id.includes(":") ? id.slice(0, id.indexOf(":")) : "–"));
      const reported = typeof item.expected === "string" || typeof item.found === "string";
      tr.appendChild(node("td", reported ? item.expected ?? "–" : "not reported", reported ? "mono" : "muted"));
      tr.appendChild(node("td", reported ? item.found ?? "–" : "not reported", reported ? "mono" : "muted"));
      tbody.appendChild(tr);
    }
    if (drift.count > (drift.resources || []).length) {
      container.appendChild(node("p", `the device listed ${(drift.resources || []).length} of them`, "muted"));
    }
    container.appendChild(table);
  }
  D.drawDrift = drawDrift;

  // --- a rollout's preflight -----------------------------------------------------------------------
  // The latest "rollout.preflight" audit row of the rollout: the verdict, the counts, the refusals by
  // reason with example devices, the devices offline. Hidden for a rollout without a preflight.
  function drawPreflight(section, r) {
    const rows = (r.audit || []).filter((a) => a.action === "rollout.preflight");
    section.hidden = !r.preflight && rows.length === 0;
    if (section.hidden) return;
    const s = rows.length ? rows[rows.length - 1].detail || {} : {state: "starting", counts: {}};
    const c = s.counts || {};
    const verdict = clear($("pf-state"));
    verdict.appendChild(pill(s.state || "starting", s.state === "failed" ? "bad" : s.state === "passed" ? "ok" : "info"));
    verdict.appendChild(node("span", ` ${c.change || 0} would change, ${c.nochange || 0} nothing, ` +
      `${c.refused || 0} would refuse, ${c.waiting || 0} not answered, ${c.offline || 0} offline`));
    const list = clear($("pf-refusals"));
    for (const g of s.refusals || []) {
      const li = node("li", `${g.devices} device(s): ${g.reason} — `);
      (g.examples || []).forEach((d, i) => {
        if (i) li.appendChild(document.createTextNode(", "));
        li.appendChild(link(`/devices/${encodeURIComponent(d)}`, d));
      });
      list.appendChild(li);
    }
    $("pf-offline").textContent = (s.offline || []).join(", ") || "none";
  }
  D.drawPreflight = drawPreflight;

  // --- audit log ---------------------------------------------------------------------------------
  const AUDIT_PAGE = 100;
  function detailText(detail) {
    if (detail === null || detail === undefined) return "–";
    if (typeof detail !== "object") return String(detail);
    return Object.entries(detail).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  }
  function targetCell(target, action) {
    const td = node("td", null, "mono");
    const text = String(target ?? "");
    // a rollout (rollout/<id>) links to its page, an enrolled device to its own; the rest is text
    const rollout = /^rollout\/([A-Za-z0-9][A-Za-z0-9._-]*)$/.exec(text);
    if (rollout) td.appendChild(link(`/rollouts/${encodeURIComponent(rollout[1])}`, text));
    else if (action === "device.enroll" && /^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(text)) {
      td.appendChild(link(`/devices/${encodeURIComponent(text)}`, text));
    } else td.textContent = text || "–";
    return td;
  }
  async function refreshAudit() {
    const before = Number(params.get("before"));
    const q = new URLSearchParams({limit: String(AUDIT_PAGE)});
    if (Number.isInteger(before) && before > 0) q.set("before", String(before));
    const res = await api(`/api/v1/audit?${q}`);
    const tbody = clear($("audit-table").tBodies[0]);
    if (!res.ok) { emptyRow(tbody, `audit log refused: ${explain(res)}`, 7); throw new Error(explain(res)); }
    const entries = res.data.audit;
    for (const a of entries) {
      const tr = node("tr"); tr.dataset.audit = String(a.id);
      tr.appendChild(node("td", a.id, "muted"));
      tr.appendChild(node("td", when(a.at)));
      tr.appendChild(node("td", a.actor));
      const action = node("td"); action.appendChild(pill(a.action, "info")); tr.appendChild(action);
      tr.appendChild(targetCell(a.target, a.action));
      tr.appendChild(node("td", a.reason || "–"));
      tr.appendChild(node("td", detailText(a.detail), "detail"));
      tbody.appendChild(tr);
    }
    if (entries.length === 0) emptyRow(tbody, "no audit entry here", 7);
    $("audit-page-info").textContent = entries.length
      ? `entries ${entries[entries.length - 1].id}–${entries[0].id}` : "";
    $("audit-newest").hidden = !q.has("before");
    const older = $("audit-older");
    older.hidden = entries.length < AUDIT_PAGE;
    if (entries.length) {
      const next = new URLSearchParams(params); next.set("before", String(entries[entries.length - 1].id));
      older.href = `/audit?${next}`;
    }
  }

  D.addPage("releases", {init: initReleases, refresh: refreshReleases});
  D.addPage("audit", {init: () => {}, refresh: refreshAudit});
})();
