"""The edge-fleet demo: the whole story on one machine with real parts, narrated.

Two operator keys are generated; the example config repo is linted, signed (2 of 2) and pushed to a
Git mirror served by ``git daemon``; Mosquitto runs with the password and ACL files of ``fleetctl
broker-config``; ``fleet-server`` runs on SQLite; a fleet of devices (one ``edge-agent run`` process
each, with its own root and state directory) takes release 1, refuses an unsigned push, takes
release 2 through a canary rollout in waves, has a bad release 3 halted at the canaries and rolled
back on its own, and corrects drift made by hand. Then one device is paused from the fleet server and
resumed, release 4's preflight finds every device would refuse it and stops its rollout before any
change, a device with no mirror and no broker is updated from an exported file, and a webhook
receiver shows the signed notifications it got. ``systemctl``/``sysctl`` are stand-ins (the devices
are directories, not machines). Every process the demo starts is stopped by its pid at the end, on
Ctrl-C and on errors.

Run with ``make demo`` (or ``python -m demo.run [--devices N] [--exit-when-done] [--keep]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from demo.operator import ConfigRepo, generate_keys
from demo.parts import (
    REPO,
    Device,
    FleetServer,
    app_listener,
    register_devices,
    start_broker,
    start_fleet_server,
    start_git_daemon,
)
from demo.procs import BIN, Children, DemoError, free_port, run_tool, say, wait_until
from demo.rollout_view import find_rollout, follow_rollout
from demo.webhooks import Receiver, webhook_receiver
from fleet_server.cli.devices import api_get, api_post
from fleet_server.errors import ApiError

__all__ = ["main", "make_devices", "summarise_devices"]

SITES = ("berlin", "paris", "oslo")
MOTD = "/etc/motd"
MIN_DEVICES = 4


@dataclass
class World:
    """Everything the story has started, for the steps after the set-up."""

    base: Path
    children: Children
    repo: ConfigRepo
    server: FleetServer
    devices: list[Device]
    receiver: Receiver
    trust: list[str]
    commits: dict[int, str] = field(default_factory=dict)


def make_devices(base: Path, count: int) -> list[Device]:
    """Create ``count`` device directories: ids ``dev-00``…, sites in turn, role gateway, the first two
    labelled ``canary: "true"``."""
    devices = []
    for i in range(count):
        labels = {"site": SITES[i % len(SITES)], "role": "gateway"}
        if i < 2:
            labels["canary"] = "true"
        devices.append(Device(base, f"dev-{i:02d}", labels))
    return devices


def summarise_devices(listing: dict[str, Any]) -> tuple[Counter[str], int, int]:
    """Count ``fleetctl devices --json`` output as ``release N, sync_state`` -> devices; return the
    counts, how many are online and how many there are."""
    devices = listing.get("devices") or []
    counts = Counter(f"release {d.get('release')}, {d.get('sync_state')}" for d in devices)
    online = sum(1 for d in devices if d.get("online"))
    return counts, online, len(devices)


def _api(server: FleetServer, path: str) -> Any:
    try:
        return api_get(server.url, path, timeout=10)
    except ApiError as exc:
        raise DemoError(str(exc)) from exc


def _webhook(server: FleetServer) -> None:
    token = server.token_file.read_text().strip()
    try:
        api_post(server.url, "/api/v1/hooks/git", {}, token=token, actor="demo-operator", timeout=10)
    except ApiError as exc:
        raise DemoError(f"webhook: {exc}") from exc


def _releases(server: FleetServer) -> dict[str, int]:
    devices = _api(server, "/api/v1/devices?limit=1000").get("devices") or []
    return {str(d["id"]): d.get("release") for d in devices}


def _online(server: FleetServer, device_id: str) -> bool:
    return bool((_api(server, f"/api/v1/devices/{device_id}").get("device") or {}).get("online"))


def _refused_count(server: FleetServer) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:  # noqa: S310 - loopback http
        text = resp.read().decode()
    found = re.findall(r'^fleet_releases_refused_total\{reason="([^"]+)"\} ([0-9.e+]+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


def _check_alive(children: Children) -> None:
    if children.exited():
        raise DemoError("a process ended early: " + "; ".join(children.exited()[:3]))


def set_up(base: Path, n_devices: int, app_port: int, children: Children, receiver: Receiver) -> World:
    """Steps 1-4: keys, the signed release 1 on the mirror, the broker, the server, the devices."""
    logs = base / "logs"
    logs.mkdir(parents=True)
    keys, trust = generate_keys(base / "operator", ["alice", "bob"])
    say(f" 1. keys      alice {trust[0][:20]}…, bob {trust[1][:20]}…; releases need both (2 of 2)")

    repo = ConfigRepo(base / "operator" / "config-repo", base / "mirror" / "fleet.git", keys)
    repo.create(REPO / "examples" / "config-repo", app_port)
    lint = repo.lint().rsplit(": ", 1)[-1]
    signed = repo.sign("release 1")
    detail = signed.split(" (", 1)[1].split(")", 1)[0] if " (" in signed else signed
    commit = repo.commit_and_push("Release 1")
    url = start_git_daemon(children, base / "mirror", logs)
    say(f" 2. release 1 examples/config-repo linted ({lint}), signed by alice and bob ({detail}),")
    say(f"              pushed as {commit[:7]} to {url} (git daemon)")

    devices = make_devices(base / "devices", n_devices)
    broker_port, credentials = start_broker(children, base, [d.id for d in devices],
                                             logs / "mosquitto.out")
    say(f" 3. broker    Mosquitto on 127.0.0.1:{broker_port}, fleetctl broker-config: password + ACL "
        f"per device")

    db = base / "server" / "fleet.db"
    db.parent.mkdir()
    register_devices(db, devices)
    server = start_fleet_server(children, base / "server", broker_port=broker_port, credentials=credentials,
                                mirror_url=url, trust=trust, db=db, log=logs / "fleet-server.log",
                                webhook=(receiver.url, receiver.secret))
    say(f" 4. server    fleet-server (SQLite, Git watcher), dashboard {server.url}/")

    t0 = time.monotonic()
    for dev in devices:
        dev.write_config(url, trust, broker_port=broker_port, credentials=credentials)
        dev.agent("init", check=True)
        dev.start(children)

    def online() -> bool:
        _check_alive(children)
        devs = _api(server, "/api/v1/devices?limit=1000").get("devices") or []
        return sum(1 for d in devs if d.get("online")) >= n_devices

    wait_until(online, "every device to come online", 90, interval=0.5)
    canaries = ", ".join(d.id for d in devices if d.labels.get("canary"))
    say(f" 5. devices   {n_devices} edge-agent daemons online in {time.monotonic() - t0:.0f} s, "
        f"each with its own root; canaries {canaries}")
    return World(base, children, repo, server, devices, receiver, trust, {1: commit})


def release_one(w: World) -> None:
    """Step 6: the Git watcher saw release 1 at start and began its rollout (fleet.yaml's plan)."""
    rid = find_rollout(w.server, 1)
    say(f" 6. rollout   release 1 (plan from fleet.yaml, started by the Git watcher): {rid}")
    final = follow_rollout(w.server, rid)
    if final.get("phase") != "succeeded":
        raise DemoError(f"the rollout of release 1 ended {final.get('phase')}: {final.get('halted_reason')}")
    wait_until(lambda: set(_releases(w.server).values()) == {1}, "every device to report release 1", 30)
    say(f"   release 1 on {len(w.devices)}/{len(w.devices)} devices; "
        f"{w.devices[0].id}:{MOTD} says {w.devices[0].read(MOTD).strip()!r}")


def tampered_push(w: World) -> None:
    """Step 7: an unsigned change is pushed; the server and a device both refuse it."""
    before = _refused_count(w.server).get("tampered", 0.0)
    chrony = w.repo.path / "bundles/motd/files/chrony.conf"
    original = chrony.read_text()
    chrony.write_text(original + "server evil.example.invalid iburst\n")
    commit = w.repo.commit_and_push("tampered, not re-signed")
    _webhook(w.server)
    wait_until(lambda: _refused_count(w.server).get("tampered", 0.0) > before,
               "the server to refuse the unsigned push", 20)
    # The device-side check runs with the device's daemon stopped: one process at a time uses its state.
    dev = w.devices[min(5, len(w.devices) - 1)]
    w.children.stop(dev.id)
    wait_until(lambda: not _online(w.server, dev.id), f"{dev.id} to show offline", 20)
    before_files = {p: p.read_bytes() for p in sorted(dev.root.rglob("*")) if p.is_file()}
    code, out, err = dev.agent("sync", "--want", commit, "--json")
    result: dict[str, Any] = json.loads(out) if out.strip() else {"outcome": f"exit {code}", "reason": err}
    after_files = {p: p.read_bytes() for p in sorted(dev.root.rglob("*")) if p.is_file()}
    same = "unchanged" if before_files == after_files else "CHANGED"
    dev.start(w.children)
    wait_until(lambda: _online(w.server, dev.id), f"{dev.id} to come back online", 30)
    say(f" 7. tampered  unsigned change {commit[:7]} pushed: the server's Git watcher refused it;")
    say(f"              {dev.id} told to apply it: {result.get('outcome')}, its files {same}")
    say(f"              ({result.get('reason')})")
    chrony.write_text(original)


def release_two(w: World) -> None:
    """Step 8: release 2 through the canary rollout, wave by wave, to every device."""
    w.repo.edit("bundles/motd/bundle.yaml", 'content: "managed by edge-fleet\\n"',
                'content: "managed by edge-fleet, release 2\\n"')
    w.repo.sign("release 2: new motd")
    commit = w.repo.commit_and_push("Release 2: new motd")
    _webhook(w.server)
    rid = find_rollout(w.server, 2)
    w.commits[2] = commit
    say(f" 8. rollout   release 2 ({commit[:7]}, new motd) signed, pushed, webhook: {rid}")
    final = follow_rollout(w.server, rid)
    if final.get("phase") != "succeeded":
        raise DemoError(f"the rollout of release 2 ended {final.get('phase')}: {final.get('halted_reason')}")
    wait_until(lambda: set(_releases(w.server).values()) == {2}, "every device to report release 2", 30)
    on_two = sum(1 for d in w.devices if "release 2" in d.read(MOTD))
    say(f"   release 2 on {on_two}/{len(w.devices)} devices ({MOTD} read from each device's root)")


def bad_release(w: World) -> None:
    """Step 9: release 3's health check fails; the canary wave fails its gate and is rolled back."""
    w.repo.edit("bundles/motd/bundle.yaml", "release 2", "release 3")
    bundle = w.repo.path / "bundles/motd/bundle.yaml"
    bundle.write_text(bundle.read_text() + "health:\n  - kind: tcp\n    name: app-port\n    host: 127.0.0.1\n"
                      "    port: 1\n    timeout: 1\n")
    w.repo.sign("release 3: checks a port nothing listens on")
    commit = w.repo.commit_and_push("Release 3: health check on a closed port")
    _webhook(w.server)
    rid = find_rollout(w.server, 3)
    say(f" 9. bad       release 3 ({commit[:7]}) adds a health check on a closed port: {rid}")
    final = follow_rollout(w.server, rid)
    if final.get("phase") != "rolled_back":
        raise DemoError(f"the rollout of release 3 ended {final.get('phase')}, not rolled_back")
    say(f"   {final.get('halted_reason')}")
    wait_until(lambda: set(_releases(w.server).values()) == {2}, "every device to report release 2", 30)
    done = [a for a in final.get("audit") or [] if a.get("action") == "rollout.rolled_back"]
    detail = (done[0].get("detail") or {}) if done else {}
    third = sum(1 for d in w.devices if "release 3" in d.read(MOTD))
    tripped = ", ".join(final.get("tripped") or []) or "-"
    unconfirmed = len(detail.get("unconfirmed") or [])
    say(f"   tripped by {tripped}; rolled back on its own: the canary wave was sent back to release 2")
    say(f"   ({detail.get('devices', '?')} devices, {unconfirmed} unconfirmed); later waves never got "
        f"release 3: {len(w.devices) - third}/{len(w.devices)} devices run release 2")


def drift(w: World) -> None:
    """Step 10: a managed file edited by hand on one device is put back by its agent and reported."""
    dev = w.devices[min(7, len(w.devices) - 1)]
    want = dev.read(MOTD)
    (dev.root / MOTD.lstrip("/")).write_text("edited by hand\n")
    took = wait_until(lambda: dev.read(MOTD) == want, f"{dev.id} to correct its drift", 30)

    def reported() -> set[str]:
        events = _api(w.server, f"/api/v1/devices/{dev.id}").get("events") or []
        return {str(e.get("type")) for e in events if str(e.get("type", "")).startswith("drift")}

    wait_until(lambda: "drift_corrected" in reported(), "the server to show the drift event", 30)
    say(f"10. drift     {dev.id}:{MOTD} edited by hand: put back by its agent in {took:.1f} s;")
    say(f"              the server shows {', '.join(sorted(reported()))}")


def remote_pause(w: World) -> None:
    """Step 11: one device paused from the fleet server, then resumed; both audited."""
    dev = w.devices[min(3, len(w.devices) - 1)]
    token = ["--server", w.server.url, "--token-file", str(w.server.token_file), "--actor", "demo"]
    run_tool([BIN / "fleetctl", "device", "pause", dev.id, "--reason", "demo: hands off", *token])

    def paused() -> object:
        return (_api(w.server, f"/api/v1/devices/{dev.id}").get("device") or {}).get("pause_reason")

    wait_until(lambda: paused() == "fleet server: demo: hands off", f"{dev.id} to report the pause", 30)
    say(f"11. pause     fleetctl device pause {dev.id}: applies nothing, keeps reporting {paused()!r};")
    run_tool([BIN / "fleetctl", "device", "resume", dev.id, "--reason", "demo: done", *token])
    wait_until(lambda: paused() is None, f"{dev.id} to report the resume", 30)
    audited = [a for a in _api(w.server, "/api/v1/audit?limit=50").get("audit") or []
               if str(a.get("action", "")).startswith("device.")]
    say(f"              resumed; the audit log has {', '.join(sorted({a['action'] for a in audited}))}")


def preflight(w: World) -> None:
    """Step 12: release 4 writes where the gateways' profile forbids; its preflight catches every
    device that would refuse before any device changes, and the rollout stops there."""
    plan = w.repo.path / "rollouts/default.yaml"
    bundle = w.repo.path / "bundles/motd/bundle.yaml"
    saved = {plan: plan.read_text(), bundle: bundle.read_text()}
    plan.write_text(saved[plan] + "preflight: true\n")
    text = saved[bundle].split("health:")[0].replace("release 3", "release 4")
    bundle.write_text(text.rstrip("\n") + "\n  - kind: file\n    path: /srv/edge/notes.txt\n"
                      "    content: \"notes\\n\"\n")
    w.repo.sign("release 4: notes under /srv")  # lint passes: some profile (generic-linux) allows /srv
    commit = w.repo.commit_and_push("Release 4: notes under /srv, with a preflight")
    _webhook(w.server)
    rid = find_rollout(w.server, 4)
    wait_until(lambda: _api(w.server, f"/api/v1/rollouts/{rid}").get("phase") == "aborted",
               "the preflight of release 4 to stop its rollout", 60)
    summary = _api(w.server, f"/api/v1/rollouts/{rid}/preflight")
    refusals = summary.get("refusals") or [{}]
    reason = str(refusals[0].get("reason", "")).rsplit("': ", 1)[-1]
    say(f"12. preflight release 4 ({commit[:7]}) writes /srv/edge/notes.txt: lint passes (a profile "
        "allows it),")
    say(f"              but {(summary.get('counts') or {}).get('refused', 0)} of {len(w.devices)} devices "
        f"would refuse: {reason}")
    untouched = sum(1 for d in w.devices if "release 2" in d.read(MOTD) and not d.read("/srv/edge/notes.txt"))
    say(f"              rollout {rid} aborted before any device changed: {untouched}/{len(w.devices)} "
        "devices still run release 2")
    for path, original in saved.items():
        path.write_text(original)


def air_gapped(w: World) -> None:
    """Step 13: a device with no mirror and no broker takes release 2 from a file."""
    usb = w.base / "usb"
    usb.mkdir()
    bundle = usb / "release-2.bundle"
    trust = [x for key in w.trust for x in ("--trust", key)]
    run_tool([BIN / "fleetctl", "release", "export", w.repo.path, "--rev", w.commits[2], "--out", bundle,
              *trust, "--threshold", "2"])
    dev = Device(w.base / "air-gapped", "gw-airgap", {"site": "remote", "role": "gateway"})
    dev.write_config(f"git://127.0.0.1:{free_port()}/fleet.git", w.trust, broker_port=1,
                     credentials=w.base / "no-credentials")
    cfg = json.loads(dev.config.read_text())
    del cfg["mqtt"]  # no broker either
    dev.config.write_text(json.dumps(cfg, indent=2))
    dev.agent("init", check=True)
    code, out, err = dev.agent("import", str(bundle), "--json")
    result: dict[str, Any] = json.loads(out) if out.strip() else {"outcome": f"exit {code}", "reason": err}
    say(f"13. offline   fleetctl release export: release 2 as {bundle.name} ({bundle.stat().st_size} bytes); "
        f"a device without")
    say(f"              mirror or broker: edge-agent import -> {result.get('outcome')}, "
        f"{MOTD} says {dev.read(MOTD).strip()!r}")


def webhooks(w: World) -> None:
    """Step 14: what the webhook receiver got, every notification signed."""
    wait_until(lambda: "rollout.preflight" in w.receiver.got(), "the preflight notification", 30)
    got = Counter(w.receiver.got())
    shown = ", ".join(f"{k} {v}" for k, v in sorted(got.items()))
    say(f"14. webhooks  a receiver got {sum(got.values())} notifications, each signature checked "
        f"({w.receiver.refused} refused):")
    say(f"              {shown}")


def summary(w: World) -> None:
    """Step 15: the fleet as ``fleetctl devices --json`` reports it."""
    out = run_tool([BIN / "fleetctl", "devices", "--server", w.server.url, "--json"]).stdout
    counts, online, total = summarise_devices(json.loads(out))
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    say(f"15. summary   fleetctl devices --json: {parts}; online {online}/{total}")
    say(f"              dashboard {w.server.url}/ (admin token in {w.server.token_file})")


def story(base: Path, n_devices: int, children: Children, receiver: Receiver) -> World:
    """Run every step of the demo inside ``base``; return what is running."""
    say(f"== edge-fleet demo: {n_devices} devices, every part real, on this machine ==")
    with app_listener() as app_port:
        w = set_up(base, n_devices, app_port, children, receiver)
        release_one(w)
        tampered_push(w)
        release_two(w)
        bad_release(w)
        drift(w)
        remote_pause(w)
        preflight(w)
        air_gapped(w)
        webhooks(w)
        summary(w)
        return w


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM or SIGHUP into the same clean stop as Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit code (0 done, 1 a step failed, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog="demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=20, help="how many devices (default 20, at least 4)")
    parser.add_argument("--exit-when-done", action="store_true",
                        help="stop everything and exit at the end instead of waiting for Ctrl-C")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, roots)")
    args = parser.parse_args(argv)
    if shutil.which("git") is None:
        sys.stderr.write("demo: git is not installed (make demo installs it)\n")
        return 1
    signal.signal(signal.SIGTERM, _stop_on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup it stays ignored
        signal.signal(signal.SIGHUP, _stop_on_signal)
    base = Path(tempfile.mkdtemp(prefix="edge-fleet-demo-"))
    children = Children()
    t0 = time.monotonic()
    code = 0
    try:
        with webhook_receiver(os.urandom(24).hex().encode()) as receiver:
            w = story(base, max(MIN_DEVICES, args.devices), children, receiver)
            say(f"done in {time.monotonic() - t0:.0f} s.")
            if not args.exit_when_done:
                say(f"The fleet keeps running: open {w.server.url}/ — Ctrl-C or `kill {os.getpid()}` "
                    "stops every process and cleans up.")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        signal.pause()
    except DemoError as exc:
        sys.stderr.write(f"demo: {exc} (logs under {base})\n")
        args.keep = True
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            children.stop_all()
        if args.keep:
            say(f"(kept {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
