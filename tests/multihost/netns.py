"""Hosts on one machine: network namespaces on one switch, for multi-host tests.

Each host is a network namespace with one veth port on a bridge that lives in
a switch namespace of its own; the machine running the tests joins the switch
too (one address, on an interface of ours), so it can reach every host as a
client would. Everything is named `pdsv<pid>-…`, so two runs never touch each
other's hosts, and nothing routes anywhere but this subnet.

    net = Network.create(["a", "b"])
    server = net.hosts["a"].popen(["python", "-m", "http.server"])   # a process on host a
    net.partition("b"); net.heal("b")       # host b's port on the switch down / up
    net.slow_down("b", rate_bit_s=2e6); net.restore("b")
    net.kill_everything_on("b")             # every process in b's namespace, by pid
    net.close()                             # all processes killed by pid, namespaces deleted

Needs root and iproute2 (`ip`, `tc`); `Network.unavailable()` says why not.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "pdsv"
_PREFIX_LEN = 25  # a /25 per run: hosts from .1, the test machine's own port at .126


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def _tc(namespace: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = ["tc", *(["-n", namespace] if namespace else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def _subnet(run_id: int) -> str:
    """A 10.x.y.0/25 of this run's own (x in 100..249, so well clear of common 10.0/10.1 nets)."""
    return f"10.{100 + (run_id >> 8) % 150}.{run_id & 0xFF}"


@dataclass
class Host:
    """One host: a network namespace, its address on the switch, and its port there."""

    name: str
    namespace: str
    address: str
    interface: str  # inside the namespace
    switch_port: str  # the peer end, on the switch's bridge

    def popen(self, command: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start `command` on this host (its own session, so signals reach only what we send)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace, *command],
                                env={**os.environ, **(env or {})}, start_new_session=True, **kwargs)

    def run(self, command: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespace, *command], capture_output=True,
                              text=True, timeout=timeout_s)

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


@dataclass
class Network:
    run_id: int
    switch: str  # the switch's namespace
    hosts: dict[str, Host] = field(default_factory=dict)
    client_address: str = ""
    client_interface: str = ""

    @staticmethod
    def unavailable() -> str:
        """Why hosts cannot be made here ('' when they can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return f"`{tool}` (iproute2) is not installed"
        probe = f"{PREFIX}{os.getpid()}-probe"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        _ip("netns", "del", probe, check=False)
        return ""

    @classmethod
    def create(cls, names: list[str]) -> Network:
        run_id = os.getpid() % 100_000
        net = cls(run_id, f"{PREFIX}{run_id}-sw")
        try:
            net._build(names)
        except BaseException:
            net.close()
            raise
        return net

    def _build(self, names: list[str]) -> None:
        subnet, tag = _subnet(self.run_id), f"{PREFIX}{self.run_id}"
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        _ip("link", "set", "br0", "up", namespace=self.switch)
        for number, name in enumerate(names, start=1):
            host = Host(name, f"{tag}-{name}", f"{subnet}.{number}", f"{tag}-{name}0", f"{tag}-{name}")
            _ip("netns", "add", host.namespace)
            self.hosts[name] = host
            self._plug(host.switch_port, host.interface, host.namespace, f"{host.address}/{_PREFIX_LEN}")
        # The test machine's own port: an interface of ours in the root namespace, on our subnet only.
        self.client_interface, self.client_address = f"{tag}-c0", f"{subnet}.126"
        self._plug(f"{tag}-c", self.client_interface, None, f"{self.client_address}/{_PREFIX_LEN}")

    def _plug(self, switch_port: str, interface: str, namespace: str | None, cidr: str) -> None:
        """A veth from the bridge to `interface` in `namespace` (None: this machine), with `cidr` on it."""
        _ip("link", "add", switch_port, "type", "veth", "peer", "name", interface)
        if namespace is not None:
            _ip("link", "set", interface, "netns", namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
        _ip("link", "set", switch_port, "netns", self.switch)
        _ip("link", "set", switch_port, "master", "br0", namespace=self.switch)
        _ip("link", "set", switch_port, "up", namespace=self.switch)
        _ip("addr", "add", cidr, "dev", interface, namespace=namespace)
        _ip("link", "set", interface, "up", namespace=namespace)

    # -- faults --------------------------------------------------------------------

    def partition(self, name: str) -> None:
        """Cut host `name` off the switch: its packets are dropped, its connections stay open."""
        _ip("link", "set", self.hosts[name].switch_port, "down", namespace=self.switch)

    def heal(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].switch_port, "up", namespace=self.switch)

    def slow_down(self, name: str, rate_bit_s: float, delay_ms: float = 20.0) -> str:
        """Shape host `name`'s link both ways; returns what was applied.

        netem (delay and rate) where the kernel has it, else a token bucket (rate only).
        """
        host = self.hosts[name]
        ends = ((host.namespace, host.interface), (self.switch, host.switch_port))
        rate = f"{int(rate_bit_s)}bit"
        netem = ("netem", "delay", f"{delay_ms:g}ms", "rate", rate)
        tbf = ("tbf", "rate", rate, "burst", "4kb", "latency", "2s")
        if _tc(ends[0][0], "qdisc", "replace", "dev", ends[0][1], "root", *netem, check=False).returncode == 0:
            shape = netem
        else:
            shape = tbf
        for namespace, device in ends:
            _tc(namespace, "qdisc", "replace", "dev", device, "root", *shape)
        return " ".join(shape)

    def restore(self, name: str) -> None:
        host = self.hosts[name]
        for namespace, device in ((host.namespace, host.interface), (self.switch, host.switch_port)):
            _tc(namespace, "qdisc", "del", "dev", device, "root", check=False)

    def kill_everything_on(self, name: str, grace_s: float = 0.0) -> None:
        """End every process on host `name`, by pid: SIGTERM and `grace_s` to go, then SIGKILL."""
        host = self.hosts[name]
        if grace_s > 0:
            _signal_all(host.pids(), signal.SIGTERM)
            end = time.monotonic() + grace_s
            while host.pids() and time.monotonic() < end:
                time.sleep(0.2)
        for _ in range(20):  # a dying parent may still spawn; sweep until the namespace is empty
            pids = host.pids()
            if not pids:
                return
            _signal_all(pids, signal.SIGKILL)
            time.sleep(0.2)

    def close(self) -> None:
        """Every process on every host killed by pid, then the namespaces (and their veths) deleted."""
        for name in self.hosts:
            self.kill_everything_on(name, grace_s=5.0)
        for host in self.hosts.values():
            _ip("netns", "del", host.namespace, check=False)
        if self.client_interface:
            _ip("link", "del", self.client_interface, check=False)
        _ip("netns", "del", self.switch, check=False)


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
