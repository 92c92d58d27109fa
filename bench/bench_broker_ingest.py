"""Fleet ingest vs the broker: the fleet server's ingest path next to a bare paho subscriber and
``mosquitto_sub`` on the same Mosquitto in the same run, then the same with the ingest path split
across N worker processes by an MQTT 5 shared subscription (``mqtt.share_group``).

Each phase starts a fresh Mosquitto (loopback, ``max_inflight_messages 1000``) and, each in its own
process, subscribed at once with QoS 1:

- the ingest path: ``Ingestor`` + ``Store`` (manual acknowledgement after the SQLite commit), one
  process with a plain subscription, or N processes of one share group writing the same database;
- as many bare paho subscribers (QoS 1, automatic acknowledgement, counts only) as there are ingest
  processes: one with a plain subscription in the plain phase, N sharing a group of their own
  (``$share/bench-bare/...``) in a shared phase, so the reference does the same work split the same
  way as the N ingest processes (a single bare subscriber would itself starve as processes are
  added, and a ratio to it would read as capacity that is not there);
- ``mosquitto_sub -q 1 -C <total>`` (the broker's own C client, one process, output to a file).

Publisher processes (those of :mod:`bench.bench_ingest`: status + health of many device ids, QoS 1)
send a fixed number of messages. A consumer's rate is what it received (stored, for the ingest path)
divided by the time from the start signal to its last message (for N processes of one group: all
they received together, to the last message any of them got); loss is what it never got. The
publishers' own rate (every message acknowledged by the broker, to the last publisher's exit) is
reported too: a consumer that keeps up with it shows only that it kept up. Every rate
is absolute capacity on this machine, where the broker, the publishers and every consumer share the
same cores. Only 127.0.0.1 is used; every process this starts is stopped by pid.

    python -m bench.bench_broker_ingest [--messages 40000] [--devices 2000] [--publishers 4]
                                        [--workers 2,4] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.bench_ingest import PREFIX, publisher_main

__all__ = ["main", "run_phase"]

BROKER_LINES = ["max_inflight_messages 1000", "max_queued_messages 1000000"]
TIMEOUT = 300.0


def ingest_worker(port: int, db: str, client_id: str, share_group: str | None, ready: Any, stop: Any) -> None:
    """One process of the fleet server's ingest path, running until ``stop`` is set."""
    from fleet_server.config import parse_server_config
    from fleet_server.ingest import Ingestor
    from fleet_server.metrics import ServerMetrics
    from fleet_server.store import Store

    mqtt_cfg: dict[str, Any] = {"port": port, "client_id": client_id}
    if share_group is not None:
        mqtt_cfg["share_group"] = share_group
    config = parse_server_config({"mqtt": mqtt_cfg, "store": {"path": db}}, Path(db).parent)
    store = Store(config.store.path)
    ingestor = Ingestor(config, store, ServerMetrics().ingest)
    ingestor.start()
    if not ingestor.wait_connected(10):
        raise SystemExit(f"{client_id}: not connected to the broker")
    time.sleep(0.3)  # the SUBACK
    ready.set()
    stop.wait(TIMEOUT + 60)
    ingestor.stop()
    store.close()


def bare_main(port: int, index: int, share_group: str | None, counts: Any, lasts: Any, ready: Any,
              stop: Any) -> None:
    """A bare paho subscriber (QoS 1, automatic acknowledgement, counts only) until ``stop`` is set.

    With ``share_group`` it subscribes through ``$share/<group>/...``, one of several processes that
    split the messages between them, as the ingest processes of a shared phase do. It keeps its count
    in ``counts[index]`` and the time of its last message in ``lasts[index]`` (shared memory).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    share = f"$share/{share_group}/" if share_group else ""
    state = {"count": 0}

    def on_message(_c: mqtt.Client, _u: object, _msg: mqtt.MQTTMessage) -> None:
        state["count"] += 1
        lasts[index] = time.monotonic()
        counts[index] = state["count"]

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{index}", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: ready.set()
    client.on_connect = lambda c, *_a: c.subscribe([(f"{share}{PREFIX}/+/status", 1),
                                                    (f"{share}{PREFIX}/+/health", 1)])
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop.wait(TIMEOUT + 60)
    client.disconnect()
    client.loop_stop()


def _stored(db: Path) -> tuple[int, int]:
    """(messages ingested, messages dropped) by the store's persistent counters, read without a Store."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT name, value FROM counters").fetchall()
    except sqlite3.OperationalError:
        return 0, 0
    finally:
        conn.close()
    counts = {str(k): int(v) for k, v in rows}
    ingested = counts.get("ingested.status", 0) + counts.get("ingested.health", 0)
    return ingested, sum(v for k, v in counts.items() if k.startswith("dropped."))


