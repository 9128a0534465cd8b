"""`pdserve serve` started in the background (SIGINT ignored, as a shell's `&` leaves it) and
interrupted while it deploys: it takes down what it started and exits."""
import os
import signal
import subprocess
import sys
import time

import pytest

from server import free_port

pytestmark = pytest.mark.e2e


def wait_for_line(path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, path.read_text(errors="replace")[-2000:]
        assert time.monotonic() < end, f"no {text!r} after {timeout_s} s"
        time.sleep(0.2)


def test_sigint_while_deploying_stops_the_server_and_its_ray_cluster(tmp_path):
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "pdserve.cluster.cli", "serve", "--http-port", str(free_port()),
               "--grpc-port", str(free_port())]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for_line(log, "Started a local Ray instance", process, timeout_s=120)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0, log.read_text(errors="replace")[-3000:]
        assert "interrupted while deploying; shutting down" in log.read_text(errors="replace")
        deadline = time.monotonic() + 30
        while True:  # the Ray processes it started are in its session: all gone
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "processes of the server's session still run"
            time.sleep(0.5)
    finally:
        try:  # whatever of its session is left
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
