"""Highly available Redis for tests, from `redis-server` on free loopback ports: a Sentinel set-up (a master,
a replica and one Sentinel with quorum 1, so it can fail over alone) and a three-master Cluster.

Every data node requires PASSWORD. Skips without the binaries; REQUIRE_REDIS=1 turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.redis_server import PASSWORD, free_port

SERVICE = "mymaster"


def binaries(*names: str) -> list[str]:
    found = [shutil.which(n) for n in names]
    missing = [n for n, f in zip(names, found) if f is None]
    if missing:
        reason = f"no {', '.join(missing)} binary"
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    return [f for f in found if f is not None]


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cluster_port() -> int:
    """A free port whose cluster bus port (always port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


class Node:
    """One redis-server process (a data node or a Sentinel) in a folder of its own."""

    def __init__(self, binary: str, workdir: Path, args: list[str], *, sentinel: bool = False,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = workdir / f"node-{self.port}"
        self.dir.mkdir(parents=True)
        self.log = self.dir / "redis.log"
        common = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--logfile", str(self.log)]
        if sentinel:  # a Sentinel rewrites its config file, so it needs one of its own
            conf = self.dir / "sentinel.conf"
            conf.write_text("\n".join(args) + "\n")
            self.cmd = [binary, str(conf), "--sentinel", *common]
        else:
            self.cmd = [binary, *common, "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
                        "--masterauth", PASSWORD, *args]
        self.sentinel = sentinel
        self.proc: subprocess.Popen | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=None if self.sentinel else PASSWORD, socket_timeout=5)

    def start(self) -> Node:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.client().ping(), f"redis on port {self.port}", 10)
        except AssertionError as e:
            self.stop()
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{self.cmd} did not start:\n{tail}") from e
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # as a crash would: no goodbye to replicas or Sentinels
            self.proc.wait(5)
        self.proc = None


class SentinelSetup:
    """master ← replica, watched by one Sentinel that declares the master down after 1 s of silence."""

    def __init__(self, workdir: Path) -> None:
        server, = binaries("redis-server")
        self.master = Node(server, workdir, []).start()
        self.replica = Node(server, workdir, ["--replicaof", "127.0.0.1", str(self.master.port)]).start()
        self.sentinel = Node(server, workdir, [
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1",
            f"sentinel auth-pass {SERVICE} {PASSWORD}",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 5000",
        ], sentinel=True)
        try:
            self.sentinel.start()
            wait_for(lambda: self.master.client().info("replication")["connected_slaves"] == 1, "the replica")
            wait_for(lambda: self.sentinel.client().sentinel_slaves(SERVICE), "the Sentinel to see the replica")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis+sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel.port}/{SERVICE}/0"

    def master_port(self) -> int:
        return int(self.sentinel.client().sentinel_get_master_addr_by_name(SERVICE)[1])

    def stop(self) -> None:
        for node in (self.sentinel, self.replica, self.master):
            node.stop()


class ClusterSetup:
    """Three masters sharing the 16384 slots, no replicas, made with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path) -> None:
        server, cli = binaries("redis-server", "redis-cli")
        self.nodes = [Node(server, workdir, ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                             "--cluster-node-timeout", "2000"], port=cluster_port()) for _ in range(3)]
        try:
            for node in self.nodes:
                node.start()
            subprocess.run([cli, "-a", PASSWORD, "--no-auth-warning", "--cluster", "create",
                            *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            for node in self.nodes:
                wait_for(lambda node=node: node.client().cluster("info")["cluster_state"] == "ok",
                         f"cluster_state:ok on port {node.port}")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis+cluster://:{PASSWORD}@" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
