"""A real `pdserve serve` in a subprocess, on free loopback ports, for end-to-end tests."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


# Below the kernel's ephemeral range (32768-60999 by default) and above Ray's worker ports (10002-19999):
# the ports Ray's processes and the replicas' own servers take while a server starts (they bind port 0)
# are never these, so a port found free here is still free when the routers bind it.
SERVER_PORTS = range(20000, 32768)
_PICK = random.SystemRandom()  # whatever a test seeds the module with


def free_port() -> int:
    """A port nothing listens on, outside the ranges processes are handed when they bind port 0."""
    for _ in range(100):
        port = _PICK.choice(SERVER_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {SERVER_PORTS}")


class PortTaken(RuntimeError):
    """The server exited because a port it was given was in use by then."""


class Server:
    def __init__(self, *args: str, startup_timeout_s: float = 240.0, env: dict[str, str] | None = None,
                 api_key: str | None = None):
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        args = (*args, "--api-key", api_key) if api_key else args
        for attempt in range(3):
            try:
                self._start(args, env, startup_timeout_s)
                return
            except PortTaken:
                continue  # a free port was taken between our check and the bind (Ray's own ports, say)
        raise RuntimeError(f"pdserve serve could not bind its ports three times:\n{self.log_tail()}")

    def _start(self, args: tuple[str, ...], env: dict[str, str] | None, startup_timeout_s: float) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(os.environ.get("PDSERVE_TEST_LOGS", "/tmp")) / f"pdserve-e2e-{self.http_port}.log"
        command = [sys.executable, "-m", "pdserve.cluster.cli", "serve", "--http-port", str(self.http_port),
                   "--grpc-port", str(self.grpc_port), *args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
        self._wait_ready(startup_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                self._log.close()
                tail = self.log_tail()
                if "Address already in use" in tail or "Failed to bind" in tail:
                    raise PortTaken(tail)
                raise RuntimeError(f"pdserve serve exited with {self.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"pdserve serve not healthy after {timeout_s} s:\n{self.log_tail()}")

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/pdserve/status", headers=self.headers, timeout=10).json()

    def wait_all_blocks_free(self, replicas: int = 1, timeout_s: float = 15.0) -> dict:
        """Until at least `replicas` decode replicas report and every one reports 0 KV blocks used
        (reports lag by up to a second; on a loaded CI machine a replica's report can go stale for a while)."""
        end = time.monotonic() + timeout_s
        while True:
            decode = self.status()["pools"].get("decode", {})
            if (len(decode) >= replicas and all(r["num_blocks_used"] == 0 for r in decode.values())
                    or time.monotonic() > end):
                return decode
            time.sleep(0.5)

    def log_tail(self, lines: int = 60) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
