"""The load scenarios (load_tests/run.py) against the real server and broker, shortened: each must pass its own
checks (no failed request, votes accepted = feedback events on the topic = snapshot rows; the mix while adapters are
hot-swapped under the users' requests; overload answered with load shed only, the service healthy after; fresh
servers hit at once)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

RUN = Path(__file__).resolve().parents[1] / "load_tests" / "run.py"


def _run(kafka_broker, tmp_path, scenario, *args):
    if not Path(sys.executable).with_name("locust").exists():  # not imported here: it monkey-patches the process
        pytest.skip("locust is not installed (dev extra)")
    out = tmp_path / scenario
    run = subprocess.run([sys.executable, str(RUN), scenario, "--out", str(out), "--bootstrap", kafka_broker.bootstrap,
                          *args], capture_output=True, text=True, timeout=900)
    assert (out / "report.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    return run, report, out


def test_overload_is_answered_with_retry_after_only_and_the_service_recovers(kafka_broker, tmp_path):
    run, report, _ = _run(kafka_broker, tmp_path, "overload", "--users", "10", "--seconds", "40", "--steps", "4",
                          "--think", "0-0.3")
    assert run.returncode == 0 and report["passed"], (report["checks"], report["errors"])
    assert sum(e["count"] for e in report["errors"] if e["kind"].startswith("shed: 503")) >= 1, \
        "10 users at n up to 16 must overflow a 64-image queue"
    assert all(e["kind"].startswith("shed:") for e in report["errors"]), report["errors"]
    assert report["healthy_after"]["ok"]


def test_the_mix_while_adapters_swap_fails_nothing_and_loses_no_vote(kafka_broker, tmp_path):
    run, report, out = _run(kafka_broker, tmp_path, "swap", "--users", "2", "--seconds", "40", "--steps", "2",
                            "--n-range", "4-8", "--think", "2-3", "--ctr", "1", "--promote-every-s", "6")
    assert run.returncode == 0 and report["passed"], (report["checks"], report["errors"])
    votes = report["votes"]
    assert votes["accepted"] >= 2 and votes["accepted"] == votes["feedback_events_on_topic"] == votes["feedback_rows"]
    assert report["swaps"]["promotions"] >= 4 and len(report["swaps"]["requests_by_adapter"]) >= 3, report["swaps"]
    assert {"p50_ms", "p95_ms", "p99_ms", "rps"} <= set(report["endpoints"]["/feedback"])
    assert any(name.startswith("worker") for name in report["memory"]), report["memory"]
    assert (out / "locust_stats.csv").exists()


def test_a_feedback_burst_loses_no_vote(kafka_broker, tmp_path):
    run, report, _ = _run(kafka_broker, tmp_path, "burst", "--users", "8", "--seconds", "60", "--burst-tokens", "16")
    assert run.returncode == 0 and report["passed"], (report["checks"], report["errors"])
    assert report["votes"]["accepted"] == 8 * 16 == report["votes"]["feedback_rows"]


def test_fresh_servers_hit_at_once_answer_every_request(tmp_path):
    """The shape of bench serving's one unexplained 500: fresh servers, batching off, Kafka unreachable, a learned
    head live, concurrent clients the moment /readyz answers."""
    if not Path(sys.executable).with_name("locust").exists():
        pytest.skip("locust is not installed (dev extra)")
    out = tmp_path / "cold"
    run = subprocess.run([sys.executable, str(RUN), "cold-start", "--out", str(out), "--starts", "2", "--users", "4",
                          "--steps", "2"], capture_output=True, text=True, timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert run.returncode == 0 and report["passed"], (report["checks"], report["failures"])
    assert report["succeeded"] == 2 * 4 * 3
