"""`alignloop bench feedback` runs end to end and prints one JSON object with the agreed figures (not timed)."""

import json

from alignloop.cli import main


def test_bench_feedback_prints_one_json_object(kafka_broker, capsys):
    assert main(["bench", "feedback", "--quick", "--json", "--events", "300", "--bootstrap",
                 kafka_broker.bootstrap]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["platform"]
    assert result["settings"]["acks"] == "all" and result["settings"]["events"] == 300
    for name in ("ours", "bare"):
        figures = result[name]
        assert figures["acked"] == 300 and figures["events_per_s"] > 0
        assert 0 < figures["produce_latency_ms"]["p50"] <= figures["produce_latency_ms"]["p99"]
    assert result["ratio"] == round(result["ours"]["events_per_s"] / result["bare"]["events_per_s"], 3)
