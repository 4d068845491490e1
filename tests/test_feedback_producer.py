"""The producer without a broker: emit never blocks or fails, the spool takes everything, in order, bounded."""

import logging
import time

import pytest
from prometheus_client import REGISTRY

from alignloop.events import FeedbackEvent
from alignloop.feedback import broker
from alignloop.feedback.config import ProducerConfig
from alignloop.feedback.producer import EventProducer, MemorySink
from alignloop.feedback.spool import Spool


def vote(i: int) -> FeedbackEvent:
    return FeedbackEvent(request_id=f"req-{i}", image_id=f"img-{i % 7}", vote="up" if i % 2 else "down", arm="A",
                         adapter_version="base", image_uri=f"file:///images/img-{i % 7}.png")


def metric(name: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("alignloop_feedback_events_total", {"producer": name, "outcome": outcome}) or 0


def wait_for(condition, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_memory_sink_keeps_events_in_order_and_checks_types():
    sink = MemorySink()
    sink.emit(vote(1))
    sink.emit(vote(2))
    assert [e.request_id for e in sink.events] == ["req-1", "req-2"] and sink.flush()
    with pytest.raises(TypeError, match="GenerationEvent or FeedbackEvent"):
        sink.emit({"vote": "up"})


def test_unreachable_broker_spools_everything_in_order_without_blocking(tmp_path):
    nobody = f"127.0.0.1:{broker.free_port()}"
    producer = EventProducer(nobody, spool_dir=tmp_path / "spool-unreachable")
    events = [vote(i) for i in range(500)]
    slowest = 0.0
    for event in events:
        t0 = time.perf_counter()
        producer.emit(event)
        slowest = max(slowest, time.perf_counter() - t0)
    wait_for(lambda: producer.spool_depth == 500)
    assert not producer.connected
    assert producer.flush(0.2) is False  # nothing acknowledged, nothing lost
    with pytest.raises(TypeError):
        producer.emit("not an event")
    producer.close()
    assert slowest < 0.25, f"emit blocked the caller for {slowest * 1000:.0f} ms"
    spool = Spool(tmp_path / "spool-unreachable", max_bytes=10**9, segment_bytes=10**9)
    replay, _ = spool.read(1000)
    assert [r.value for r in replay] == [e.to_json() for e in events]
    assert {r.topic for r in replay} == {"alignloop.feedback"}
    assert [r.key for r in replay] == [e.image_id for e in events]


def test_full_spool_drops_counts_and_logs(tmp_path, caplog):
    nobody = f"127.0.0.1:{broker.free_port()}"
    config = ProducerConfig(max_spool_bytes=20_000)
    producer = EventProducer(nobody, spool_dir=tmp_path / "spool-small", config=config)
    with caplog.at_level(logging.ERROR, logger="alignloop.feedback.producer"):
        for i in range(200):
            producer.emit(vote(i))
        wait_for(lambda: metric("spool-small", "spooled") + metric("spool-small", "dropped_spool_full") == 200)
    spooled, dropped = metric("spool-small", "spooled"), metric("spool-small", "dropped_spool_full")
    assert spooled == producer.spool_depth > 0 and dropped > 0
    assert REGISTRY.get_sample_value("alignloop_feedback_spool_full", {"producer": "spool-small"}) == 1
    assert "spool" in caplog.text and "is full" in caplog.text
    producer.close()
    with pytest.raises(RuntimeError, match="after close"):
        producer.emit(vote(0))
