"""`alignloop serve` in a subprocess on loopback: the one launcher of the tests' servers, the benchmarks' and the
load tests'.

    server = start_server(home, {"ALIGNLOOP_SERVE_KAFKA_BOOTSTRAP": bootstrap})   # returns once /readyz is 200
    server.url, server.log_path, server.pids()
    server.stop()

The server runs in its own session (process group), so stopping it stops the BentoML arbiter and its workers and
nothing else. Its output goes to `<home>/serve.log`; `keep_log(dest)` copies it out of a temporary home (a failed
benchmark's evidence must outlive its temporary folder).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Every client of a local server is 127.0.0.1, one identity to the rate limiter: tests and benchmarks measure without
# limits unless they set them (the load tests give each simulated user its own identity instead).
NO_RATE_LIMITS = {"ALIGNLOOP_SERVE_GENERATE_PER_MIN": "0", "ALIGNLOOP_SERVE_FEEDBACK_PER_MIN": "0"}


class ServerError(RuntimeError):
    """The server exited or never became ready; the message ends with its log's tail."""


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict:
        """{pid: role} of the arbiter and every process under it (BentoML's workers), for memory sampling."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return {root.pid: "serve", **{child.pid: "worker" for child in root.children(recursive=True)}}
        except psutil.NoSuchProcess:
            return {}

    def keep_log(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.log_path, dest)
        return dest

    def stop(self, timeout_s: float = 30) -> None:
        stop_process_group(self.process, timeout_s)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(home: Path, env: dict, port: int | None = None, timeout_s: float = 600) -> LocalServer:
    """`alignloop serve --port PORT` with ALIGNLOOP_HOME=home and `env` over this process's environment."""
    import requests

    from alignloop.feedback import broker

    home.mkdir(parents=True, exist_ok=True)
    port = port or broker.free_port()
    full_env = {**os.environ, "ALIGNLOOP_HOME": str(home), "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "True",
                **env}
    log_path = home / "serve.log"
    with open(log_path, "wb") as log:  # the child holds its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "alignloop", "serve", "--port", str(port)], env=full_env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerError(f"alignloop serve exited with {process.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if requests.get(server.url + "/readyz", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerError(f"alignloop serve not ready after {timeout_s:.0f} s:\n{server.log_text()[-4000:]}")
        time.sleep(1)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the server's session (graceful: workers flush their Kafka producers), SIGKILL after timeout_s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
