"""Device metrics read straight from the kernel: ``/proc``, ``/sys`` and ``statvfs``.

Health checks read disk, memory and temperature through the three small functions here; the
reporting module publishes :func:`sample` periodically. The agent runs on Linux only, so each
figure is one read of the file the kernel keeps it in, computed as the usual tools (``df``,
``free``, ``top``, ``lm-sensors``) compute it:

* disk: ``statvfs`` of the path; free is what an unprivileged user may still write (``f_bavail``);
* memory in use: ``MemTotal - MemAvailable`` of ``/proc/meminfo`` (``MemFree + Buffers + Cached``
  stands for ``MemAvailable`` on a kernel older than 3.14, or when it reads 0);
* CPU: the first line of ``/proc/stat``, busy time (everything but idle and iowait; guest time is
  already part of user and nice) over total time since the previous sample;
* temperatures: every ``temp*_input`` of ``/sys/class/hwmon/hwmon*`` (and of its ``device/``
  directory), named by the chip's ``name`` file and the sensor's ``temp*_label``; without any, the
  ``temp`` of each ``/sys/class/thermal/thermal_zone*``, named by its ``type``;
* uptime: the first field of ``/proc/uptime``;
* this process: resident pages of ``/proc/self/statm``, user + system time of ``os.times()``.

No third-party library is involved: the figures cost a few small file reads and no import.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["disk_usage", "memory_percent", "sample", "temperatures"]

log = logging.getLogger(__name__)

PROC = "/proc"
"""Where procfs is mounted (a test points it elsewhere)."""
SYS = "/sys"
"""Where sysfs is mounted (a test points it elsewhere)."""

_lock = threading.Lock()
# The previous sample's counters, for the CPU shares "since the previous call": the system's
# (busy, total) ticks of /proc/stat, and this process's (pid, CPU seconds, monotonic seconds).
_last_system: tuple[float, float] | None = None
_last_process: tuple[int, float, float] | None = None


def disk_usage(path: str | Path) -> tuple[int, int, float]:
    """Return ``(total bytes, free bytes, percent free)`` of the filesystem holding ``path``.

    Free bytes are those an unprivileged user may still write (the blocks reserved for root left
    out, as ``df`` shows them).

    Raises:
        OSError: the path does not exist or cannot be examined.
    """
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    percent_free = 100.0 * free / total if total else 0.0
    return total, free, percent_free


def _meminfo() -> dict[str, int]:
    """The fields of /proc/meminfo, in bytes."""
    out: dict[str, int] = {}
    with open(f"{PROC}/meminfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2 and fields[0].endswith(b":"):
                out[fields[0][:-1].decode("ascii", "replace")] = int(fields[1]) * 1024
    return out


def memory_percent() -> float:
    """Return the share of physical memory in use, in percent (0-100, one decimal).

    Raises:
        OSError: /proc/meminfo cannot be read.
    """
    mem = _meminfo()
    total = mem.get("MemTotal", 0)
    free = mem.get("MemFree", 0)
    avail = mem.get("MemAvailable", 0)
    if avail <= 0:  # a kernel older than 3.14 (or one that reads 0): the classic estimate
        avail = free + mem.get("Buffers", 0) + mem.get("Cached", 0)
    if avail > total:  # inside some containers the figures are the host's: trust MemFree then
        avail = free
    if total <= 0:
        return 0.0
    return round(100.0 * (total - avail) / total, 1)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _hwmon_sensors() -> list[str]:
    """The hwmon sensors as ``.../tempN`` paths (the part before ``_input``, ``_label`` ...), sorted."""
    found = glob.glob(f"{SYS}/class/hwmon/hwmon*/temp*_*")
    found += glob.glob(f"{SYS}/class/hwmon/hwmon*/device/temp*_*")
    return sorted({p.rsplit("/", 1)[0] + "/" + p.rsplit("/", 1)[1].split("_", 1)[0] for p in found})


def temperatures() -> dict[str, float]:
    """Return every temperature sensor reading in Celsius, keyed ``"<chip>/<label or index>"``.

    The index is the sensor's position among its chip's sensors. The mapping is empty when the
    device exposes no sensor; a sensor that cannot be read is left out.
    """
    chips: dict[str, list[tuple[str, float]]] = {}
    sensors = _hwmon_sensors()
    for base in sensors:
        try:
            current = float(_read_text(base + "_input")) / 1000.0
            chip = _read_text(os.path.join(os.path.dirname(base), "name"))
        except (OSError, ValueError):
            continue  # a half-populated hwmon directory: skip the sensor
        try:
            label = _read_text(base + "_label")
        except OSError:
            label = ""
        chips.setdefault(chip, []).append((label, current))
    if not sensors:
        for zone in sorted(glob.glob(f"{SYS}/class/thermal/thermal_zone*")):
            try:
                current = float(_read_text(os.path.join(zone, "temp"))) / 1000.0
                chip = _read_text(os.path.join(zone, "type"))
            except (OSError, ValueError) as exc:
                log.debug("thermal zone %s unreadable: %s", zone, exc)
                continue
            chips.setdefault(chip, []).append(("", current))
    out: dict[str, float] = {}
    for chip, entries in chips.items():
        for i, (label, current) in enumerate(entries):
            out[f"{chip}/{label or i}"] = current
    return out


def _system_cpu() -> tuple[float, float]:
    """``(busy, total)`` clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    with open(f"{PROC}/stat", "rb") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    fields += [0.0] * (8 - len(fields))
    # user nice system idle iowait irq softirq steal; guest and guest_nice (after them) are
    # already counted in user and nice
    total = sum(fields[:8])
    idle, iowait = fields[3], fields[4]
    return total - idle - iowait, total


