"""`guardgate serve --workers N`: N gateway processes on one port, and a supervisor.

Each worker is a whole gateway (its own event loop, pools, in-process cache and policy watcher) bound to
the port with SO_REUSEPORT, so the kernel spreads connections over the workers evenly; verdicts are shared
through Redis. The supervisor serves nothing: it starts the workers, restarts one that dies, and on
SIGTERM or SIGINT tells every worker to drain (finish the requests in flight, then exit) and waits. It also
keeps the folder where the workers write their Prometheus metrics, so that any worker's GET /metrics
answers for all of them.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

log = logging.getLogger("guardgate.workers")

# A worker that dies sooner than this after its start failed to start. Before any worker has served that
# long, the gateway cannot start: the supervisor stops. Later, a slot is restarted at most this often.
MIN_UPTIME_S = 5.0


def reuseport_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _exit_with_parent(parent: int) -> None:
    """A worker whose supervisor was killed (SIGKILL cannot be forwarded) drains and exits."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def worker_main(config_path: str, host: str, port: int, parent: int) -> None:
    """One worker process (started by the supervisor with the spawn method)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.config import load_config
    from gateway.logs import configure_logging
    from gateway.server import uvicorn_config

    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which forwards one SIGTERM
    config = load_config(config_path)
    configure_logging(config.server.log_level, config.server.log_format)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    sock = reuseport_socket(host, port)
    uvicorn.Server(uvicorn_config(create_app(config), config, host=host, port=port)).run(sockets=[sock])


# prometheus-client's multiprocess mode: each worker writes its metric values to files in this folder.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsDir:
    """The workers' shared metrics folder: PROMETHEUS_MULTIPROC_DIR if the operator set it (emptied of an
    earlier run's files), else a temporary folder of our own, removed at the end. Set in the environment
    before any worker starts, so every worker (and only the workers) writes there."""

    def __init__(self) -> None:
        given = os.environ.get(MULTIPROC_ENV)
        self.owned = not given
        self.path = Path(given) if given else Path(tempfile.mkdtemp(prefix="guardgate-metrics-"))
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("*.db"):  # values of processes that no longer exist
            stale.unlink()
        os.environ[MULTIPROC_ENV] = str(self.path)

    def mark_dead(self, pid: int | None) -> None:
        """A worker exited: its gauges stop counting (its counters stay in the totals)."""
        from prometheus_client.multiprocess import mark_process_dead

        if pid is not None:
            mark_process_dead(pid, str(self.path))

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


class Supervisor:
    def __init__(self, config_path: Path, host: str, port: int, workers: int) -> None:
        self.args = (str(config_path), host, port, os.getpid())
        self.count = workers
        self.stopping = False
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no loop or pool inherited
        self.workers: dict[int, tuple[BaseProcess, float]] = {}  # slot → (process, started at)
        self.metrics_dir: MetricsDir | None = None

    def _start(self, slot: int) -> None:
        proc = self._context.Process(target=worker_main, args=self.args, name=f"guardgate-worker-{slot}")
        proc.start()
        self.workers[slot] = (proc, time.monotonic())
        if self.stopping and proc.pid is not None:  # a signal came while it was starting
            os.kill(proc.pid, signal.SIGTERM)

    def _stop_all(self, signum: int, frame: object = None) -> None:
        self.stopping = True
        for proc, _ in self.workers.values():
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGTERM)

    def run(self) -> int:
        self.metrics_dir = MetricsDir()
        try:
            return self._run()
        finally:
            self.metrics_dir.close()

    def _run(self) -> int:
        assert self.metrics_dir is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_all)
        for slot in range(self.count):
            self._start(slot)
        log.info("workers started", extra={"fields": {
            "event": "workers_started", "workers": self.count, "pids": [p.pid for p, _ in self.workers.values()],
            "metrics_dir": str(self.metrics_dir.path)}})
        failed = False
        served = False  # some worker has run past MIN_UPTIME_S: the gateway did start
        restart_at: dict[int, float] = {}  # slot → when its next worker may start
        while self.workers or (restart_at and not self.stopping):
            if self.workers:
                multiprocessing.connection.wait([proc.sentinel for proc, _ in self.workers.values()], timeout=0.5)
            else:
                time.sleep(0.5)
            now = time.monotonic()
            served = served or any(now - started >= MIN_UPTIME_S for _, started in self.workers.values())
            for slot, (proc, started) in list(self.workers.items()):
                if proc.exitcode is None:
                    continue
                del self.workers[slot]
                proc.join()
                self.metrics_dir.mark_dead(proc.pid)
                if self.stopping:
                    # uvicorn re-raises the SIGTERM it drained on, so a clean exit is 0 or -SIGTERM.
                    failed = failed or proc.exitcode not in (0, -signal.SIGTERM)
                    continue
                log.error("worker exited", extra={"fields": {
                    "event": "worker_exit", "pid": proc.pid, "exit_code": proc.exitcode}})
                if not served and now - started < MIN_UPTIME_S:
                    failed = True
                    self._stop_all(signal.SIGTERM)  # the gateway cannot start (a port held elsewhere …)
                else:
                    # A crash, or a replacement that cannot start (a policy file broken meanwhile): the
                    # other workers go on serving; this slot is tried again, at most every MIN_UPTIME_S.
                    restart_at[slot] = started + MIN_UPTIME_S
            for slot, at in list(restart_at.items()):
                if at <= now and not self.stopping:
                    del restart_at[slot]
                    self._start(slot)
        return 1 if failed else 0
