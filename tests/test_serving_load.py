"""The locust scenario (load_tests/locustfile.py) against the real server: simulated users generate and vote
for a bounded time; no request may fail (repeated votes must come back as duplicates)."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

LOCUSTFILE = Path(__file__).resolve().parents[1] / "load_tests" / "locustfile.py"


def test_simulated_users_generate_and_vote(served, tmp_path):
    if shutil.which("locust") is None and not Path(sys.executable).with_name("locust").exists():
        pytest.skip("locust is not installed (dev extra)")
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    run = subprocess.run(
        [locust, "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "25s", "--stop-timeout", "120",
         "--host", served.url, "--only-summary", "--csv", str(tmp_path / "load"), "--exit-code-on-error", "1"],
        capture_output=True, text=True, timeout=400,
        env={"ALIGNLOOP_LOAD_N": "4", "ALIGNLOOP_LOAD_K": "2", "ALIGNLOOP_LOAD_STEPS": "2",
             "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "load_stats.csv"))}
    assert int(rows["/generate"]["Request Count"]) >= 1
    assert int(rows["/feedback"]["Request Count"]) >= 2
    assert int(rows["Aggregated"]["Failure Count"]) == 0