def _cpu_percent() -> float:
    """The system's CPU use in percent since the previous call (0.0 on the first)."""
    global _last_system  # the previous sample, one per process
    busy, total = _system_cpu()
    previous, _last_system = _last_system, (busy, total)
    if previous is None:
        return 0.0
    d_busy, d_total = max(0.0, busy - previous[0]), max(0.0, total - previous[1])
    return round(100.0 * min(d_busy, d_total) / d_total, 1) if d_total > 0 else 0.0


def _process() -> tuple[int, float]:
    """This process's resident bytes and its CPU share (percent of one CPU) since the previous call."""
    global _last_process  # the previous sample, one per process
    with open(f"{PROC}/self/statm", "rb") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    times = os.times()
    now = (os.getpid(), times.user + times.system, time.monotonic())
    previous, _last_process = _last_process, now
    if previous is None or previous[0] != now[0] or now[2] <= previous[2]:
        return rss, 0.0
    return rss, round(100.0 * max(0.0, now[1] - previous[1]) / (now[2] - previous[2]), 1)


def _uptime() -> float:
    with open(f"{PROC}/uptime", "rb") as f:
        return float(f.read().split()[0])


def sample(mounts: Sequence[str | Path] = ("/",)) -> dict[str, Any]:
    """Return one JSON-able snapshot of the device and of this process.

    Keys: ``cpu_percent`` (since the previous call; 0.0 on the first), ``load`` (1, 5, 15 minute
    averages), ``memory_percent``, ``disk`` (per mount: total, free, percent_free; mounts that
    cannot be read are left out), ``temperatures``, ``uptime`` (seconds since boot),
    ``process`` (``rss`` bytes, ``cpu_percent`` of this process since its previous sample).

    Raises:
        OSError: /proc cannot be read.
    """
    disks: dict[str, dict[str, float]] = {}
    for mount in mounts:
        try:
            total, free, pct = disk_usage(mount)
        except OSError as exc:
            log.debug("disk usage of %s unreadable: %s", mount, exc)
            continue
        disks[str(mount)] = {"total": total, "free": free, "percent_free": round(pct, 2)}
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    with _lock:
        rss, proc_cpu = _process()
        cpu = _cpu_percent()
    return {
        "cpu_percent": cpu,
        "load": load,
        "memory_percent": memory_percent(),
        "disk": disks,
        "temperatures": temperatures(),
        "uptime": round(max(0.0, _uptime()), 1),
        "process": {"rss": rss, "cpu_percent": proc_cpu},
    }
