"""Adversarial: every local config file (``agent.yaml``, ``server.yaml``, ``--set``) goes through the
one safe YAML loader: no alias bombs, no duplicate keys, no deep nesting, no reading a FIFO or a
device, and no value echoed in full in an error.

Loads that could blow up run in a child process under a 1 GiB address-space limit, so a loader
that expands an alias bomb fails with ``MemoryError`` (or the time limit) instead of taking the
machine with it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_core.errors import ConfigError, YamlError
from edge_core.yamlsafe import load_yaml
from fleet_server.config import load_server_config, parse_set_options
from fleet_server.errors import ServerConfigError

_LIMIT_BYTES = 1024**3
_CHILD_TIMEOUT = 60.0
KEY = "ed25519:" + "A" * 43 + "="

# Nine levels of nine references: about 2 GB of text if anything ever renders it.
BOMB = "[" + ", ".join(
    [f"&a0 [{', '.join(['lol'] * 9)}]"]
    + [f"&a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 9)]
) + "]"

AGENT_HEAD = f"device_id: dev-1\nrepo: {{url: git://127.0.0.1/fleet}}\ntrust: {{keys: ['{KEY}']}}\n"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_LIMIT_BYTES, _LIMIT_BYTES))


def run_limited(code: str) -> str:
    """Run ``code`` in a child Python under the memory limit; return what it printed (one line)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=_CHILD_TIMEOUT, preexec_fn=_limit_memory, env=env, check=False)
    assert "MemoryError" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _child_load(loader: str, path: Path) -> str:
    return run_limited(f"""
        from pathlib import Path
        from edge_agent.config import load_config
        from fleet_server.config import load_server_config
        try:
            {loader}(Path({str(path)!r}))
        except Exception as exc:
            print(type(exc).__name__ + ": " + str(exc))
        else:
            print("loaded")
    """)


def test_alias_bomb_in_agent_yaml_is_refused_at_the_first_anchor(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT_HEAD + f"log_level: {BOMB}\n")
    out = _child_load("load_config", path)
    assert out == f"ConfigError: {path}: not valid YAML: line 4: YAML anchors (&name) are not allowed"


def test_alias_bomb_in_server_yaml_is_refused_at_the_first_anchor(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(f"http: {{port: 8080}}\nlog_level: {BOMB}\n")
    out = _child_load("load_server_config", path)
    assert out == f"ServerConfigError: {path}: not valid YAML: line 2: YAML anchors (&name) are not allowed"


def test_alias_bomb_in_a_set_override_is_refused() -> None:
    out = run_limited(f"""
        from fleet_server.config import load_server_config, parse_set_options
        try:
            load_server_config(None, parse_set_options([{"log_level=" + BOMB!r}]))
        except Exception as exc:
            print(type(exc).__name__ + ": " + str(exc))
    """)
    assert out == "ServerConfigError: --set log_level: YAML anchors (&name) are not allowed"


def test_a_lone_alias_in_a_set_override_is_refused() -> None:
    with pytest.raises(ServerConfigError, match=r"^--set mqtt\.host: YAML aliases"):
        parse_set_options(["mqtt.host=*x"])


def test_duplicate_keys_in_agent_yaml_are_refused_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT_HEAD + "log_level: info\nmode: enforce\nlog_level: debug\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not valid YAML: line 6: duplicate key 'log_level'"


def test_duplicate_nested_keys_in_server_yaml_are_refused_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("http:\n  port: 8080\n  host: 127.0.0.1\n  port: 9090\n")
    with pytest.raises(ServerConfigError) as caught:
        load_server_config(path, {})
    assert str(caught.value) == f"{path}: not valid YAML: line 4: duplicate key 'port'"


def test_deep_nesting_is_refused_not_a_recursion_crash(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT_HEAD + "labels: " + "[" * 900 + "]" * 900 + "\n")
    with pytest.raises(ConfigError, match=r"line 4: document nests too deeply"):
        load_config(path)


@pytest.mark.parametrize("where", ["log_level", "git.branch", "unknown_key"])
def test_a_long_value_is_cut_short_in_the_error(tmp_path: Path, where: str) -> None:
    long = "x" * 5000 + " tail-marker"
    path = tmp_path / "server.yaml"
    if where == "log_level":
        path.write_text(f"log_level: '{long}'\n")
    elif where == "git.branch":
        path.write_text(f"git: {{branch: '{long}'}}\n")
    else:
        path.write_text(f"? '{long}'\n: 1\n")
    with pytest.raises(ServerConfigError) as caught:
        load_server_config(path, {})
    message = str(caught.value)
    assert "tail-marker" not in message
    assert "x" * 50 in message
    assert "…" in message
    assert len(message.removeprefix(str(path))) < 200  # the file's own name comes first


def test_a_long_set_key_is_cut_short_in_the_error() -> None:
    with pytest.raises(ServerConfigError) as caught:
        load_server_config(None, parse_set_options(["a" * 5000 + ".b=1"]))
    assert len(str(caught.value)) < 200


def test_a_long_invalid_label_name_is_cut_short_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT_HEAD + "labels:\n  ? '" + "bad name " * 1000 + "'\n  : x\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).endswith(": invalid label name")
    assert len(str(caught.value)) < 200


def test_a_fifo_or_a_device_is_refused_without_reading(tmp_path: Path) -> None:
    """``open()`` of a FIFO blocks until a writer comes, and ``/dev/zero`` never ends: both are refused
    on their file type. (In a child with a time limit: a loader that opens the FIFO plainly hangs.)"""
    fifo = tmp_path / "server.yaml"
    os.mkfifo(fifo)
    out = _child_load("load_server_config", fifo)
    assert out == f"ServerConfigError: cannot read {fifo}: not a regular file"
    with pytest.raises(ConfigError, match=r"cannot read /dev/zero: not a regular file"):
        load_config(Path("/dev/zero"))
    with pytest.raises(ServerConfigError, match=r"not a regular file"):
        load_server_config(tmp_path, {})



def test_a_huge_number_is_refused_without_echoing_it() -> None:
    """A 5000-digit integer is over Python's int conversion limit: refused, its digits cut short."""
    with pytest.raises(YamlError) as caught:
        load_yaml(b"x: " + b"7" * 5000 + b"\n", name="bundle.yaml")
    message = str(caught.value)
    assert message.startswith("bundle.yaml: line 1: bad scalar '777")
    assert len(message) < 300
