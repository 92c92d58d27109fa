"""``/api/v1/rollouts`` and ``fleetctl rollout``: uvicorn on 127.0.0.1 in front of the real runner, the real
Ingestor, a real Mosquitto and simulated devices (``bench.bench_rollout.SimFleet``), plus the
Prometheus rollout metrics and ``fleetctl lint`` of rollout plans."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

from bench.bench_rollout import SimFleet
from edge_core.trust.keys import format_verify_key
from fleet_server import fleetctl
from fleet_server.api import ApiActions, create_app
from fleet_server.cli.rollout import format_rollout, progress_bar, watch_exit_code
from fleet_server.config import (
    GitConfig,
    GitTrust,
    HttpConfig,
    ServerConfig,
    StoreConfig,
    parse_server_config,
)
from fleet_server.ingest import Ingestor
from fleet_server.lint import lint_repo
from fleet_server.main import GitPlans
from fleet_server.metrics import ServerMetrics
from fleet_server.releases import GitWatcher
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.signing import sign_release
from fleet_server.store import FleetStore, open_store
from tests.support.api_server import serve_app
from tests.support.broker import Mosquitto
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.mirror import GitDaemon

ADMIN = "rollout-admin-token"
OLD = (1, "1" * 40)
NEW = (2, "2" * 40)
BAD = (3, "3" * 40)
QUICK_PLAN = {"waves": [{"name": "canary", "soak": 0}, {"name": "rest", "percent": 100, "soak": 0}]}


@dataclass
class Api:
    url: str
    store: FleetStore
    runner: RolloutRunner
    metrics: ServerMetrics
    fleet: SimFleet
    token_file: Path
    ingestor: Ingestor

    def headers(self, actor: str | None = "carol") -> dict[str, str]:
        h = {"Authorization": f"Bearer {ADMIN}"}
        if actor:
            h["X-Actor"] = actor
        return h

    def wait_phase(self, rid: str, phases: tuple[str, ...], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        phase = ""
        while time.monotonic() < deadline:
            phase = httpx.get(f"{self.url}/api/v1/rollouts/{rid}").json()["phase"]
            if phase in phases:
                return phase
            time.sleep(0.1)
        return phase


@pytest.fixture
def api(tmp_path: Path, store_config: StoreConfig) -> Iterator[Api]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    token_file.chmod(0o600)
    with Mosquitto(tmp_path / "broker") as broker:
        raw = {"mqtt": {"port": broker.port, "client_id": "fleet-server-api"}}
        mqtt = parse_server_config(raw, tmp_path).mqtt
        config = ServerConfig(mqtt=mqtt, http=HttpConfig(admin_token_file=token_file))
        store = open_store(store_config)
        metrics = ServerMetrics()
        ingestor = Ingestor(config, store, metrics.ingest)
        ingestor.start()
        assert ingestor.wait_connected(10.0)
        runner = RolloutRunner(store, ingestor.publish_desired, tick_interval=0.1)
        runner.start_thread()
        metrics.attach_rollouts(runner)
        devices = {f"dev-{i}": ({"canary": "true"} if i < 2 else {}) for i in range(8)}
        fleet = SimFleet(broker.port, devices, initial=OLD,
                         outcome=lambda d, r: "failed" if r == BAD[0] and d == "dev-0" else "applied")
        for device, labels in devices.items():
            store.register_device(device, labels=labels)
        fleet.start()
        for version, commit in (OLD, NEW, BAD):
            store.record_release(version, commit, ["op"], time.time())
        deadline = time.monotonic() + 15
        while any(d["release"] is None for d in store.devices()) and time.monotonic() < deadline:
            time.sleep(0.05)
        app = create_app(store, config, metrics, actions=ApiActions(rollouts=runner))
        try:
            with serve_app(app) as url:
                yield Api(url, store, runner, metrics, fleet, token_file, ingestor)
        finally:
            fleet.stop()
            runner.stop()
            ingestor.stop()
            store.close()


def fleetctl_run(api: Api, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = fleetctl.main(["rollout", *argv, "--server", api.url, "--token-file", str(api.token_file)])
    out, err = capsys.readouterr()
    return code, out, err


def test_api_start_requires_the_admin_token_and_reports_the_rollout(api: Api) -> None:
    body = {"release": NEW[0], "plan": QUICK_PLAN, "reason": "ship it"}
    assert httpx.post(f"{api.url}/api/v1/rollouts", json=body).status_code == 401
    bad = httpx.post(f"{api.url}/api/v1/rollouts", json=body, headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 403
    invalid = httpx.post(f"{api.url}/api/v1/rollouts", headers=api.headers(),
                         json={"release": NEW[0], "plan": {"waves": [{"percent": 150}]}})
    assert invalid.status_code == 400
    assert "waves.0.percent" in invalid.json()["error"]
    unknown = httpx.post(f"{api.url}/api/v1/rollouts", headers=api.headers(),
                         json={"release": 99, "plan": QUICK_PLAN})
    assert unknown.status_code == 400
    assert "not a recorded signed release" in unknown.json()["error"]
    started = httpx.post(f"{api.url}/api/v1/rollouts", json=body, headers=api.headers())
    assert started.status_code == 201, started.text
    rid = started.json()["id"]
    assert api.wait_phase(rid, ("succeeded",)) == "succeeded"
    detail = httpx.get(f"{api.url}/api/v1/rollouts/{rid}").json()
    assert [w["name"] for w in detail["waves"]] == ["canary", "rest"]
    assert sum(w["progress"]["done"] for w in detail["waves"]) == 8
    assert detail["waves"][0]["devices"] == 2
    assert [g["passed"] for g in detail["gates"]] == [True, True]
    start = detail["audit"][0]
    assert (start["actor"], start["action"], start["reason"]) == ("carol", "rollout.start", "ship it")
    assert detail["samples"]
    listing = httpx.get(f"{api.url}/api/v1/rollouts").json()["rollouts"]
    assert listing[0]["id"] == rid
    assert listing[0]["wave_count"] == 2
    assert httpx.get(f"{api.url}/api/v1/rollouts/nope").status_code == 404
    refused = httpx.post(f"{api.url}/api/v1/rollouts/{rid}/pause", json={"reason": "late"},
                         headers=api.headers())
    assert refused.status_code == 409
    assert "cannot pause" in refused.json()["error"]
    again = httpx.post(f"{api.url}/api/v1/rollouts", json=body, headers=api.headers())
    assert again.status_code == 201  # the same release again after success is a new rollout
    assert httpx.post(f"{api.url}/api/v1/rollouts/{rid}/explode", json={"reason": "x"},
                      headers=api.headers()).status_code == 404


def test_metrics_expose_phase_devices_and_gates(api: Api) -> None:
    rid = api.runner.start(NEW[0], api.runner.resolve_plan(QUICK_PLAN, None), actor="t", reason="")
    assert api.wait_phase(rid, ("succeeded",)) == "succeeded"
    text = httpx.get(f"{api.url}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name.startswith("fleet_rollout")}
    phase = "fleet_rollout_phase"
    assert samples[(phase, (("phase", "succeeded"), ("release", "2"), ("rollout", rid)))] == 1.0
    assert samples[(phase, (("phase", "running"), ("release", "2"), ("rollout", rid)))] == 0.0
    applied = sum(v for (name, labels), v in samples.items()
                  if name == "fleet_rollout_devices" and ("state", "applied") in labels)
    assert applied == 8
    gates = "fleet_rollout_gate_evaluations"
    assert samples[(gates, (("result", "passed"), ("rollout", rid), ("wave", "0")))] == 1


def test_fleetctl_start_status_watch_and_actions(api: Api, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"waves": [{"name": "canary", "soak": 0, "promotion": "manual"},
                                                   {"name": "rest", "percent": 100, "soak": 0}]}))
    code, out, err = fleetctl_run(api, capsys, "start", "--release", "2", "--plan", str(plan_file),
                                  "--reason", "cli", "--actor", "dave", "--json")
    assert code == 0, err
    rid = json.loads(out)["id"]
    assert api.wait_phase(rid, ("waiting_approval",)) == "waiting_approval"
    code, out, err = fleetctl_run(api, capsys, "watch", rid, "--timeout", "0.5", "--interval", "0.2")
    assert code == 1
    assert "still waiting_approval" in err
    assert "wave 1 canary" in out
    # --json: one compact object a line, and only when something changed (it waits for approval).
    code, out, err = fleetctl_run(api, capsys, "watch", rid, "--json", "--timeout", "1", "--interval", "0.1")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert json.loads(lines[0])["phase"] == "waiting_approval"
    code, out, err = fleetctl_run(api, capsys, "resume", rid, "--reason", "nothing paused")
    assert code == 1
    assert "409" in err
    code, out, err = fleetctl_run(api, capsys, "pause", rid, "--reason", "lunch")
    assert (code, err) == (0, "")
    assert "now paused" in out
    code, out, _ = fleetctl_run(api, capsys, "resume", rid, "--reason", "back")
    assert code == 0
    code, out, err = fleetctl_run(api, capsys, "promote", rid, "--reason", "canaries fine", "--wave", "1",
                                  "--actor", "erin")
    assert code == 0, err
    code, out, err = fleetctl_run(api, capsys, "watch", rid, "--timeout", "20", "--interval", "0.2")
    assert code == 0, err
    assert "succeeded" in out
    assert "done 6" in out
    code, out, _ = fleetctl_run(api, capsys, "status", rid)
    assert code == 0
    assert "phase succeeded" in out
    assert "[##############################]" in out
    code, out, _ = fleetctl_run(api, capsys, "status")
    assert rid in out
    actors = [(a["actor"], a["action"]) for a in api.store.rollout_audit(rid)]
    assert ("dave", "rollout.start") in actors
    assert ("erin", "rollout.promote") in actors
    # a failing canary: the rollout halts and watch exits 1
    code, out, err = fleetctl_run(api, capsys, "start", "--release", "3", "--plan", str(plan_file), "--json")
    assert code == 0, err
    bad = json.loads(out)["id"]
    # the succeeded rollout keeps its outcome once superseded; being superseded is shown beside it
    code, out, err = fleetctl_run(api, capsys, "watch", rid, "--timeout", "5", "--interval", "0.2")
    assert code == 0, err
    code, out, _ = fleetctl_run(api, capsys, "status", rid)
    assert f"phase succeeded  wave 2 of 2  superseded by {bad}" in out
    code, out, _ = fleetctl_run(api, capsys, "status", "--json")
    listed = {r["id"]: r for r in json.loads(out)["rollouts"]}
    assert (listed[rid]["phase"], listed[rid]["superseded_by"]) == ("succeeded", bad)
    assert listed[bad]["superseded_by"] is None
    code, out, _ = fleetctl_run(api, capsys, "watch", bad, "--timeout", "20", "--interval", "0.2")
    assert code == 1
    assert "halted" in out
    code, out, err = fleetctl_run(api, capsys, "rollback", bad, "--reason", "undo")
    assert code == 0, err
    assert api.wait_phase(bad, ("rolled_back",)) == "rolled_back"
    assert api.fleet.running["dev-0"] == NEW  # it failed and kept its release; the others never got 3
    assert all(r[0] <= NEW[0] for r in api.fleet.running.values())


def test_text_rendering() -> None:
    assert progress_bar({"done": 1, "failed": 1, "pending": 2}, width=8) == "[##xx....]"
    assert progress_bar({}, width=4) == "[    ]"
    assert watch_exit_code("succeeded") == 0
    assert watch_exit_code("rolled_back") == 1
    assert watch_exit_code("running") is None
    text = format_rollout({"id": "r1", "release": 2, "commit": "ab" * 20, "previous": 1, "plan": "p",
                           "phase": "halted", "wave": 0, "halted_reason": "wave 0 failed",
                           "waves": [{"name": "canary", "progress": {"done": 1, "failed": 1},
                                      "result": "failed"}]})
    assert "halted: wave 0 failed" in text
    assert "> wave 1 canary" in text
    waiting = {"id": "r2", "phase": "waiting_approval", "wave": 1, "waves": [
        {"name": "canary", "started": 1.0, "result": "passed"},
        {"name": "quarter", "started": 2.0, "result": "empty"},
        {"name": "everyone", "started": None, "result": ""}]}
    assert ("waiting for approval before wave 3 (everyone) starts: fleetctl rollout promote r2 --wave 2"
            in format_rollout(waiting))
    first = {"id": "r3", "phase": "waiting_approval", "wave": 0,
             "waves": [{"name": "canary", "started": None}]}
    assert "before wave 1 (canary) starts: fleetctl rollout promote r3 --wave 1" in format_rollout(first)


def test_lint_checks_rollout_plans_with_lines(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "rollouts").mkdir(parents=True)
    (repo / "bundles").mkdir()
    (repo / "fleet.yaml").write_text("description: x\nrollout:\n  plan: missing\n")
    (repo / "rollouts" / "fast.yaml").write_text("waves:\n  - percent: 50\n  - percent: 20\n")
    (repo / "rollouts" / "ok.yaml").write_text("waves:\n  - {percent: 100, soak: 0}\n")
    problems = {(p.file, p.line, p.reason) for p in lint_repo(repo, []) if p.severity == "error"}
    assert ("fleet.yaml", 3, "rollout plan rollouts/missing.yaml does not exist") in problems
    assert any(f == "rollouts/fast.yaml" and line == 3 and "cumulative" in r for f, line, r in problems)
    assert not any(f == "rollouts/ok.yaml" for f, _, _ in problems)
    late_plan = "waves:\n  - {soak: 0}\n  - percent: 100\n    promotion: manual\n"
    (repo / "rollouts" / "late.yaml").write_text(late_plan)
    warnings = {(p.file, p.line, p.reason) for p in lint_repo(repo, []) if p.severity == "warning"}
    late = [(line, r) for f, line, r in warnings if f == "rollouts/late.yaml"]
    assert len(late) == 1
    assert late[0][0] == 4
    assert "use pause_before: true" in late[0][1]
    assert not any(f == "rollouts/ok.yaml" for f, _, _ in warnings)
    (repo / "fleet.yaml").write_text("rollout:\n  waves:\n    - {percent: 100, promotion: sometimes}\n")
    problems = {(p.file, p.line, p.reason) for p in lint_repo(repo, []) if p.severity == "error"}
    assert ("fleet.yaml", 3, "must be one of auto, manual") in problems


def test_a_new_signed_release_starts_the_rollout_its_fleet_yaml_declares(api: Api, tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    bare = make_bare(mirrors / "fleet.git")
    work = WorkRepo.create(tmp_path / "work")
    key = SigningKey.generate()
    with GitDaemon(mirrors) as daemon:
        trust = GitTrust(keys=(format_verify_key(key.verify_key),), threshold=1)
        config = ServerConfig(git=GitConfig(url=daemon.url("fleet.git"), branch="main", trust=trust,
                                            cache_dir=tmp_path / "git-cache"))
        plans = GitPlans(config, api.store, api.runner, api.ingestor.publish_nudge)
        watcher = GitWatcher(config, api.store, plans.on_release, metrics=ServerMetrics().releases)
        try:
            work.write_files({"fleet.yaml": "rollout: {plan: fast}\n",
                              "rollouts/fast.yaml": "waves:\n  - {name: all, percent: 100, soak: 0}\n"})
            sign_release(work.path, [key], expires=timedelta(days=30), now=datetime.now(UTC), version=4)
            sha = work.commit("release 4")
            work.push(bare)
            outcome = watcher.poll_once()
            assert (outcome.status, outcome.release) == ("new", 4)
            newest = api.runner.summaries(1)[0]
            assert (newest["release"], newest["actor"]) == (4, "git-watcher")
            assert api.wait_phase(newest["id"], ("succeeded",)) == "succeeded"
            assert set(api.fleet.running.values()) == {(4, sha)}
            assert plans.named("fast").waves[0].name == "all"
        finally:
            watcher.stop()
            plans.close()


def test_openapi_documents_every_body_and_the_bearer_scheme(api: Api) -> None:
    schema = httpx.get(f"{api.url}/api/v1/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert [s["type"] for s in schemes.values()] == ["http"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    bodies = {}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if path.startswith("/api/v1/") and path != "/api/v1/hooks/git":
                assert op.get("security"), f"{method} {path} documents no security"
            if method == "post" and path != "/api/v1/hooks/git":
                ref = op["requestBody"]["content"]["application/json"]["schema"]
                bodies[(method, path)] = ref.get("$ref") or ref["anyOf"][0]["$ref"]
    assert bodies == {
        ("post", "/api/v1/devices"): "#/components/schemas/EnrollBody",
        ("post", "/api/v1/rollouts"): "#/components/schemas/StartRolloutBody",
        ("post", "/api/v1/rollouts/{rollout_id}/{action}"): "#/components/schemas/ActionBody",
    }
    start = schema["components"]["schemas"]["StartRolloutBody"]
    assert start["required"] == ["release"]
    assert start["additionalProperties"] is False
    # The typed bodies answer as the hand-checked ones did.
    headers = api.headers()
    for body, reason in (({"release": True}, "release must be a release version (a whole number)"),
                         ({"release": 1, "colour": "red"}, "unknown field(s): colour"),
                         ({"release": 1, "plan": [1]}, "plan must be a mapping (the plan document)"),
                         ({"release": 1, "reason": "r" * 1001},
                          "reason must be text of at most 1000 characters"),
                         ({}, "release is required")):
        answer = httpx.post(f"{api.url}/api/v1/rollouts", json=body, headers=headers)
        assert (answer.status_code, answer.json()) == (400, {"error": reason})
    answer = httpx.post(f"{api.url}/api/v1/rollouts/r-1/promote", json={"wave": -1}, headers=headers)
    assert (answer.status_code, answer.json()) == (400, {"error": "wave must be a wave index"})


def test_fleetctl_starts_a_rollout_with_a_preflight_that_holds_its_first_wave(
        api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plan_file = tmp_path / "quick.yaml"
    plan_file.write_text(yaml.safe_dump(QUICK_PLAN))
    code, out, err = fleetctl_run(api, capsys, "start", "--release", "2", "--plan", str(plan_file),
                                  "--preflight", "--reason", "plan first", "--json")
    assert code == 0, err
    rid = json.loads(out)["id"]
    assert api.wait_phase(rid, ("waiting_approval",)) == "waiting_approval"  # no device assigned yet
    code, out, err = fleetctl_run(api, capsys, "preflight", rid)
    assert code == 0, err
    assert out.startswith(f"preflight of rollout {rid}: ")
    code, out, _ = fleetctl_run(api, capsys, "preflight", rid, "--json")
    assert json.loads(out)["id"] == rid
