"""The serving benchmarks keep a failed side's server log (no server started: `BenchServer` around an exited process)."""

import subprocess
import sys

import pytest

from alignloop.serving.bench import BenchServer
from alignloop.serving.local import LocalServer


def _stopped_server(tmp_path, name):
    server = BenchServer(tmp_path / "tmp-side", batching=False, steps=2, head_path=tmp_path / "head", name=name)
    server.home.mkdir()
    (server.home / "serve.log").write_text("Traceback (most recent call last):\n  generate failed\n")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    server.server = LocalServer("http://127.0.0.1:1", process, server.home / "serve.log")
    return server


def test_keep_log_copies_it_out_of_the_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    server = _stopped_server(tmp_path, "serving-batching_off")
    server.__exit__(None, None, None)
    assert server.kept_log is None  # a clean side keeps nothing
    path = server.keep_log()
    assert path.startswith(str(tmp_path / "home" / "bench" / "logs" / "serving-batching_off-"))
    assert path.endswith("Z.log") and "generate failed" in open(path).read()
    assert server.keep_log() == path  # once
    assert path in capsys.readouterr().err


def test_an_exception_inside_the_with_block_keeps_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    server = _stopped_server(tmp_path, "serving-batching_on")
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("500 Server Error")
        except RuntimeError as err:
            server.__exit__(type(err), err, err.__traceback__)
            raise
    assert server.kept_log and "generate failed" in open(server.kept_log).read()
