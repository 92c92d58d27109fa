"""The HTTP limits are configurable in ``server.yaml`` and refused when nonsensical."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.config import HttpConfig, load_server_config, parse_set_options
from fleet_server.errors import ServerConfigError


def test_body_limits_have_documented_defaults_and_read_sizes_and_durations(tmp_path: Path) -> None:
    assert (HttpConfig().max_body_bytes, HttpConfig().body_timeout) == (1024 * 1024, 30.0)
    path = tmp_path / "server.yaml"
    path.write_text("http:\n  max_body_bytes: 256KiB\n  body_timeout: 5s\n")
    http = load_server_config(path, {}).http
    assert (http.max_body_bytes, http.body_timeout) == (256 * 1024, 5.0)
    over = load_server_config(None, parse_set_options(["http.max_body_bytes=2MiB"])).http
    assert over.max_body_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(("item", "reason"), [
    ("http.max_body_bytes=0", r"^http\.max_body_bytes: must be from 1024 to 67108864, got 0$"),
    ("http.max_body_bytes=1GiB", r"^http\.max_body_bytes: must be from 1024 to 67108864"),
    ("http.body_timeout=0", r"^http\.body_timeout: "),
])
def test_nonsensical_body_limits_are_refused(item: str, reason: str) -> None:
    with pytest.raises(ServerConfigError, match=reason):
        load_server_config(None, parse_set_options([item]))
