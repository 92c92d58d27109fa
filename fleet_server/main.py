"""``fleet-server``: wires the configuration, store, metrics, MQTT ingest, rollout runner, Git
watcher, retention pruning, webhook notifications and the HTTP API, and runs until SIGTERM or SIGINT.

Start order: the SQLite store's lock file (one process owns a SQLite store), the store, then the
ingest processes (``ingest.processes``, see ``ingest_supervisor.py``; with 0 the receive path runs in
this process), then the MQTT client (paho waits on its socket with ``select()``, which cannot watch
descriptors numbered 1024 or more, so it opens before anything that may hold many; publish-only when
ingest runs in its own processes), a bounded wait (10 s) for the ingest processes to connect and
subscribe, then the leadership (the leader alone runs the rollout runner, the Git watcher, the
baseline publisher and the notifier's delivery thread: see ``leadership.py``), the pruning timer,
then the HTTP API (uvicorn in the main thread; it turns SIGTERM and SIGINT into a clean shutdown).
On the way out the ingest processes are stopped first (SIGTERM; each commits and acknowledges what it
has queued before it disconnects and exits), so a clean stop loses nothing and leaves no process
behind; undelivered notifications stay pending in the store for the next start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_core.errors import EdgeFleetError
from edge_core.logs import setup_logging
from edge_core.source import Source
from fleet_server import __version__
from fleet_server.extras import exit_without_server_extras

try:  # the server extras (uvicorn, FastAPI, prometheus-client, Jinja2): a device has none of them
    import uvicorn

    from fleet_server.api.app import ApiActions, create_app
    from fleet_server.baseline import FleetBaseline, log_phase_errors
    from fleet_server.config import DEFAULT_CONFIG_PATH, ServerConfig, load_server_config, parse_set_options
    from fleet_server.errors import FleetError, ServerConfigError, StoreError, UsageError
    from fleet_server.ingest import Ingestor
    from fleet_server.ingest_supervisor import IngestSupervisor, publisher_client_id
    from fleet_server.interpreter import freeze_startup, tune_interpreter
    from fleet_server.leader_lock import claim_sqlite_store, leader_lock
    from fleet_server.leadership import Leadership
    from fleet_server.metrics import ServerMetrics
    from fleet_server.metrics_notify import NotificationMetrics
    from fleet_server.notify.notifier import Notifier
    from fleet_server.releases import GitWatcher
    from fleet_server.remote_pause import PUBLISH_WAIT, RemotePause
    from fleet_server.rollouts.model import RolloutState
    from fleet_server.rollouts.plan import RolloutPlan
    from fleet_server.rollouts.preflight import PreflightDuty
    from fleet_server.rollouts.runner import RolloutRunner, plan_from_tree
    from fleet_server.store import AuditStore, FleetStore, open_store
    from fleet_server.store_commands import copy_command, migrate
    from fleet_server.store_commands import register as register_store_commands
except ImportError as _missing:
    exit_without_server_extras(_missing)

__all__ = ["GitPlans", "LeaderDuties", "Pruner", "both_listeners", "build_parser", "main",
           "overrides_from_args", "run_server"]

log = logging.getLogger(__name__)


class Pruner:
    """Deletes history past its retention every ``store.prune_interval`` seconds, in a thread: events
    and health samples, and settled webhook deliveries older than ``store.events_retention``."""

    def __init__(self, store: FleetStore, config: ServerConfig) -> None:
        self._store = store
        self._config = config.store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prune_now(self) -> int:
        """Prune once; return how many rows were deleted (0 when the store failed, which is logged)."""
        try:
            cfg = self._config
            now = time.time()
            pruned = self._store.prune(now, cfg.events_retention, cfg.health_retention)
            return pruned + self._store.prune_deliveries(now - cfg.events_retention)
        except StoreError as exc:
            log.error("retention pruning failed: %s", exc)
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self._config.prune_interval):
            self.prune_now()

    def start(self) -> None:
        """Start the timer thread (first prune one interval from now)."""
        self._thread = threading.Thread(target=self._run, name="pruner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread (bounded wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None


class GitPlans:
    """Rollout plans read from verified releases in the Git watcher's cache.

    ``on_release`` is the watcher's ``publish_nudge`` callback. A release whose fleet.yaml declares
    no ``rollout:`` is not governed: the fleet baseline moves to it and devices are nudged (they
    follow it at once, as without rollouts). A release that declares one is governed: the baseline
    stays on the last-good release, no nudge goes out, and the rollout's per-device assignments are
    the only way devices reach it. A fleet.yaml that cannot be read counts as governed (nothing moves;
    logged). The watcher calls it while holding its poll lock, so reading the cache never races a
    fetch. ``named`` serves ``plan_name`` starts from the newest recorded release.
    """

    def __init__(self, config: ServerConfig, store: AuditStore, runner: RolloutRunner,
                 nudge: Callable[[str, int], None], baseline: FleetBaseline | None = None) -> None:
        assert config.git.url is not None
        self._source = Source(config.git.url, config.git.branch, Path(config.git.cache_dir),
                              limits=config.git.fetch_limits)
        self._store = store
        self._runner = runner
        self._nudge = nudge
        self._baseline = baseline
        self._lock = threading.Lock()

    def _plan(self, commit: str, name: str | None) -> RolloutPlan | None:
        with self._lock:
            tree = self._source.read_tree(commit)
        return plan_from_tree(tree, name)

    def on_release(self, commit: str, release: int) -> None:
        """Move the baseline and nudge for a release no rollout governs; start the default rollout of
        one that fleet.yaml governs, leaving the baseline and sending no nudge."""
        try:
            plan = self._plan(commit, None)
        except (EdgeFleetError, FleetError) as exc:
            log.error("release %s: cannot read its rollout plan, no rollout started and the fleet "
                      "baseline stays: %s", release, exc)
            return
        if plan is None:
            if self._baseline is not None:
                self._baseline.move(release, commit, reason=f"release {release} declares no rollout")
            self._nudge(commit, release)
            return
        if self._baseline is not None:
            self._baseline.on_governed_release(release)
        self._runner.on_new_release(release, plan)

    def named(self, name: str) -> RolloutPlan:
        """Return ``rollouts/<name>.yaml`` of the newest recorded release.

        Raises:
            UsageError: no release is recorded, or it has no such plan.
            PlanError: the plan is invalid.
            FetchError: the release is not in the cache.
        """
        newest = self._store.releases(limit=1)
        if not newest:
            raise UsageError("no signed release is recorded yet")
        plan = self._plan(str(newest[0]["commit"]), name)
        assert plan is not None
        return plan

    def close(self) -> None:
        """Close the Git cache."""
        with self._lock:
            self._source.close()


class LeaderDuties:
    """What only the leader runs: the rollout runner, the fleet baseline publisher, the notifier's
    scans and deliveries, the rollouts' preflights and (with ``git.url``) the Git watcher. Started
    each time this replica takes the leadership (reloading the rollouts another leader may have
    moved) and stopped when it loses it."""

    def __init__(self, config: ServerConfig, store: FleetStore, runner: RolloutRunner, *,
                 baseline: FleetBaseline, nudge: Callable[[str, int], None], metrics: ServerMetrics,
                 notifier: Notifier | None = None, preflight: PreflightDuty | None = None) -> None:
        self._config = config
        self._notifier = notifier
        self._preflight = preflight
        self._store = store
        self._runner = runner
        self._baseline = baseline
        self._nudge = nudge
        self._metrics = metrics
        self._watcher: GitWatcher | None = None
        self._plans: GitPlans | None = None

    def start(self) -> None:
        """Reload the rollouts, publish the baseline, start the runner and the Git watcher.

        Raises:
            StoreError: the store cannot be read.
        """
        self._runner.load()
        self._baseline.start()
        self._runner.start_thread()
        if self._config.git.url:
            self._plans = GitPlans(self._config, self._store, self._runner, self._nudge, self._baseline)
            self._runner.set_plan_loader(self._plans.named)
            self._watcher = GitWatcher(self._config, self._store, self._plans.on_release,
                                       metrics=self._metrics.releases,
                                       notify=self._notifier.refusal_hook if self._notifier else None,
                                       poll_requests=self._store.git_poll_requests)
            self._watcher.start()
        if self._notifier is not None:  # one replica delivers: no two scans, no delivery sent twice
            self._notifier.start()
        if self._preflight is not None:
            self._preflight.start()

    def trigger_git(self) -> None:
        """Poll the Git mirror now (a webhook): at once on the leader; on a follower, through a poll
        request counted in the store, which the leader's watcher sees within a second.

        Raises:
            StoreError: a follower cannot record the request.
        """
        watcher = self._watcher
        if watcher is not None:
            watcher.trigger()
        else:
            self._store.request_git_poll()

    def stop(self) -> None:
        """Stop the preflights, the notifier, the Git watcher and the runner (bounded, idempotent)."""
        if self._preflight is not None:
            self._preflight.stop()
        if self._notifier is not None:
            self._notifier.stop()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        plans, self._plans = self._plans, None
        if plans is not None:
            self._runner.set_plan_loader(None)
            plans.close()
        self._runner.unload()


def build_parser() -> argparse.ArgumentParser:
    """Build the ``fleet-server`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fleet-server", description="MQTT ingest, Git watcher and HTTP API of an edge-fleet fleet.")
    parser.add_argument("--version", action="version", version=f"fleet-server {__version__}")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML configuration (default: {DEFAULT_CONFIG_PATH} when it exists)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration field (repeatable)")
    parser.add_argument("--mqtt-port", type=int, help="same as --set mqtt.port=N")
    parser.add_argument("--http-port", type=int, help="same as --set http.port=N")
    parser.add_argument("--db", help="same as --set store.path=FILE")
    commands = parser.add_subparsers(dest="command", metavar="{run,migrate,store}")
    commands.add_parser("run", help="run the server (the default)")
    register_store_commands(commands)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Collect the configuration overrides of the command line (the shortcut flags win over --set).

    Raises:
        ServerConfigError: a --set item is not ``section.key=value``.
    """
    overrides = parse_set_options(args.sets)
    if args.mqtt_port is not None:
        overrides["mqtt.port"] = args.mqtt_port
    if args.http_port is not None:
        overrides["http.port"] = args.http_port
    if args.db is not None:
        overrides["store.path"] = args.db
    return overrides


def both_listeners(first: Callable[[RolloutState, str], None],
                   second: Callable[[RolloutState, str], None]) -> Callable[[RolloutState, str], None]:
    """Return a rollout phase listener that calls ``first`` then ``second``."""

    def listener(state: RolloutState, old_phase: str) -> None:
        first(state, old_phase)
        second(state, old_phase)

    return listener


def check_http_port(host: str, port: int) -> None:
    """Refuse to start when the HTTP address cannot be bound (a port in use, an address not of this
    machine), with one line, instead of uvicorn's own exit after everything else has started.

    Raises:
        ServerConfigError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise ServerConfigError(f"http: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    finally:
        probe.close()


def _log_when_listening(server: uvicorn.Server, config: ServerConfig) -> None:
    """Log "listening" once uvicorn has bound its socket (bounded wait), never before."""
    deadline = time.monotonic() + 60.0
    while not server.started and not server.should_exit and time.monotonic() < deadline:
        time.sleep(0.05)
    if server.started:
        log.info("fleet server listening on http://%s:%s, broker %s:%s", config.http.host, config.http.port,
                 config.mqtt.host, config.mqtt.port)


def _quiet_stop_signals() -> None:
    """Make SIGTERM/SIGINT harmless outside uvicorn's own handling: uvicorn raises the signal again
    after its shutdown, which would otherwise kill the process before the ingest queue is flushed."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: log.info("signal %s: stopping", number))


_INGEST_START_WAIT = 10.0
"""Seconds the server waits for its ingest processes to connect before it opens the API."""


def run_server(config: ServerConfig) -> None:
    """Run the fleet server until SIGTERM/SIGINT, then stop every part cleanly.

    Raises:
        StoreError: the database cannot be opened, or was written by a newer server.
        BrokerError: the broker settings cannot be used.
        ServerConfigError: a token or secret file cannot be read.
    """
    tune_interpreter()  # thread switching and the garbage collector (interpreter.py)
    check_http_port(config.http.host, config.http.port)  # before anything starts: one line, exit 1
    owner = claim_sqlite_store(config)  # one process owns a SQLite store: refuse a second one
    try:
        store = open_store(config.store)
    except FleetError:
        if owner is not None:
            owner.release()
        raise
    metrics = ServerMetrics()
    ingestor: Ingestor | None = None
    supervisor: IngestSupervisor | None = None
    leadership: Leadership | None = None
    pruner = Pruner(store, config)
    notifier: Notifier | None = None
    try:
        notifier = Notifier(config.notifications, store, metrics=NotificationMetrics(metrics.registry))
        if config.ingest.processes == 0:  # the receive path in this process, as one client
            ingestor = Ingestor(config, store, metrics.ingest)
        else:  # the receive path in ingest processes; this one only publishes
            publisher = Ingestor(config, store, metrics.ingest, client_id=publisher_client_id(config),
                                 subscribe=False)
            ingestor = publisher
            supervisor = IngestSupervisor(config, metrics.ingest,
                                          publisher_connected=lambda: publisher.connected)
            supervisor.start()
        ingestor.start()
        if supervisor is not None and not supervisor.wait_connected(_INGEST_START_WAIT):
            # as the in-process path, the API opens only once the subscriptions are sent, so that a
            # first start does not answer before reports have somewhere to go; a broker that is down
            # must not keep the API closed, so the wait is bounded
            log.warning("the ingest processes are not connected to the broker after %g s; starting the "
                        "API anyway (they keep retrying)", _INGEST_START_WAIT)
        metrics.attach_fleet(store)
        baseline = FleetBaseline(store, ingestor.publish_baseline)
        runner = RolloutRunner(store, ingestor.publish_desired)
        runner.set_phase_listener(both_listeners(log_phase_errors(baseline), notifier.on_phase))
        runner.set_commit_listener(notifier.on_commit)
        metrics.attach_rollouts(runner)
        duties = LeaderDuties(config, store, runner, baseline=baseline, nudge=ingestor.publish_nudge,
                              metrics=metrics, notifier=notifier,
                              preflight=PreflightDuty(store, runner, ingestor.publish_preflight,
                                                      notify=notifier.notify if notifier else None))
        leadership = Leadership(leader_lock(config, store), store, duties, lease=config.leader.lease)
        leadership.start()
        metrics.attach_role(store.backend, lambda: leadership.role if leadership is not None else "follower")
        pruner.start()
        pauses = RemotePause(store, lambda device, paused, reason: ingestor.publish_control(
            device, paused=paused, reason=reason, wait=PUBLISH_WAIT))
        actions = ApiActions(trigger_git=duties.trigger_git if config.git.url else None, rollouts=runner,
                             pauses=pauses)
        app = create_app(store, config, metrics, actions=actions)
        server = uvicorn.Server(uvicorn.Config(app, host=config.http.host, port=config.http.port,
                                               log_config=None, access_log=False, lifespan="off"))
        threading.Thread(target=_log_when_listening, args=(server, config), name="listening-log",
                         daemon=True).start()
        _quiet_stop_signals()
        freeze_startup()
        server.run()
    finally:
        if supervisor is not None:  # first: they commit and acknowledge what they hold, then exit
            supervisor.stop()
        pruner.stop()
        if leadership is not None:
            leadership.stop()
        if ingestor is not None:
            ingestor.stop()
        if notifier is not None:
            notifier.stop()
        store.close()
        if owner is not None:
            owner.release()
        log.info("fleet server stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fleet-server``; return the exit code (0 after a clean stop, 1 on failure, 2 usage)."""
    args = build_parser().parse_args(argv)
    try:
        path = args.config
        if path is None and DEFAULT_CONFIG_PATH.exists():
            path = DEFAULT_CONFIG_PATH
        config = load_server_config(path, overrides_from_args(args))
        setup_logging(config.log_level)
        if args.command == "store":
            sys.stdout.write(copy_command(args) + "\n")
            return 0
        if args.command == "migrate":
            sys.stdout.write(migrate(config) + "\n")
            return 0
        run_server(config)
    except (EdgeFleetError, FleetError) as exc:
        sys.stderr.write(f"fleet-server: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
