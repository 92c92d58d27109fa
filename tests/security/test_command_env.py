"""Commands and command health checks see only the documented environment, in the agent's root.

The attack: a command of the release inherited the agent's whole environment (credentials,
proxies, whatever the service manager set), and a health check ran without ``EDGE_FLEET_ROOT`` and
in the agent's own working directory, so with ``root`` other than ``/`` it checked the wrong files.
A canary variable in the agent's environment must reach neither.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import sync_once
from edge_agent.drivers import Context
from edge_agent.engine.health import run_check
from edge_agent.runner import SAFE_PATH, CommandEnv, Runner
from edge_core.errors import BundleError
from edge_core.resources import CommandCheck, CommandRes, parse_check, parse_resource
from tests.support.agent_fleet import AgentFleet, bundle
from tests.support.driver_calls import apply, plan
from tests.support.fake_system import make_context

CANARY = "EDGE_FLEET_TEST_SECRET"
DUMP = ("import json, os, sys; "
        "json.dump({'env': dict(os.environ), 'cwd': os.getcwd()}, open(sys.argv[1], 'w'))")


def dump_argv(out: str) -> list[str]:
    """A command that writes its environment and working directory to ``out`` (relative: to its cwd)."""
    return [sys.executable, "-c", DUMP, out]


def read_dump(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    monkeypatch.setenv(CANARY, "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://agent-only.invalid:3128")
    root = tmp_path / "device"
    (root / "srv").mkdir(parents=True)
    c = make_context(root)
    c.command_env = CommandEnv(device="dev-7", release=12, commit="c0ffee")
    yield c
    c.fs.close()


def expected(root: Path, **extra: str) -> dict[str, str]:
    return {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "EDGE_FLEET_ROOT": str(root), "EDGE_FLEET_DEVICE": "dev-7",
            "EDGE_FLEET_RELEASE": "12", "EDGE_FLEET_COMMIT": "c0ffee", **extra}


def test_command_resource_and_guard_see_only_the_documented_environment(ctx: Context) -> None:
    root = ctx.fs.root
    res = CommandRes(id="c", bundle="b", name="dump", run=tuple(dump_argv("srv/run.json")),
                     onlyif=tuple(dump_argv("srv/guard.json")), env=(("APP_MODE", "test"),))
    apply(plan(res, ctx), ctx)
    for name in ("run.json", "guard.json"):
        seen = read_dump(root / "srv" / name)
        assert seen["env"] == expected(root, APP_MODE="test"), name
        assert seen["cwd"] == str(root)


def test_command_health_check_gets_the_same_environment_and_directory(ctx: Context) -> None:
    root = ctx.fs.root
    check = CommandCheck(name="dump", run=tuple(dump_argv("srv/check.json")), env=(("APP_MODE", "test"),))
    result = run_check("b", check, Runner(), root, ctx.command_env)
    assert result.ok, result.detail
    seen = read_dump(root / "srv" / "check.json")
    assert seen["env"] == expected(root, APP_MODE="test")
    assert seen["cwd"] == str(root)
    # a relative path in a check names a file of the device root, as it does in a command resource
    (root / "srv" / "ready").write_text("yes\n")
    assert run_check("b", CommandCheck(name="ready", run=("test", "-f", "srv/ready")), Runner(), root).ok


def test_a_shell_command_sees_no_canary(ctx: Context) -> None:
    res = CommandRes(id="s", bundle="b", name="sh", run=f'env > srv/env.txt; test -z "${CANARY}"')
    apply(plan(res, ctx), ctx)
    text = (ctx.fs.root / "srv" / "env.txt").read_text()
    assert CANARY not in text
    assert "HTTPS_PROXY" not in text
    assert f"PATH={SAFE_PATH}" in text.splitlines()


def test_a_real_sync_runs_commands_and_checks_in_the_clean_environment(
        fleet: AgentFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CANARY, "hunter2")
    commit = fleet.publish({"bundles/app/bundle.yaml": bundle(
        [{"kind": "command", "name": "dump", "run": dump_argv("srv/run.json"), "env": {"APP_MODE": "x"}}],
        health=[{"kind": "command", "name": "dump", "run": dump_argv("srv/check.json"),
                 "env": {"APP_MODE": "y"}}])})
    result = sync_once(fleet.config)
    assert result.outcome == "applied", result
    root = fleet.config.root
    for name, mode in (("run.json", "x"), ("check.json", "y")):
        seen = read_dump(fleet.root / "srv" / name)
        assert seen["cwd"] == str(root)
        assert seen["env"] == {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "EDGE_FLEET_ROOT": str(root),
                               "EDGE_FLEET_DEVICE": "dev-1", "EDGE_FLEET_RELEASE": "1",
                               "EDGE_FLEET_COMMIT": commit, "APP_MODE": mode}, name


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        (["A=1"], "must be a mapping"),
        ({"lower": "x"}, "invalid variable name 'lower'"),
        ({"1ABC": "x"}, "invalid variable name '1ABC'"),
        ({"EDGE_FLEET_ROOT": "/"}, "names starting with EDGE_FLEET_ are set by the agent"),
        ({"PORT": 8080}, "must be a string"),
        ({"A": "x\x00y"}, "without NUL bytes"),
        ({f"V{i}": "x" for i in range(65)}, "more than 64 variables"),
        ({"BIG": "x" * 20000}, "larger than 16384 bytes"),
    ],
)
def test_env_mappings_are_validated(env: object, fragment: str) -> None:
    with pytest.raises(BundleError, match=fragment):
        parse_resource({"kind": "command", "name": "c", "run": ["true"], "env": env}, "b")
    with pytest.raises(BundleError, match=fragment):
        parse_check({"kind": "command", "run": ["true"], "env": env})


def test_env_may_set_path_and_lang() -> None:
    res = parse_resource({"kind": "command", "name": "c", "run": ["true"],
                          "env": {"PATH": "/opt/app/bin", "LANG": "de_DE.UTF-8"}}, "b")
    assert isinstance(res, CommandRes)
    assert res.env == (("LANG", "de_DE.UTF-8"), ("PATH", "/opt/app/bin"))
