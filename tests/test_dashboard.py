"""The web dashboard in a real headless Chromium (Debian's ``chromium`` driven by Playwright) against
the real app served by uvicorn on 127.0.0.1 over a real SQLite store filled with real messages.

Screenshots are taken into pytest's temporary directory on every run; with ``DASHBOARD_SCREENSHOTS=1``
they are also copied to ``docs/images/`` (overview.png, device.png, rollout.png; releases.png and
audit.png come from ``tests/test_dashboard_console.py``). When a test fails,
every page it opened is saved as ``shots/failed-<n>.png`` in its temporary directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_core.messages import status_message
from fleet_server.api import ApiActions, create_app, dashboard
from fleet_server.api.dashboard import CONTENT_SECURITY_POLICY
from fleet_server.config import GitConfig, ServerConfig, StoreConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.store import IngestBatch, open_store
from tests.support.dashboard_site import (
    ADMIN,
    COMMIT,
    FLEET,
    HEALTH_SAMPLES,
    READER,
    WAIT_MS,
    RolloutSite,
    Site,
    chart_samples,
    fill_fleet,
    serve,
    server_config,
    table_devices,
    wait_js,
    wave_meta,
)

pytestmark = pytest.mark.slow


def test_overview_shows_the_fleet_without_console_errors(site: Site) -> None:
    page = site.page("/")
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 10",
                           timeout=WAIT_MS)
    assert table_devices(page) == sorted(d[0] for d in FLEET)
    assert page.inner_text("#sum-devices") == "10"
    assert page.inner_text("#sum-online") == "8"
    assert page.inner_text("#sum-offline") == "2"
    states = page.inner_text("#sum-states")
    assert "in_sync" in states
    assert "failed" in states
    assert "drifted" in states
    assert "release 7" in page.inner_text("#sum-releases")
    row = page.locator("#device-table tr[data-device='cam-03']")
    assert "1 drifted" in row.inner_text()
    assert "offline" in page.locator("#device-table tr[data-device='gw-03']").inner_text()
    assert page.inner_text("#token-state") == "read-only"
    site.screenshot(page, "overview.png")
    assert site.console == []


def test_label_filter_narrows_the_table(site: Site) -> None:
    page = site.page("/")
    page.wait_for_selector("#device-table tr[data-device='cam-01']", timeout=WAIT_MS)
    page.fill("#f-label", "site=south class=camera")
    page.click("#filters button[type=submit]")
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 2",
                           timeout=WAIT_MS)
    assert table_devices(page) == ["cam-04", "cam-05"]
    assert "label=site%3Dsouth+class%3Dcamera" in page.url
    assert page.input_value("#f-label") == "site=south class=camera"
    # the older key:value form is read too
    page.goto(site.url + "/?label=site:south+class:camera")
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 2",
                           timeout=WAIT_MS)
    assert table_devices(page) == ["cam-04", "cam-05"]
    # a label chip filters by that label; a state bar by that sync state
    page.goto(site.url + "/")
    page.wait_for_selector("#device-table tr[data-device='sensor-01']", timeout=WAIT_MS)
    page.locator("#device-table tr[data-device='sensor-01'] a.chip", has_text="site=east").click()
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 2",
                           timeout=WAIT_MS)
    assert table_devices(page) == ["sensor-01", "sensor-02"]
    page.goto(site.url + "/")
    page.locator("#sum-states a", has_text="failed").click()
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 1",
                           timeout=WAIT_MS)
    assert table_devices(page) == ["cam-04"]
    page.goto(site.url + "/?online=false")
    wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 2",
                           timeout=WAIT_MS)
    assert table_devices(page) == ["cam-05", "gw-03"]
    page.goto(site.url + "/?label=site=nowhere")
    page.wait_for_selector("text=no device matches these filters", timeout=WAIT_MS)
    assert site.console == []


def test_a_refused_label_filter_keeps_the_fleet_counts_and_says_why(site: Site) -> None:
    page = site.page("/?label=site")
    page.wait_for_selector("#device-table td.filter-error", timeout=WAIT_MS)
    assert "label filter must be key=value" in page.inner_text("#device-table td.filter-error")
    wait_js(page, "document.getElementById('sum-devices').textContent === '10'", timeout=WAIT_MS)
    assert "in_sync" in page.inner_text("#sum-states")
    assert "key=value" in page.inner_text("#status-line")


def test_overview_refreshes_when_a_device_reports(site: Site) -> None:
    page = site.page("/?refresh=0.5")
    page.wait_for_selector("#device-table tr[data-device='cam-04']", timeout=WAIT_MS)
    assert "failed" in page.locator("#device-table tr[data-device='cam-04']").inner_text()
    batch = IngestBatch()
    batch.add("status", status_message("cam-04", commit=COMMIT, release=7, sync_state="in_sync",
                                       drift={}, paused=False, ts=time.time()), time.time())
    batch.add("status", status_message("new-01", commit=COMMIT, release=7, sync_state="in_sync",
                                       drift={}, paused=False, ts=time.time()), time.time())
    site.store.apply_batch(batch)
    page.wait_for_selector("#device-table tr[data-device='new-01']", timeout=WAIT_MS)
    assert "in_sync" in page.locator("#device-table tr[data-device='cam-04']").inner_text()
    # the summary counts are a copy at most about 2 s old (docs/api.md): they follow within a refresh or two
    wait_js(page, "document.getElementById('sum-devices').textContent === '11'", timeout=WAIT_MS)
    assert site.console == []


# --- device detail ---------------------------------------------------------------------------------


def test_device_page_shows_release_events_and_health_charts(site: Site) -> None:
    page = site.page("/devices/cam-01")
    wait_js(page, "document.querySelector('#chart-cpu').dataset.points === '36'", timeout=WAIT_MS)
    assert page.get_attribute("#chart-memory", "data-points") == "36"
    assert page.get_attribute("#chart-disk", "data-points") == "36"
    assert page.locator("#chart-cpu path.line").count() == 1
    assert page.inner_text("#dev-release") == "7"
    assert page.inner_text("#dev-revision") == COMMIT
    assert page.inner_text("#dev-online") == "online"
    assert "site=north" in page.inner_text("#dev-labels")
    assert "motion" in page.inner_text("#dev-checks")
    events = page.inner_text("#event-table tbody")
    assert "sync_succeeded" in events
    assert "sync_started" in events
    site.screenshot(page, "device.png")
    # only the last hour: samples 5, 10, ... 55 minutes old (the one 60 minutes old has just left it)
    page.select_option("#health-hours", "1")
    wait_js(page, "document.querySelector('#chart-cpu').dataset.points === '11'")
    assert site.console == []


def test_device_page_shows_drift_and_failures(site: Site) -> None:
    page = site.page("/devices/cam-03")
    page.wait_for_selector("#dev-drift tr[data-resource]", timeout=WAIT_MS)
    assert "file:/etc/motion.conf" in page.inner_text("#dev-drift")
    assert "drift_detected" in page.inner_text("#event-table")
    assert page.get_attribute("#chart-cpu", "data-points") == "0"
    assert "no samples yet" in page.text_content("#chart-cpu")
    page = site.page("/devices/gw-03")
    page.wait_for_selector("#event-table td >> text=health check nginx failed", timeout=WAIT_MS)
    assert page.inner_text("#dev-online") == "offline"
    error = page.inner_text("#dev-error")
    assert error.startswith("sync_rolled_back (release 7): health check nginx failed"
                            " (3 sync(s) in a row, the last ")
    assert error.endswith(" min ago)")
    assert site.console == []


def test_unknown_device_page_says_so(site: Site) -> None:
    page = site.page("/devices/ghost-01")
    page.wait_for_selector("#status-line.bad", timeout=WAIT_MS)
    assert "no device ghost-01" in page.inner_text("#status-line")
    # the only console errors are the browser's own notes about the two 404 answers
    assert site.console
    assert all("404" in line for line in site.console)


def test_rollouts_page_without_a_rollout_engine_says_so(site: Site) -> None:
    page = site.page("/rollouts")
    page.wait_for_selector("#status-line.bad", timeout=WAIT_MS)
    assert page.inner_text("#status-line") == "this fleet server runs no rollout engine"
    assert site.console
    assert all("404" in line for line in site.console)


# --- HTTP surface -----------------------------------------------------------------------------------


def test_pages_are_html_with_a_strict_content_security_policy(site: Site) -> None:
    for path in ("/", "/devices/cam-01", "/rollouts", "/rollouts/r-1", "/releases", "/audit"):
        response = httpx.get(site.url + path, timeout=5.0)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-frame-options"] == "DENY"
        assert "<script src=\"/static/dashboard.js\"" in response.text
        assert "http://" not in response.text.replace(site.url, "")
        assert "https://" not in response.text
    for asset in ("dashboard.js", "console.js", "charts.js", "dashboard.css", "favicon.svg"):
        assert httpx.get(f"{site.url}/static/{asset}", timeout=5.0).status_code == 200
    assert httpx.get(site.url + "/devices/bad%24id", timeout=5.0).status_code == 400
    assert httpx.get(site.url + "/devices/a%20b", timeout=5.0).status_code == 400
    assert httpx.get(site.url + "/favicon.ico", timeout=5.0).status_code == 200


def test_health_history_endpoint(site: Site) -> None:
    answer = httpx.get(site.url + "/api/v1/devices/cam-01/health", params={"hours": 6}, timeout=5.0)
    assert answer.status_code == 200
    samples = answer.json()["health"]
    assert len(samples) == HEALTH_SAMPLES
    assert [s["ts"] for s in samples] == sorted(s["ts"] for s in samples)
    assert samples[-1]["metrics"]["memory_percent"] == pytest.approx(40 + 35 * 0.8)
    limited = httpx.get(site.url + "/api/v1/devices/cam-01/health", params={"limit": 5}, timeout=5.0).json()
    assert [s["ts"] for s in limited["health"]] == [s["ts"] for s in samples[-5:]]
    for params, status in (({"hours": 0}, 400), ({"hours": 100}, 400), ({"hours": "x"}, 400),
                           ({"limit": 0}, 400)):
        assert httpx.get(site.url + "/api/v1/devices/cam-01/health", params=params,
                         timeout=5.0).status_code == status
    assert httpx.get(site.url + "/api/v1/devices/ghost-01/health", timeout=5.0).status_code == 404


def test_read_token_is_needed_when_configured(tmp_path: Path, browser: Any,
                                              store_config: StoreConfig) -> None:
    store = open_store(store_config)
    fill_fleet(store)
    app = create_app(store, server_config(tmp_path, read_token=True), ServerMetrics(), actions=ApiActions())
    with serve(app) as url:
        site = Site(url, store, browser, tmp_path)
        assert httpx.get(url + "/api/v1/devices/cam-01/health", timeout=5.0).status_code == 401
        page = site.page("/")
        page.wait_for_selector("#status-line.bad", timeout=WAIT_MS)
        assert "needs a token to read the fleet" in page.inner_text("#status-line")
        assert site.console == []  # no request was made without the token
        assert table_devices(page) == []
        page.fill("#token-input", READER)
        page.click("#token-use")
        wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 10",
                               timeout=WAIT_MS)
        assert page.inner_text("#token-state") == "token held"
        assert page.evaluate("window.sessionStorage.getItem('edge-fleet.token')") == READER
        assert page.evaluate("window.localStorage.length") == 0
        page.click("#token-forget")
        assert page.evaluate("window.sessionStorage.getItem('edge-fleet.token')") is None
    store.close()


# --- rollouts --------------------------------------------------------------------------------------

def test_rollouts_list_links_to_each_rollout(rollout_site: RolloutSite) -> None:
    site = rollout_site.site
    page = site.page("/rollouts")
    page.wait_for_selector(f"#rollout-table tr[data-rollout='{rollout_site.rollout_id}']", timeout=WAIT_MS)
    row = page.locator(f"#rollout-table tr[data-rollout='{rollout_site.rollout_id}']")
    assert "running" in row.inner_text()
    assert "1 of 2" in row.inner_text()
    row.locator("a").click()
    page.wait_for_selector("section[data-wave='1']", timeout=WAIT_MS)
    assert page.url.endswith(f"/rollouts/{rollout_site.rollout_id}")
    assert site.console == []


def test_rollout_chart_follows_the_waves(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    page = site.page(f"/rollouts/{rid}?refresh=0.5", token=ADMIN)
    wait_js(page, "document.querySelector(\"section[data-wave='0'] .wave-meta\")?.dataset.pending === '2'")
    assert wave_meta(page, 0) == {"done": 0, "failed": 0, "pending": 2, "offline": 0}
    assert page.inner_text("#ro-release").startswith("8 (eeeeeeeeeeee)")
    assert page.inner_text("#ro-previous") == "7"
    assert page.inner_text("#ro-wave") == "1 of 2"
    first_samples = chart_samples(page, 0)
    assert first_samples >= 1
    assert {d for d, *_ in rollout_site.published} == {"cam-01", "gw-01"}

    # the canaries apply release 8: wave 1 passes its gates and the fleet wave starts
    rollout_site.report({"cam-01": "sync_succeeded", "gw-01": "sync_succeeded"})
    wait_js(page, "document.querySelector(\"section[data-wave='0'] .wave-meta\").dataset.done === '2'")
    wait_js(page, "document.getElementById('ro-wave').textContent === '2 of 2'")
    assert chart_samples(page, 0) > first_samples
    wait_js(page, "document.querySelector('#gate-table tbody td .pill.ok') !== null")
    assert "passed" in page.inner_text("#gate-table tbody")

    # the fleet wave: five apply, one fails; the offline devices stay behind
    rollout_site.report({"cam-02": "sync_succeeded", "cam-03": "sync_succeeded", "gw-02": "sync_succeeded",
                         "sensor-01": "sync_succeeded", "sensor-02": "sync_succeeded",
                         "cam-04": "sync_failed"})
    wait_js(page, "document.querySelector(\"section[data-wave='1'] .wave-meta\").dataset.done === '5'")
    fleet = wave_meta(page, 1)
    assert fleet["done"] == 5
    assert fleet["failed"] == 1
    assert fleet["pending"] + fleet["offline"] == 2
    assert chart_samples(page, 1) >= 2
    assert page.locator("section[data-wave='1'] svg path.area").count() == 4
    site.screenshot(page, "rollout.png")
    assert site.console == []


ROLLOUT_ROWS = "#ro-device-table tr[data-device]"
ROW_IDS = "rs => rs.map(r => r.dataset.device)"


def test_rollout_page_lists_its_devices_a_page_at_a_time(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    page = site.page(f"/rollouts/{rid}?refresh=0.5", token=ADMIN)
    wait_js(page, "document.querySelectorAll('#ro-device-table tr[data-device]').length === 10")
    rows = page.eval_on_selector_all(ROLLOUT_ROWS, ROW_IDS)
    assert rows == sorted(d for d, *_ in FLEET)
    assert page.inner_text("#ro-page-info") == "1–10 of 10"
    assert page.inner_text("#ro-device-count") == "(10 in the rollout)"
    filtered = site.page(f"/rollouts/{rid}?refresh=0.5&wave=1&state=assigned", token=ADMIN)
    wait_js(filtered, "document.querySelectorAll('#ro-device-table tr[data-device]').length === 2")
    rows = filtered.eval_on_selector_all(ROLLOUT_ROWS, ROW_IDS)
    assert rows == ["cam-01", "gw-01"]
    assert filtered.inner_text("#ro-page-info") == "1–2 of 2"
    assert filtered.input_value("#ro-f-wave") == "1"
    assert filtered.input_value("#ro-f-state") == "assigned"
    assert site.console == []


def test_pause_works_with_the_admin_token_and_is_refused_without(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    # without a token the page is read-only: no buttons, and the API refuses a direct call
    page = site.page(f"/rollouts/{rid}?refresh=0.5")
    page.wait_for_selector("section[data-wave='0']", timeout=WAIT_MS)
    assert page.is_visible("#actions-readonly")
    assert not page.is_visible("button[data-action='pause']")
    refused = httpx.post(f"{site.url}/api/v1/rollouts/{rid}/pause", json={"reason": "x"}, timeout=5.0)
    assert refused.status_code == 401
    assert site.console == []

    # a wrong token: the button is there, the server refuses, nothing changes
    page = site.page(f"/rollouts/{rid}?refresh=0.5", token="not-the-admin-token")
    page.wait_for_selector("button[data-action='pause']", state="visible", timeout=WAIT_MS)
    page.fill("#action-reason", "a reason")
    page.click("button[data-action='pause']")
    page.wait_for_selector("#action-result.bad", timeout=WAIT_MS)
    assert "pause refused: invalid token" in page.inner_text("#action-result")
    assert rollout_site.runner.state(rid).phase == "running"
    site.console.clear()  # the browser notes the 403 answer as a console error

    # the admin token pasted into the page: pause, then resume, both audited with the reason
    page = site.page(f"/rollouts/{rid}?refresh=0.5")
    page.wait_for_selector("section[data-wave='0']", timeout=WAIT_MS)
    page.fill("#token-input", ADMIN)
    page.click("#token-use")
    page.wait_for_selector("button[data-action='pause']", state="visible", timeout=WAIT_MS)
    page.fill("#action-actor", "carol")
    page.fill("#action-reason", "checking canary metrics")
    page.click("button[data-action='pause']")
    page.wait_for_selector("#action-result.ok", timeout=WAIT_MS)
    assert rollout_site.runner.state(rid).phase == "paused"
    wait_js(page, "document.body.dataset.phase === 'paused'")
    assert page.inner_text("#ro-phase") == "paused"
    audit = httpx.get(f"{site.url}/api/v1/audit", timeout=5.0).json()["audit"]
    pauses = [(a["actor"], a["reason"]) for a in audit if a["action"] == "rollout.pause"]
    assert pauses == [("carol", "checking canary metrics")]
    # buttons follow the phase; the engine refuses what does not fit it anyway (409)
    wait_js(page, "document.querySelector(\"button[data-action='pause']\").disabled")
    assert page.is_enabled("button[data-action='resume']")
    assert not page.is_enabled("button[data-action='promote']")
    again = httpx.post(f"{site.url}/api/v1/rollouts/{rid}/pause", json={"reason": "again"},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5.0)
    assert again.status_code == 409
    page.click("button[data-action='resume']")
    wait_js(page, "document.getElementById('action-result').textContent === 'resume: done'")
    assert rollout_site.runner.state(rid).phase == "running"
    assert site.console == []


def test_public_names_are_pinned() -> None:
    assert sorted(dashboard.__all__) == [
        "CONTENT_SECURITY_POLICY", "DEFAULT_REFRESH_SECONDS", "MAX_HEALTH_HOURS", "MAX_HEALTH_SAMPLES",
        "ROLLOUT_ID_RE", "STATIC_DIR", "TEMPLATE_DIR", "dashboard_router", "install_dashboard"]
    for name in ("base.html", "overview.html", "device.html", "rollouts.html", "rollout.html",
                 "releases.html", "audit.html"):
        assert (dashboard.TEMPLATE_DIR / name).is_file()
    # nothing the browser loads comes from elsewhere: no CDN, no external URL in any asset
    for asset in [*dashboard.STATIC_DIR.iterdir(), *dashboard.TEMPLATE_DIR.iterdir()]:
        text = asset.read_text()
        assert "https://" not in text, asset
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), asset


def test_rollout_page_says_when_the_server_takes_no_action(tmp_path: Path, browser: Any,
                                                           store_config: StoreConfig) -> None:
    store = open_store(store_config)
    config = ServerConfig(git=GitConfig(cache_dir=tmp_path / "cache"))  # no admin token file
    app = create_app(store, config, ServerMetrics(), actions=ApiActions())
    with serve(app) as url:
        site = Site(url, store, browser, tmp_path)
        page = site.page("/rollouts/r-1", token=ADMIN)
        page.wait_for_selector("#status-line.bad", timeout=WAIT_MS)
        assert "no admin token configured" in page.inner_text("#actions-readonly")
        assert not page.is_visible("button[data-action='pause']")
    store.close()


# --- drawing: a finished wave, a narrow screen, disabled buttons -----------------------------------

RIGHT_EDGE_LAYER = """n => {
  const svg = document.querySelector(`section[data-wave='${n}'] svg`);
  const box = svg.getBoundingClientRect();
  // just inside the plot's right edge (12 px margin in charts.js), half way up the plot
  const hit = document.elementFromPoint(box.left + box.width - 15, box.top + box.height * 78 / 170);
  return hit && hit.getAttribute("class");
}"""


def test_a_finished_wave_is_drawn_in_its_final_state(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    page = site.page(f"/rollouts/{rid}?refresh=0.5", token=ADMIN)
    wait_js(page, "document.querySelector(\"section[data-wave='0'] .wave-meta\")?.dataset.pending === '2'")
    rollout_site.report({"cam-01": "sync_succeeded", "gw-01": "sync_succeeded"})
    wait_js(page, "document.getElementById('ro-wave').textContent === '2 of 2'")
    assert "2 done" in page.inner_text("section[data-wave='0'] .wave-meta")
    assert "passed" in page.inner_text("section[data-wave='0'] .wave-meta")
    # the chart ends in the wave's final state (done, green), not in the pending grey it started in
    deadline = time.monotonic() + WAIT_MS / 1000
    layer = None
    while time.monotonic() < deadline:
        layer = page.evaluate(RIGHT_EDGE_LAYER, 0)
        if layer == "area s-done":
            break
        page.wait_for_timeout(100)
    assert layer == "area s-done"
    assert site.console == []


def _overflow(page: Any) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


def test_a_narrow_screen_shows_the_pages_without_sideways_scrolling(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    context = site.browser.new_context(viewport={"width": 375, "height": 740})
    try:
        page = context.new_page()
        page.goto(f"{site.url}/")
        wait_js(page, "document.querySelectorAll('#device-table tbody tr[data-device]').length === 10")
        assert _overflow(page) <= 0
        page.goto(f"{site.url}/rollouts/{rid}")
        page.wait_for_selector("section[data-wave='1'] svg path, section[data-wave='1'] svg text",
                               timeout=WAIT_MS)
        assert _overflow(page) <= 0
        page.goto(f"{site.url}/rollouts")
        page.wait_for_selector(f"#rollout-table tr[data-rollout='{rid}']", timeout=WAIT_MS)
        assert _overflow(page) <= 0
    finally:
        context.close()


def test_a_disabled_abort_button_looks_disabled(rollout_site: RolloutSite) -> None:
    site, rid = rollout_site.site, rollout_site.rollout_id
    page = site.page(f"/rollouts/{rid}?refresh=0.5", token=ADMIN)
    page.wait_for_selector("button[data-action='abort']", state="visible", timeout=WAIT_MS)
    wait_js(page, "document.body.dataset.phase === 'running'")
    style = "b => { const s = getComputedStyle(b); return [s.color, s.borderColor, s.cursor]; }"
    enabled = page.eval_on_selector("button[data-action='abort']", style)
    aborted = httpx.post(f"{site.url}/api/v1/rollouts/{rid}/abort", json={"reason": "test"},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5.0)
    assert aborted.status_code == 200
    wait_js(page, "document.querySelector(\"button[data-action='abort']\").disabled")
    disabled = page.eval_on_selector("button[data-action='abort']", style)
    pause = page.eval_on_selector("button[data-action='pause']", style)
    assert disabled[0] != enabled[0]  # no longer the danger red
    assert disabled[1] != enabled[1]
    assert disabled == pause  # drawn like every other disabled button
    assert disabled[2] == "not-allowed"
    assert site.console == []


def test_a_succeeded_rollout_stays_succeeded_on_the_pages_once_superseded(rollout_site: RolloutSite) -> None:
    site, runner = rollout_site.site, rollout_site.runner
    assert runner.act(rollout_site.rollout_id, "abort", actor="alice", reason="replaced") is None
    quick = runner.resolve_plan({"canary_first": False, "waves": [
        {"name": "all", "percent": 100, "soak": 0, "timeout": 1, "offline": "skipped"}]}, None)
    first = runner.start(8, quick, actor="alice", reason="release 8 again")
    online = [d for d, _, _, up, _ in FLEET if up]
    rollout_site.report(dict.fromkeys(online, "sync_succeeded"))
    deadline = time.monotonic() + 10
    while runner.state(first).phase != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)
        runner.tick()
    assert runner.state(first).phase == "succeeded"
    site.store.record_release(9, "f" * 40, ["ed25519:key"], time.time())
    second = runner.start(9, quick, actor="alice", reason="release 9")
    page = site.page("/rollouts")
    page.wait_for_selector(f"#rollout-table tr[data-rollout='{first}'] .superseded", timeout=WAIT_MS)
    row = page.inner_text(f"#rollout-table tr[data-rollout='{first}']")
    assert "succeeded" in row
    assert f"superseded by {second}" in row
    detail = site.page(f"/rollouts/{first}")
    detail.wait_for_selector("#ro-superseded a", timeout=WAIT_MS)
    assert detail.inner_text("#ro-phase") == "succeeded"
    assert detail.inner_text("#ro-superseded a") == second
    assert site.console == []