def run_phase(work: Path, workers: int, shared: bool, messages: int, devices: int,
              publishers: int) -> dict[str, Any]:
    """One phase: a fresh broker, the three consumers, the publishers; return each consumer's figures."""
    from tests.support.broker import Mosquitto

    ctx = mp.get_context("spawn")
    per = messages // publishers
    total = per * publishers
    db = work / "fleet.db"
    procs: list[Any] = []
    msub: subprocess.Popen[bytes] | None = None
    with Mosquitto(work / "broker", extra_lines=BROKER_LINES) as broker:
        stop, bare_stop = ctx.Event(), ctx.Event()
        bare_counts = ctx.Array("q", workers, lock=False)
        bare_lasts = ctx.Array("d", workers, lock=False)
        try:
            readies = []
            for n in range(workers):
                ready = ctx.Event()
                group = "fleet" if shared else None
                procs.append(ctx.Process(target=ingest_worker, args=(broker.port, str(db), f"bench-server-{n}",
                                                                     group, ready, stop)))
                readies.append(ready)
            bare_group = "bench-bare" if shared else None
            for n in range(workers):  # the same work: as many bare processes, sharing their own group
                ready = ctx.Event()
                procs.append(ctx.Process(target=bare_main, args=(broker.port, n, bare_group, bare_counts,
                                                                 bare_lasts, ready, bare_stop)))
                readies.append(ready)
            for p in procs:
                p.start()
            msub_out = work / "mosquitto_sub.out"
            with msub_out.open("wb") as sink:
                msub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5",
                                         "-q", "1", "-i", "bench-msub", "-C", str(total), "-F", "%t",
                                         "-t", f"{PREFIX}/+/status", "-t", f"{PREFIX}/+/health"],
                                        stdout=sink, stderr=subprocess.DEVNULL)
            msub_done: list[float] = []

            def wait_msub(proc: subprocess.Popen[bytes] = msub) -> None:
                proc.wait(TIMEOUT)
                msub_done.append(time.monotonic())

            waiter = threading.Thread(target=wait_msub, daemon=True)
            for r in readies:
                if not r.wait(60):
                    raise SystemExit("a consumer did not subscribe within 60 s")
            start = ctx.Event()
            pubs = [ctx.Process(target=publisher_main, args=(broker.port, k, per, devices, start))
                    for k in range(publishers)]
            procs += pubs
            for p in pubs:
                p.start()
            time.sleep(2.0)  # publishers connected, payloads built; mosquitto_sub subscribed long ago
            waiter.start()
            t0 = time.monotonic()
            start.set()
            ingest_done: float | None = None
            deadline = t0 + TIMEOUT
            pubs_done: float | None = None
            while time.monotonic() < deadline:
                stored, _ = _stored(db)
                if ingest_done is None and stored >= total:
                    ingest_done = time.monotonic()
                if pubs_done is None and not any(p.is_alive() for p in pubs):
                    pubs_done = time.monotonic()
                if ingest_done is not None and msub_done and sum(bare_counts) >= total:
                    break
                time.sleep(0.01)
            stored, dropped = _stored(db)
            bare_count, bare_last = sum(bare_counts), max(bare_lasts)
            msub_count = len(msub_out.read_bytes().splitlines())
            msub_last = msub_done[0] if msub_done else time.monotonic()
            for p in pubs:
                p.join(timeout=60)
            pubs_done = pubs_done or time.monotonic()
        finally:
            stop.set()
            bare_stop.set()
            for p in procs:
                p.join(timeout=15)
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, 9)
                    p.join(timeout=5)
            if msub is not None and msub.poll() is None:
                msub.kill()
                msub.wait(timeout=5)

    def figures(count: int, last: float) -> dict[str, Any]:
        seconds = (last - t0) if last > t0 else float("nan")
        return {"received": count, "seconds": seconds, "rate": count / seconds if seconds > 0 else 0.0,
                "loss": total - count}

    ingest = figures(stored, ingest_done or time.monotonic())
    ingest["dropped"] = dropped
    bare = figures(bare_count, bare_last)
    bare.update(processes=workers, share_group=bare_group)
    # what the publishers offered: every message acknowledged by the broker, to the last publisher's exit
    offered = figures(total, pubs_done)
    return {"workers": workers, "shared": shared, "total": total, "ingest": ingest,
            "bare_paho": bare, "mosquitto_sub": figures(msub_count, msub_last), "publishers": offered}


def main(argv: list[str] | None = None) -> int:
    """Run a plain phase and one shared phase per worker count; print a table (JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=40000)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--workers", default="2,4", help="worker counts of the shared-subscription phases")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    phases = [(1, False)] + [(int(n), True) for n in args.workers.split(",") if n.strip()]
    results = []
    for workers, shared in phases:
        work = Path(tempfile.mkdtemp(prefix="bench-broker-ingest-"))
        try:
            results.append(run_phase(work, workers, shared, args.messages, args.devices, args.publishers))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"phase done: {workers} ingest process(es), shared={shared}", file=sys.stderr)
    out = {"messages": results[0]["total"], "devices": args.devices, "publishers": args.publishers,
           "cpus": os.cpu_count(), "phases": results}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"# ingest vs the broker: {out['messages']} messages (status + health, QoS 1), "
          f"{args.devices} devices, {args.publishers} publisher processes, {out['cpus']} CPUs")
    print("| ingest processes | consumer | msg/s | loss | ingest / bare paho (same process count) |")
    print("|---|---|---|---|---|")
    for ph in results:
        label = f"{ph['workers']} ({'shared' if ph['shared'] else 'plain'})"
        ing, bare, msub = ph["ingest"], ph["bare_paho"], ph["mosquitto_sub"]
        ratio = ing["rate"] / bare["rate"] if bare["rate"] else float("nan")
        print(f"| {label} | fleet server ingest | {ing['rate']:,.0f} | {ing['loss']} (dropped {ing['dropped']}) "
              f"| {ratio:.2f} |")
        print(f"| {label} | bare paho, {bare['processes']} process(es) | {bare['rate']:,.0f} | {bare['loss']} | |")
        print(f"| {label} | mosquitto_sub, 1 process | {msub['rate']:,.0f} | {msub['loss']} | |")
        print(f"| {label} | (offered by the publishers) | {ph['publishers']['rate']:,.0f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
