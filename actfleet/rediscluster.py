"""A Redis Cluster of N masters on loopback, for ``bench scale --cluster`` and the tests:
cluster-enabled ``redis-server`` processes on free ports, joined with ``redis-cli --cluster
create`` (every slot assigned, no replicas), no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import redis

from actfleet.stack import StackError, free_port, wait_until


def node_port() -> int:
    """A free port whose cluster bus port (10,000 above it, where nodes talk to each other)
    is free too and exists."""
    while True:
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


class LocalCluster:
    """``masters`` cluster-enabled redis-servers under ``root``; ``url`` is the
    ``redis+cluster://`` URL actfleet takes. ``stop()`` kills them."""

    def __init__(self, root: Path, masters: int = 3) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        for exe in ("redis-server", "redis-cli"):
            if shutil.which(exe) is None:
                raise StackError(f"{exe} is not installed (apt-get install redis-server)")
        self.ports = [node_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._start(root)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def _start(self, root: Path) -> None:
        for port in self.ports:
            data = root / str(port)
            data.mkdir(parents=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                        *("--cluster-enabled", "yes"),
                        *("--cluster-config-file", str(data / "nodes.conf")),
                        *("--dir", str(data), "--save", "", "--appendonly", "no"),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_until(self.node(port).ping, 30, "a cluster node", proc)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self._ok, 30, "the cluster")

    @staticmethod
    def node(port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port)

    def _ok(self) -> bool:
        return all(self.node(p).cluster("info")["cluster_state"] == "ok" for p in self.ports)

    def keys_per_master(self) -> list[int]:
        return [int(self.node(p).dbsize()) for p in self.ports]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
