"""edge_agent.telemetry: each figure against the kernel's own files, and against psutil where the
development environment has it (psutil is no longer a dependency of the agent)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edge_agent import telemetry


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/meminfo has no {field}")


def test_disk_usage_is_statvfs_as_df_shows_it(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    total, free, pct = telemetry.disk_usage(tmp_path)
    assert total == st.f_blocks * st.f_frsize
    assert abs(free - st.f_bavail * st.f_frsize) <= 64 * 2**20  # other writers on the same disk
    assert pct == pytest.approx(100.0 * free / total)
    with pytest.raises(OSError):
        telemetry.disk_usage(tmp_path / "missing")


def test_memory_percent_is_memavailable_of_memtotal() -> None:
    total, avail = _meminfo_kib("MemTotal"), _meminfo_kib("MemAvailable")
    expected = 100.0 * (total - avail) / total
    assert telemetry.memory_percent() == pytest.approx(expected, abs=2.0)  # memory moves meanwhile


def test_memory_percent_estimates_without_memavailable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:  1000 kB\nMemFree:  100 kB\nBuffers:  50 kB\n"
                                      "Cached:  250 kB\n")
    monkeypatch.setattr(telemetry, "PROC", str(tmp_path))
    assert telemetry.memory_percent() == 60.0
    (tmp_path / "meminfo").write_text("MemTotal:  1000 kB\nMemFree:  100 kB\nMemAvailable:  5000 kB\n")
    assert telemetry.memory_percent() == 90.0  # more available than there is: a container's figure


def test_sample_against_proc(tmp_path: Path) -> None:
    snap = telemetry.sample([tmp_path, tmp_path / "missing"])
    json.dumps(snap)
    assert set(snap) == {"cpu_percent", "load", "memory_percent", "disk", "temperatures", "uptime", "process"}
    assert list(snap["disk"]) == [str(tmp_path)]
    assert set(snap["disk"][str(tmp_path)]) == {"total", "free", "percent_free"}
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(snap["uptime"] - uptime) < 5.0
    vm_rss = _meminfo_status_kib("VmRSS") * 1024
    assert abs(snap["process"]["rss"] - vm_rss) < 8 * 2**20
    assert len(snap["load"]) == 3
    assert 0.0 <= snap["cpu_percent"] <= 100.0


def _meminfo_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def test_cpu_percent_is_busy_over_total_ticks_since_the_previous_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry, "PROC", str(tmp_path))
    monkeypatch.setattr(telemetry, "_last_system", None)
    (tmp_path / "stat").write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert telemetry._cpu_percent() == 0.0
    # +300 user (of which +100 guest, already counted in user), +100 idle, +100 iowait
    (tmp_path / "stat").write_text("cpu  400 0 100 800 200 0 0 0 100 0\ncpu0 1 2 3 4\n")
    assert telemetry._cpu_percent() == 60.0
    assert telemetry._cpu_percent() == 0.0  # nothing moved since


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_temperatures_from_hwmon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hw = tmp_path / "class" / "hwmon"
    _write(hw / "hwmon0" / "name", "coretemp\n")
    _write(hw / "hwmon0" / "temp1_input", "45000\n")
    _write(hw / "hwmon0" / "temp1_label", "Package id 0\n")
    _write(hw / "hwmon0" / "temp2_input", "41500\n")
    _write(hw / "hwmon0" / "temp2_max", "100000\n")
    _write(hw / "hwmon0" / "temp3_label", "no reading\n")  # no input: left out
    _write(hw / "hwmon1" / "device" / "name", "nvme\n")
    _write(hw / "hwmon1" / "device" / "temp1_input", "38850\n")
    _write(hw / "hwmon2" / "temp1_input", "not a number\n")
    _write(hw / "hwmon2" / "name", "broken\n")
    _write(tmp_path / "class" / "thermal" / "thermal_zone0" / "temp", "99000\n")  # hwmon wins
    monkeypatch.setattr(telemetry, "SYS", str(tmp_path))
    assert telemetry.temperatures() == {"coretemp/Package id 0": 45.0, "coretemp/1": 41.5, "nvme/0": 38.85}


def test_temperatures_from_thermal_zones_without_hwmon(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    zones = tmp_path / "class" / "thermal"
    _write(zones / "thermal_zone0" / "type", "cpu-thermal\n")
    _write(zones / "thermal_zone0" / "temp", "52300\n")
    _write(zones / "thermal_zone1" / "type", "gpu-thermal\n")
    _write(zones / "thermal_zone1" / "temp", "48000\n")
    _write(zones / "thermal_zone2" / "type", "absent\n")
    monkeypatch.setattr(telemetry, "SYS", str(tmp_path))
    assert telemetry.temperatures() == {"cpu-thermal/0": 52.3, "gpu-thermal/0": 48.0}
    monkeypatch.setattr(telemetry, "SYS", str(tmp_path / "nothing"))
    assert telemetry.temperatures() == {}


def test_the_same_figures_as_psutil(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    usage = psutil.disk_usage(str(tmp_path))
    total, free, _pct = telemetry.disk_usage(tmp_path)
    assert total == usage.total
    assert abs(free - usage.free) <= 64 * 2**20
    assert telemetry.memory_percent() == pytest.approx(psutil.virtual_memory().percent, abs=2.0)
    theirs = {f"{chip}/{e.label or i}": e.current
              for chip, entries in psutil.sensors_temperatures().items() for i, e in enumerate(entries)}
    assert set(telemetry.temperatures()) == set(theirs)
    assert telemetry.sample([])["uptime"] == pytest.approx(time.time() - psutil.boot_time(), abs=2.0)
