"""A three-master Redis Cluster on loopback, started by the tests (SPEC §5).

``RedisClusterNodes.start`` runs ``redis-server --cluster-enabled yes`` on three
free loopback ports (each ≤ 55535: the cluster bus listens on port + 10000) in a
temporary directory and joins them with ``redis-cli --cluster create``; ``stop``
kills them and removes the directory. ``restart`` kills one master outright and
starts it again on its port with its ``nodes.conf`` (its slots come back; its
data does not: nothing is persisted, as after a crash without AOF).

Where ``redis-server`` or ``redis-cli`` is missing the cluster tests skip with
that reason — except under ``CI=true``, where they fail (``.ci/run`` installs
both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_sync
from redis.crc import key_slot

MASTERS = 3
PORT_MAX = 55535  # the bus port (port + 10000) must fit too
PORT_MIN = 20000
READY_TIMEOUT_S = 30.0
NODE_TIMEOUT_MS = 2000
# every test parametrized with this runs on a single Redis and on the cluster
single_and_cluster = pytest.mark.parametrize("redis_topology", ["single", "cluster"])


def missing_binaries() -> str | None:
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    return f"{' and '.join(missing)} not found on PATH" if missing else None


def skip_or_fail(reason: str) -> None:
    """Skip a cluster test for ``reason``; under CI=true a missing cluster fails."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Redis Cluster tests cannot run under CI=true: {reason}")
    pytest.skip(f"Redis Cluster tests need a local cluster: {reason}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """``count`` ports ≤ PORT_MAX whose bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            candidate = probe.getsockname()[1]
        if not PORT_MIN <= candidate <= PORT_MAX:
            candidate = PORT_MIN + (candidate % (PORT_MAX - PORT_MIN))
        if candidate in ports or not (_bindable(candidate) and _bindable(candidate + 10000)):
            continue
        ports.append(candidate)
    return ports


@dataclass
class RedisClusterNodes:
    directory: Path
    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Any node will do (SPEC §5): name the second, not the first, on purpose."""
        return f"redis://127.0.0.1:{self.ports[1]}/0"

    @classmethod
    def start(cls) -> RedisClusterNodes:
        directory = Path(tempfile.mkdtemp(prefix="dpp-redis-cluster-"))
        nodes = cls(directory, free_cluster_ports(MASTERS))
        try:
            for port in nodes.ports:
                nodes._spawn(port)
            for port in nodes.ports:
                nodes._wait_answers(port)
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *[f"127.0.0.1:{port}" for port in nodes.ports],
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=READY_TIMEOUT_S,
            )
            nodes.wait_ok()
        except BaseException:
            nodes.stop()
            raise
        return nodes

    def _spawn(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(exist_ok=True)
        log = (node_dir / "redis.log").open("ab")
        self.processes[port] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--dir",
                str(node_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=node_dir,
        )
        log.close()

    def _wait_answers(self, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis_sync.RedisError as error:
                    process = self.processes[port]
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = (self.directory / str(port) / "redis.log").read_text()[-2000:]
                        raise RuntimeError(
                            f"redis-server on {port} did not start: {log}"
                        ) from error
                    time.sleep(0.05)
        finally:
            client.close()

    def wait_ok(self) -> None:
        """Until every node says ``cluster_state:ok`` and agrees on three masters."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            states = []
            for port in self.ports:
                client = redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                try:
                    info = client.cluster("info")
                    states.append(
                        info.get("cluster_state") == "ok"
                        and int(info.get("cluster_size", 0)) == MASTERS
                    )
                except redis_sync.RedisError:
                    states.append(False)
                finally:
                    client.close()
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster not ok after {READY_TIMEOUT_S}s: {states}")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start a killed master again on its port with its nodes.conf."""
        self._spawn(port)
        self._wait_answers(port)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def port_of_slot(self, slot: int) -> int:
        client = redis_sync.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=2)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise LookupError(slot)


def tenant_slot(tenant_id: str) -> int:
    """The hash slot of every key of this tenant (its id is the hash tag)."""
    return key_slot(tenant_id.encode())


def slot_third(tenant_id: str) -> int:
    """Which third of the slot space the tenant falls in (0, 1, 2): with three
    masters made by ``redis-cli --cluster create``, which master serves it."""
    slot = tenant_slot(tenant_id)
    return 0 if slot <= 5460 else 1 if slot <= 10922 else 2
