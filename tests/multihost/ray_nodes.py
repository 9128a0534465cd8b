"""A Ray cluster across test hosts, and `pdserve serve` joining it, each a process we own by pid.

    cluster = RayCluster(net, logs)
    cluster.start_node("a", {"pnode": 2}, head=True)     # `ray start --head --block` on host a
    cluster.start_node("b", {"dnode": 1})                # a worker node on host b
    cluster.kill_node("b"); cluster.rejoin("b")          # host b dies, and comes back
    server = PdserveOnHost(cluster, "a", model_dir, config_yaml)   # `pdserve serve --address HEAD`
    server.stop(); cluster.stop()                        # each process ended by its pid

Every process gets the cluster's own token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), so
nothing reads or writes ~/.ray, and node failures are detected within seconds.
"""
from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from netns import Host, Network

GCS_PORT = 6379
HTTP_PORT, GRPC_PORT = 8000, 9000
# A node is dead after about HEALTH_PERIOD_MS * HEALTH_FAILURES of silence: short enough that
# a killed host is noticed quickly, long enough that a partition of a few seconds is survived.
HEALTH_PERIOD_MS, HEALTH_FAILURES = 1000, 10


class NodeStartFailed(RuntimeError):
    """`ray start` exited, or its node did not run in time."""


class RayCluster:
    def __init__(self, net: Network, logs: Path):
        self.net, self.logs = net, logs
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_health_check_period_ms": str(HEALTH_PERIOD_MS),
            "RAY_health_check_timeout_ms": str(HEALTH_PERIOD_MS),
            "RAY_health_check_failure_threshold": str(HEALTH_FAILURES),
            # the raylet waits this long for its agents to start (slow on a loaded machine)
            "RAY_agent_register_timeout_ms": "120000",
        }
        self.nodes: dict[str, subprocess.Popen] = {}
        self.resources: dict[str, dict[str, float]] = {}
        self.head: Host | None = None

    @property
    def address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    def start_node(self, name: str, resources: dict[str, float], head: bool = False, attempts: int = 3) -> None:
        """`ray start --block` on host `name`; returns once the node runs.

        `ray start` gives a node's processes 30 s to register, which a loaded 2-core
        machine can miss: then the host is cleared and the start tried again.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_node(name, resources, head)
            except NodeStartFailed:
                self.net.kill_everything_on(name)
                self.nodes.pop(name).wait(timeout=10)
                if attempt == attempts:
                    raise

    def rejoin(self, name: str) -> None:
        """A worker node on host `name` again, offering what the last one did."""
        self.start_node(name, self.resources[name])

    def _start_node(self, name: str, resources: dict[str, float], head: bool, timeout_s: float = 120) -> None:
        host = self.net.hosts[name]
        self.resources[name] = resources
        temp_dir = Path(f"/tmp/{host.namespace}-ray")  # short: Ray's socket paths must fit 107 bytes
        role = ["--head", "--port", str(GCS_PORT), "--include-dashboard=false"] if head else ["--address", self.address]
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", *role,
                   "--node-ip-address", host.address, "--resources", json.dumps(resources), "--num-cpus", "1",
                   "--object-store-memory", str(80 * 2**20), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
        log_path = self.logs / f"ray-{name}-{len(self.nodes)}.log"
        with open(log_path, "w") as log:
            process = host.popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if head:
            self.head = host
        self.nodes[name] = process
        _wait_for_line(log_path, "Ray runtime started", process, timeout_s)

    def kill_node(self, name: str) -> None:
        """Host `name` dies: every process on it, SIGKILL, no goodbye."""
        self.net.kill_everything_on(name)
        self.nodes.pop(name).wait(timeout=10)

    def stop(self) -> None:
        for name in list(self.nodes):
            self.net.kill_everything_on(name, grace_s=5.0)
            self.nodes.pop(name).wait(timeout=10)
        for host in self.net.hosts.values():
            shutil.rmtree(f"/tmp/{host.namespace}-ray", ignore_errors=True)


class PdserveOnHost:
    """`pdserve serve --address` on one host of the cluster, reached from this machine over the switch."""

    def __init__(self, cluster: RayCluster, name: str, model_dir: Path, config: str, startup_timeout_s: float = 300):
        self.host = cluster.net.hosts[name]
        self.url = f"http://{self.host.address}:{HTTP_PORT}"
        self.grpc_address = f"{self.host.address}:{GRPC_PORT}"
        config_path = cluster.logs / f"pdserve-{name}-{time.monotonic_ns()}.yaml"
        config_path.write_text(config)
        self.log_path = config_path.with_suffix(".log")
        command = [sys.executable, "-m", "pdserve.cluster.cli", "serve", "--address", cluster.address,
                   "--model", str(model_dir), "--config", str(config_path), "--http-host", "0.0.0.0",
                   "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)]
        with open(self.log_path, "w") as log:
            self.process = self.host.popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_healthy(startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        """Until this deployment runs (pdserve says so: an application an earlier module left on the
        cluster may answer /health meanwhile, and stop answering while Serve replaces it) and is healthy."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"pdserve serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if "pdserve: serving" not in self.log_path.read_text(errors="replace"):
                time.sleep(1)
                continue
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"pdserve serve not healthy after {timeout_s} s:\n{self.log_tail()}")

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/pdserve/status", timeout=10).json()

    def pool(self, name: str) -> dict[str, dict]:
        return self.status()["pools"].get(name, {})

    def wait_pool(self, name: str, size: int, timeout_s: float) -> dict[str, dict]:
        """The pool's replicas, once `size` of them report."""
        end = time.monotonic() + timeout_s
        while len(replicas := self.pool(name)) != size:
            assert time.monotonic() < end, f"{name} pool not at {size} replicas after {timeout_s} s: {replicas}"
            time.sleep(1)
        return replicas

    def wait_all_blocks_free(self, timeout_s: float = 20.0) -> dict[str, dict]:
        """The decode replicas, once all report 0 KV blocks used (reports lag by up to a second)."""
        end = time.monotonic() + timeout_s
        while True:
            decode = self.pool("decode")
            if decode and all(r["num_blocks_used"] == 0 for r in decode.values()) or time.monotonic() > end:
                return decode
            time.sleep(0.5)

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGINT (pdserve shuts Serve down), then SIGKILL after a minute; by pid."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def host_of(net: Network, pid: int) -> str:
    """Which test host a process runs on (the name of the host whose namespace holds it)."""
    return next((name for name, host in net.hosts.items() if pid in host.pids()), "")


def _wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    tail = "\n".join(path.read_text(errors="replace").splitlines()[-40:])
    raise NodeStartFailed(f"{path.name}: no {text!r} after {timeout_s} s (exit {process.poll()}):\n{tail}")
