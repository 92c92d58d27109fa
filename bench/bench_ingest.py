"""Ingest throughput: status + health reports from many simulated devices through a real Mosquitto,
into the Ingestor + SQLite store, next to a bare paho subscriber on the same broker in the same run.

    .venv/bin/python bench/bench_ingest.py [--messages 40000] [--devices 2000] [--publishers 4]

Publisher processes (each a paho client publishing QoS 1 for many device ids) send a fixed number
of messages; both the Ingestor (manual acks after commit) and a bare paho subscriber (QoS 1, auto
ack, counts only) receive every one. Reports msgs/s of each, the ratio, and loss (messages not in
the store / not received). Everything runs on 127.0.0.1; the broker is stopped by pid.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_core import messages as m
from fleet_server.config import parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import Store
from tests.support.broker import Mosquitto

PREFIX = "fleet/v1"


def publisher_main(port: int, index: int, count: int, devices: int, start: mp.Event) -> None:  # type: ignore[valid-type]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    # pre-encode: the publisher's own JSON cost is not what is measured
    payloads = []
    for i in range(min(count, 2000)):
        dev = f"dev-{(index * 7919 + i) % devices:05d}"
        if i % 2:
            body = m.status_message(dev, commit=None, release=i % 9, sync_state="applied", drift={},
                                    paused=False, ts=1.7e9 + i)
            payloads.append((f"{PREFIX}/{dev}/status", m.encode(body)))
        else:
            body = m.health_message(dev, commit=None, release=1, ts=1.7e9 + index * 1e6 + i,
                                    metrics={"cpu": 12.5, "mem": 40.1, "disk_free": 1e9}, checks=[])
            payloads.append((f"{PREFIX}/{dev}/health", m.encode(body)))
    start.wait()  # type: ignore[attr-defined]
    infos = []
    for i in range(count):
        t, p = payloads[i % len(payloads)]
        if t.endswith("/health"):  # unique timestamps so no health sample is a duplicate
            dev = t.split("/")[2]
            body = m.health_message(dev, commit=None, release=1, ts=1.7e9 + index * 1e6 + i,
                                    metrics={"cpu": 12.5}, checks=[])
            p = m.encode(body)
        infos.append(client.publish(t, p, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=40000)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--publishers", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    per = args.messages // args.publishers
    total = per * args.publishers
    try:
        with Mosquitto(work / "broker", extra_lines=["max_inflight_messages 1000",
                                                     "max_queued_messages 1000000"]) as broker:
            config = parse_server_config({"mqtt": {"port": broker.port, "client_id": "bench-server"},
                                          "store": {"path": str(work / "fleet.db")}}, work)
            store = Store(config.store.path)
            metrics = ServerMetrics()
            ingestor = Ingestor(config, store, metrics.ingest)
            ingestor.start()
            assert ingestor.wait_connected(10)

            bare_count = [0]
            bare_first = [0.0]
            bare_last = [0.0]
            lock = threading.Lock()

            def on_msg(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
                with lock:
                    now = time.perf_counter()
                    if bare_count[0] == 0:
                        bare_first[0] = now
                    bare_count[0] += 1
                    bare_last[0] = now

            bare = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv5)
            bare.on_message = on_msg
            bare.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{PREFIX}/+/status", 1),
                                                                   (f"{PREFIX}/+/health", 1)])
            bare.connect("127.0.0.1", broker.port)
            bare.loop_start()
            time.sleep(1.0)

            start = mp.Event()
            procs = [mp.Process(target=publisher_main, args=(broker.port, k, per, args.devices, start))
                     for k in range(args.publishers)]
            for p in procs:
                p.start()
            time.sleep(1.5)  # publishers connected and payloads built
            t0 = time.perf_counter()
            start.set()

            def ingested() -> int:
                c = store.counters()
                return c.get("ingested.status", 0) + c.get("ingested.health", 0)

            deadline = time.monotonic() + 300
            server_done = None
            while time.monotonic() < deadline:
                if server_done is None and ingested() >= total:
                    server_done = time.perf_counter()
                if server_done is not None and bare_count[0] >= total:
                    break
                time.sleep(0.02)
            for p in procs:
                p.join(timeout=60)
            server_elapsed = (server_done or time.perf_counter()) - t0
            bare_elapsed = (bare_last[0] or time.perf_counter()) - t0
            got_server = ingested()
            dropped = sum(v for k, v in store.counters().items() if k.startswith("dropped."))
            server_rate = got_server / server_elapsed
            bare_rate = bare_count[0] / bare_elapsed if bare_elapsed > 0 else 0.0
            print(f"messages sent:        {total} ({args.publishers} publisher processes,"
                  f" {args.devices} devices, status+health, QoS 1)")
            print(f"bare paho subscriber: {bare_count[0]} received in {bare_elapsed:.2f}s"
                  f" = {bare_rate:,.0f} msg/s, loss {total - bare_count[0]}")
            print(f"ingestor + store:     {got_server} stored in {server_elapsed:.2f}s"
                  f" = {server_rate:,.0f} msg/s, loss {total - got_server}, dropped {dropped}")
            print(f"ratio ingestor/bare:  {server_rate / bare_rate:.2f}" if bare_rate else "ratio: n/a")
            bare.disconnect()
            bare.loop_stop()
            ingestor.stop()
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
