"""The dashboard as an operator console, in a real headless Chromium against the real app and a real
rollout runner over a real SQLite store: the releases page (history, rollouts of each release,
starting a rollout), the audit log page (paged), the drift table and sync history of a device, the
devices of a wave with those that tripped a gate, and rolling back from the rollout page.

Every action goes end to end through the same API calls as ``fleetctl`` and is checked in the
audit log. When a test fails, the site fixtures save a screenshot of every page it opened in its tmp
directory (``shots/failed-<n>.png``).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from edge_core.messages import event_message, status_message
from fleet_server.errors import UsageError
from fleet_server.rollouts.plan import RolloutPlan
from fleet_server.store import IngestBatch
from tests.support.dashboard_site import (
    ADMIN,
    COMMIT,
    NEW_COMMIT,
    OLD_COMMIT,
    PLAN,
    WAIT_MS,
    RolloutSite,
    Site,
    wait_js,
)

pytestmark = pytest.mark.slow

ROWS = "#ro-device-table tr[data-device]"
AUDIT_IDS = "rs => rs.map(r => r.dataset.audit)"


def audit_entries(site: Site, action: str) -> list[dict[str, Any]]:
    """The audit entries of ``action``, newest first, as the API lists them."""
    entries = httpx.get(f"{site.url}/api/v1/audit", params={"limit": 1000}, timeout=5.0).json()["audit"]
    return [a for a in entries if a["action"] == action]


# --- releases ---------------------------------------------------------------------------------------


def test_releases_page_lists_history_signers_and_rollouts(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    page = site.page("/releases")
    page.wait_for_selector(f"#release-table tr[data-release='8'] [data-rollout='{rid}']", timeout=WAIT_MS)
    versions = page.eval_on_selector_all("#release-table tr[data-release]",
                                         "rs => rs.map(r => r.dataset.release)")
    assert versions == ["8", "7", "6"]
    row8 = page.locator("#release-table tr[data-release='8']")
    assert NEW_COMMIT[:12] in row8.inner_text()
    assert row8.locator("td.mono").get_attribute("title") == NEW_COMMIT
    assert "ed25519:key" in row8.locator("td.signers").inner_text()
    assert "running" in row8.locator("td.release-rollouts").inner_text()
    assert page.inner_text("#release-table tr[data-release='6'] td.release-rollouts") == "none"
    assert OLD_COMMIT[:12] in page.inner_text("#release-table tr[data-release='6']")
    assert page.inner_text("#refused-table tbody") == "no head refused"
    # a head the Git watcher refused (as it records one) is listed below, as text
    site.store.add_audit("git-watcher", "release_refused", "f" * 40,
                         "release 5 is older than release 8 <b>x</b>", {"code": "rollback", "release": 5},
                         now=time.time())
    page.reload()
    page.wait_for_selector(f"#refused-table tr[data-commit='{'f' * 40}']", timeout=WAIT_MS)
    refused = page.inner_text(f"#refused-table tr[data-commit='{'f' * 40}']")
    assert "rollback" in refused
    assert "ffffffffffff" in refused
    assert "<b>x</b>" in refused
    # read-only without a token: no start button
    assert page.locator("button.start").count() == 0
    page.locator(f"#release-table [data-rollout='{rid}'] a").click()
    page.wait_for_selector("section[data-wave='0']", timeout=WAIT_MS)
    assert page.url.endswith(f"/rollouts/{rid}")
    assert site.console == []


def test_a_rollout_is_started_from_the_releases_page_with_a_reason(rollout_site: RolloutSite) -> None:
    site, runner = rollout_site.site, rollout_site.runner
    runner.default_plan = runner.resolve_plan(PLAN, None)
    named = runner.resolve_plan({**PLAN, "name": "careful"}, None)

    def load(name: str) -> RolloutPlan:
        if name != "careful":
            raise UsageError(f"no rollout plan {name!r}")
        return named

    runner.set_plan_loader(load)
    site.store.record_release(9, "f" * 40, ["ed25519:key"], time.time())
    page = site.page("/releases", token=ADMIN)
    page.wait_for_selector("#release-table tr[data-release='9'] button.start", timeout=WAIT_MS)
    page.click("#release-table tr[data-release='9'] button.start")
    assert page.inner_text("#start-release") == "9"
    # no reason: refused in the page, nothing sent
    page.click("#start-submit")
    page.wait_for_selector("#start-result.bad", timeout=WAIT_MS)
    assert "give a reason" in page.inner_text("#start-result")
    # an unknown named plan: the server's 400 reason is shown, nothing started
    page.fill("#start-actor", "dora")
    page.fill("#start-reason", "release 9 fixes the camera driver")
    page.check("#start-plan-named")
    page.fill("#start-plan-name", "nosuch")
    page.click("#start-submit")
    wait_js(page, "document.getElementById('start-result').textContent.includes('nosuch')")
    assert "start refused" in page.inner_text("#start-result")
    reasons = [a["reason"] for a in audit_entries(site, "rollout.start")]
    assert "release 9 fixes the camera driver" not in reasons
    site.console.clear()  # the browser notes the 400 answer as a console error
    page.fill("#start-plan-name", "careful")
    page.click("#start-submit")
    page.wait_for_selector("#start-result.ok a", timeout=WAIT_MS)
    new_id = page.inner_text("#start-result a")
    state = runner.state(new_id)
    assert state.release.version == 9
    assert state.plan.name == "careful"
    started = [a for a in audit_entries(site, "rollout.start") if a["target"] == f"rollout/{new_id}"]
    assert [(a["actor"], a["reason"]) for a in started] == [("dora", "release 9 fixes the camera driver")]
    page.wait_for_selector(f"#release-table tr[data-release='9'] [data-rollout='{new_id}']", timeout=WAIT_MS)
    site.screenshot(page, "releases.png")
    # the default plan
    site.store.record_release(10, "1" * 40, ["ed25519:key"], time.time())
    page.wait_for_selector("#release-table tr[data-release='10'] button.start", timeout=WAIT_MS)
    page.click("#release-table tr[data-release='10'] button.start")
    page.check("#start-plan-default")
    page.fill("#start-reason", "release 10")
    page.click("#start-submit")
    wait_js(page, "document.getElementById('start-result').textContent.includes('of release 10')")
    assert "plan canary-then-fleet" in page.inner_text("#start-result")
    assert site.console == []


# --- rollback and the devices of a wave -------------------------------------------------------------


def test_rollback_from_the_rollout_page_needs_a_reason_and_is_audited(rollout_site: RolloutSite) -> None:
    site, rid, runner = rollout_site.site, rollout_site.rollout_id, rollout_site.runner
    page = site.page(f"/rollouts/{rid}?refresh=0.5", token=ADMIN)
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.wait_for_selector("button[data-action='rollback']", state="visible", timeout=WAIT_MS)
    wait_js(page, "document.body.dataset.phase === 'running'")
    assert page.is_enabled("button[data-action='rollback']")
    page.click("button[data-action='rollback']")
    page.wait_for_selector("#action-result.bad", timeout=WAIT_MS)
    assert "give a reason first" in page.inner_text("#action-result")
    assert runner.state(rid).phase == "running"
    page.fill("#action-actor", "erin")
    page.fill("#action-reason", "cameras reboot on release 8")
    page.click("button[data-action='rollback']")
    page.wait_for_selector("#action-result.ok", timeout=WAIT_MS)
    assert runner.state(rid).phase in ("rolling_back", "rolled_back")
    wait_js(page, "document.body.dataset.phase !== 'running'")
    entries = [(a["actor"], a["reason"]) for a in audit_entries(site, "rollout.rollback")]
    assert entries == [("erin", "cameras reboot on release 8")]
    # the admin token travels as a bearer header only: never in a URL, never in localStorage
    assert urls
    assert not [u for u in urls if ADMIN in u]
    assert page.evaluate("window.localStorage.length") == 0
    assert site.console == []


def test_a_wave_links_its_devices_and_those_that_tripped_its_gate(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    # the canary wave judges any failure: cam-01 fails, the wave halts with cam-01 as the tripped device
    rollout_site.report({"cam-01": "sync_failed", "gw-01": "sync_succeeded"})
    deadline = time.monotonic() + 10
    while rollout_site.runner.state(rid).phase != "halted" and time.monotonic() < deadline:
        time.sleep(0.1)
        rollout_site.runner.tick()
    assert rollout_site.runner.state(rid).phase == "halted"
    page = site.page(f"/rollouts/{rid}")
    page.wait_for_selector("section[data-wave='0'] .wave-tripped a.tripped", timeout=WAIT_MS)
    assert page.inner_text("section[data-wave='0'] .wave-tripped a") == "cam-01"
    assert page.locator("section[data-wave='1'] .wave-tripped a").count() == 0
    assert page.locator("#gate-table a.tripped", has_text="cam-01").count() == 1
    page.click("section[data-wave='0'] a.wave-link")
    wait_js(page, "document.querySelectorAll('#ro-device-table tr[data-device]').length === 2")
    assert "wave=1" in page.url
    assert page.eval_on_selector_all(ROWS, "rs => rs.map(r => r.dataset.device)") == ["cam-01", "gw-01"]
    assert page.eval_on_selector_all("#ro-device-table tr.tripped", "rs => rs.map(r => r.dataset.device)") \
        == ["cam-01"]
    page.click("section[data-wave='0'] .wave-tripped a")
    page.wait_for_selector("#dev-state .pill", timeout=WAIT_MS)
    assert page.url.endswith("/devices/cam-01")
    assert site.console == []


# --- audit log --------------------------------------------------------------------------------------


def test_audit_page_pages_through_the_log(site: Site) -> None:
    for i in range(150):
        site.store.add_audit("ops", "device.enroll" if i == 149 else "baseline.move",
                             "cam-01" if i == 149 else "baseline", f"entry {i}", {"n": i})
    page = site.page("/audit")
    wait_js(page, "document.querySelectorAll('#audit-table tr[data-audit]').length === 100")
    ids = [int(x) for x in page.eval_on_selector_all("#audit-table tr[data-audit]", AUDIT_IDS)]
    assert ids == sorted(ids, reverse=True)
    newest = page.locator("#audit-table tr[data-audit]").first
    assert "entry 149" in newest.inner_text()
    assert "n=149" in newest.inner_text()
    assert newest.locator("a").get_attribute("href") == "/devices/cam-01"
    site.screenshot(page, "audit.png")
    assert page.is_visible("#audit-older")
    page.click("#audit-older")
    wait_js(page, "document.querySelectorAll('#audit-table tr[data-audit]').length === 50")
    assert f"before={ids[-1]}" in page.url
    older = [int(x) for x in page.eval_on_selector_all("#audit-table tr[data-audit]", AUDIT_IDS)]
    assert max(older) < min(ids)
    assert "entry 0" in page.inner_text("#audit-table tr[data-audit]:last-child")
    assert not page.is_visible("#audit-older")
    # the API: before must be a positive id
    assert httpx.get(f"{site.url}/api/v1/audit", params={"before": 0}, timeout=5.0).status_code == 400
    page_two = httpx.get(f"{site.url}/api/v1/audit", params={"before": ids[-1], "limit": 1000}, timeout=5.0)
    assert [a["id"] for a in page_two.json()["audit"]] == older
    assert site.console == []


def test_text_in_the_log_and_from_devices_is_shown_as_text_never_run(site: Site) -> None:
    site.store.add_audit("ops", "baseline.move", '"><img id=pwn-target src=x>', "<img id=pwn-reason src=x>",
                         {"html": "<b id=pwn-detail>x</b>"})
    page = site.page("/audit")
    page.wait_for_selector("#audit-table tr[data-audit]", timeout=WAIT_MS)
    assert "<img id=pwn-reason src=x>" in page.inner_text("#audit-table tr[data-audit]:first-child")
    assert page.locator("#pwn-target, #pwn-reason, #pwn-detail").count() == 0
    now = time.time()
    batch = IngestBatch()
    drift = {"count": 1, "corrected": False, "resources": [
        {"id": "file:/etc/<i id=pwn-id>", "expected": "<img id=pwn-expected src=x>",
         "found": "<svg id=pwn-found>"}]}
    batch.add("status", status_message("gw-01", commit=COMMIT, release=7, sync_state="drifted", drift=drift,
                                       paused=False, ts=now), now)
    site.store.apply_batch(batch)
    device = site.page("/devices/gw-01")
    device.wait_for_selector("#drift-table tr[data-resource]", timeout=WAIT_MS)
    assert "<img id=pwn-expected src=x>" in device.inner_text("#drift-table")
    assert device.locator("#pwn-id, #pwn-expected, #pwn-found").count() == 0
    assert site.console == []


# --- device drift and sync history ------------------------------------------------------------------


def test_device_page_shows_the_drift_table_pause_state_and_sync_history(site: Site) -> None:
    page = site.page("/devices/cam-03")
    page.wait_for_selector("#drift-table tr[data-resource='file:/etc/motion.conf']", timeout=WAIT_MS)
    row = page.inner_text("#drift-table tr[data-resource='file:/etc/motion.conf']")
    assert "file" in row
    assert "not reported" in row  # the device named the resource only: nothing is guessed
    # a device that says what differs, paused with a reason
    now = time.time()
    batch = IngestBatch()
    drift = {"count": 2, "corrected": False, "resources": [
        {"id": "file:/etc/nginx.conf", "expected": "sha256 ab12cd34ef56 mode 0644",
         "found": "sha256 99ff00aa11bb mode 0666"}, "link:/etc/alt"]}
    batch.add("status", status_message("gw-02", commit=COMMIT, release=7, sync_state="drifted", drift=drift,
                                       paused=True, ts=now), now)
    batch.add("events", event_message("gw-02", type="paused", commit=COMMIT, release=7, ts=now,
                                      reason="site visit"), now)
    site.store.apply_batch(batch)
    page = site.page("/devices/gw-02")
    page.wait_for_selector("#drift-table tr[data-resource='link:/etc/alt']", timeout=WAIT_MS)
    nginx = page.inner_text("#drift-table tr[data-resource='file:/etc/nginx.conf']")
    assert "sha256 ab12cd34ef56 mode 0644" in nginx
    assert "sha256 99ff00aa11bb mode 0666" in nginx
    assert "link" in page.inner_text("#drift-table tr[data-resource='link:/etc/alt']")
    assert page.inner_text("#dev-paused").startswith("yes")
    history = page.inner_text("#event-table tbody")
    assert "paused" in history
    assert "site visit" in history
    assert "sync_succeeded" in history
    assert site.console == []


def test_device_page_pauses_and_resumes_the_device_from_the_fleet_server(site: Site) -> None:
    page = site.page("/devices/cam-03")
    page.wait_for_selector("#actions-readonly", timeout=WAIT_MS)
    assert page.is_visible("#actions-readonly")  # no token: no buttons
    assert not page.is_visible("button.act[data-action='pause']")
    page = site.page("/devices/cam-03", token=ADMIN)
    page.wait_for_selector("button.act[data-action='pause']", state="visible", timeout=WAIT_MS)
    page.click("button.act[data-action='pause']")
    wait_js(page, "document.getElementById('action-result').textContent.includes('give a reason')")
    assert site.controls == []
    page.fill("#action-actor", "carol")
    page.fill("#action-reason", "INC-9: camera maintenance")
    page.click("button.act[data-action='pause']")
    wait_js(page, "document.getElementById('action-result').textContent === 'pause: done'")
    page.click("button.act[data-action='resume']")
    wait_js(page, "document.getElementById('action-result').textContent === 'resume: done'")
    assert site.controls == [("cam-03", True, "INC-9: camera maintenance"),
                             ("cam-03", False, "INC-9: camera maintenance")]
    rows = site.store.audit(action="device.pause")
    assert [(r["actor"], r["target"], r["reason"]) for r in rows] == [
        ("carol", "device/cam-03", "INC-9: camera maintenance")]
    assert site.console == []


def test_the_console_pages_are_served_with_the_strict_policy(site: Site) -> None:
    for path in ("/releases", "/audit"):
        response = httpx.get(site.url + path, timeout=5.0)
        assert response.status_code == 200, path
        assert "default-src 'none'" in response.headers["content-security-policy"]
        assert '<script src="/static/console.js"' in response.text
    assert httpx.get(f"{site.url}/static/console.js", timeout=5.0).status_code == 200


# --- device table: search and sort ------------------------------------------------------------------

TABLE_IDS = "rs => rs.map(r => r.dataset.device)"
SORT_MARK = "document.querySelector(\"th[data-sort='sync_state']\").getAttribute('aria-sort')"


def test_device_table_searches_by_id_and_sorts_keeping_the_fleet_counts(site: Site) -> None:
    page = site.page("/")
    page.wait_for_selector("#device-table tr[data-device='sensor-02']", timeout=WAIT_MS)
    page.fill("#f-id", "cam-0")
    page.click("#filters button[type=submit]")
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 5")
    assert "id_prefix=cam-0" in page.url
    assert page.eval_on_selector_all("#device-table tr[data-device]", TABLE_IDS) == [
        "cam-01", "cam-02", "cam-03", "cam-04", "cam-05"]
    # the counts are the fleet's, never the filtered table's
    wait_js(page, "document.getElementById('sum-devices').textContent === '10'")
    assert "sensor" not in page.inner_text("#device-table")
    # sort by sync state: a header is a link; clicking the sorted column again flips it
    page.click("#device-table th[data-sort='sync_state'] a")
    wait_js(page, f"{SORT_MARK} === 'ascending'")
    wait_js(page, "document.querySelector('#device-table tr[data-device]')?.dataset.device === 'cam-03'")
    assert page.eval_on_selector_all("#device-table tr[data-device]", TABLE_IDS) == [
        "cam-03", "cam-04", "cam-01", "cam-02", "cam-05"]
    assert "id_prefix=cam-0" in page.url
    page.click("#device-table th[data-sort='sync_state'] a")
    wait_js(page, f"{SORT_MARK} === 'descending'")
    wait_js(page, "document.querySelector('#device-table tr[data-device]')?.dataset.device === 'cam-05'")
    assert page.eval_on_selector_all("#device-table tr[data-device]", TABLE_IDS) == [
        "cam-05", "cam-02", "cam-01", "cam-04", "cam-03"]
    # a new filter keeps the sort
    page.fill("#f-id", "")
    page.select_option("#f-online", "true")
    page.click("#filters button[type=submit]")
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 8")
    assert "sort=sync_state" in page.url
    assert "order=desc" in page.url
    assert page.eval_on_selector_all("#device-table tr[data-device]", TABLE_IDS)[-2:] == ["cam-04", "cam-03"]
    assert page.inner_text("#sum-devices") == "10"
    # the most drifted device first
    page.goto(site.url + "/?sort=drift&order=desc")
    wait_js(page, "document.querySelector('#device-table tr[data-device]')?.dataset.device === 'cam-03'")
    assert page.get_attribute("#device-table th[data-sort='drift']", "aria-sort") == "descending"
    assert site.console == []


def test_the_devices_api_validates_search_and_sort(site: Site) -> None:
    url = f"{site.url}/api/v1/devices"
    ok = httpx.get(url, params={"id_prefix": "gw-", "sort": "release", "order": "desc"}, timeout=5.0)
    assert ok.status_code == 200
    assert [d["id"] for d in ok.json()["devices"]] == ["gw-03", "gw-02", "gw-01"]  # same release: by id, desc
    for params, reason in (({"sort": "labels"}, "sort must be one of id, online"),
                           ({"sort": "id;drop"}, "sort must be one of"),
                           ({"order": "up"}, "order must be asc or desc"),
                           ({"id_prefix": "cam%"}, "id_prefix must be"),
                           ({"id_prefix": "x" * 129}, "id_prefix must be")):
        answer = httpx.get(url, params=params, timeout=5.0)
        assert answer.status_code == 400, params
        assert reason in answer.json()["error"], params


def test_the_rollout_page_shows_a_preflight_with_its_refusals(rollout_site: RolloutSite) -> None:
    site, runner = rollout_site.site, rollout_site.runner
    site.store.record_release(9, "9" * 40, ["ed25519:key"], time.time())
    rid = runner.start(9, runner.resolve_plan(PLAN, None), actor="alice", reason="release 9", preflight=True)
    assert runner.state(rid).phase == "waiting_approval"
    summary = {"state": "failed", "release": 9,
               "counts": {"change": 3, "nochange": 1, "refused": 2, "waiting": 0, "offline": 1},
               "refusals": [{"reason": "drivers unavailable on this device: sysctl", "devices": 2,
                             "examples": ["cam-01", "gw-02"]}], "offline": ["cam-03"], "waiting": []}
    site.store.add_audit("preflight", "rollout.preflight", f"rollout/{rid}", "preflight failed", summary)
    page = site.page(f"/rollouts/{rid}")
    page.wait_for_selector("#preflight:not([hidden]) #pf-refusals li", timeout=WAIT_MS)
    assert "failed" in page.inner_text("#pf-state")
    assert "2 would refuse" in page.inner_text("#pf-state")
    refusal = page.inner_text("#pf-refusals li")
    assert "2 device(s): drivers unavailable on this device: sysctl" in refusal
    assert page.get_attribute("#pf-refusals li a", "href") == "/devices/cam-01"
    assert page.inner_text("#pf-offline") == "cam-03"
    other = site.page(f"/rollouts/{rollout_site.rollout_id}")  # a rollout without a preflight
    other.wait_for_selector("#ro-phase .pill", timeout=WAIT_MS)
    assert other.is_hidden("#preflight")
    assert site.console == []
