"""Fault drills on the real broker: broker outage, producer crash while spooling, snapshot consumer crash."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict

import pyarrow.parquet as pq
from kafka_fixtures import read_topic, sample_generation, sample_vote

from alignloop.events import FeedbackEvent, parse_event
from alignloop.feedback import broker
from alignloop.feedback.config import ProducerConfig
from alignloop.feedback.image_store import ImageStore
from alignloop.feedback.producer import EventProducer
from alignloop.feedback.snapshot import SnapshotWriter, versions

FAST_FAILOVER = ProducerConfig(spool_after_s=1.0, reconnect_interval_s=0.5)


def vote(i: int) -> FeedbackEvent:
    # 20 images, 50 votes each: per-key order is checked over many keys and partitions.
    return FeedbackEvent(request_id=f"req-{i}", image_id=f"img-{i % 20}", vote="up" if i % 3 else "down", arm="B",
                         adapter_version="v1", image_uri=f"file:///images/img-{i % 20}.png")


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def deduped_by_key(records) -> tuple[set, dict]:
    """First copy of each event_id, in log order per partition; the emit index of each key's events."""
    seen, per_key = set(), defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        event = parse_event(record.value)
        if event.event_id not in seen:
            seen.add(event.event_id)
            per_key[record.key.decode()].append(int(event.request_id.split("-")[1]))
    return seen, per_key


def test_outage_drill_all_votes_arrive_once_in_order(kafka_broker, kafka_topics, tmp_path):
    producer = EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool-outage", config=FAST_FAILOVER,
                             topics=kafka_topics)
    assert producer.wait_connected(60)
    votes = [vote(i) for i in range(1000)]
    slowest = 0.0
    kafka_broker.stop()
    try:
        # 1. The broker is down: 1,000 votes, none fails or blocks the caller.
        for event in votes:
            t0 = time.perf_counter()
            producer.emit(event)
            slowest = max(slowest, time.perf_counter() - t0)
        wait_for(lambda: producer.spool_depth == 1000, 30, "all votes in the spool")
        assert not producer.connected
        assert list((tmp_path / "spool-outage").glob("*.seg")), "the spool is on disk"
    finally:
        kafka_broker.start()
    # 2. The broker is back: the spool drains by itself.
    assert producer.flush(120), f"{producer.pending} events still pending after the broker returned"
    assert producer.wait_connected(10) and producer.spool_depth == 0
    producer.close()
    assert slowest < 0.25, f"emit blocked the caller for {slowest * 1000:.0f} ms during the outage"
    # 3. All 1,000 arrive, each once after dedupe, in emit order per key.
    seen, per_key = deduped_by_key(read_topic(kafka_broker.bootstrap, kafka_topics.feedback))
    assert seen == {event.event_id for event in votes}
    assert len(per_key) == 20 and all(order == sorted(order) for order in per_key.values())


def test_producer_killed_while_spooling_replays_on_restart(kafka_broker, kafka_topics, tmp_path):
    spool = tmp_path / "spool-crash"
    # 1. A producer process that cannot reach Kafka spools 300 votes, reports, and is SIGKILLed.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_kafka_drills import vote
        from alignloop.feedback.config import Topics
        from alignloop.feedback.producer import EventProducer
        producer = EventProducer("127.0.0.1:{broker.free_port()}", spool_dir={str(spool)!r},
                                 topics=Topics({kafka_topics.generations!r}, {kafka_topics.feedback!r}))
        for i in range(300):
            producer.emit(vote(i))
        while producer.spool_depth < 300:
            time.sleep(0.01)
        print("spooled", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spooled"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # 2. The next producer on that spool replays it before anything new.
    producer = EventProducer(kafka_broker.bootstrap, spool_dir=spool, topics=kafka_topics)
    assert producer.spool_depth == 300
    producer.emit(vote(300))
    assert producer.flush(60)
    producer.close()
    seen, per_key = deduped_by_key(read_topic(kafka_broker.bootstrap, kafka_topics.feedback))
    assert len(seen) == 301
    assert all(order == sorted(order) for order in per_key.values())


def test_snapshot_consumer_sigkilled_midstream_loses_and_doubles_nothing(kafka_broker, kafka_topics, tmp_path):
    store = ImageStore((tmp_path / "images").as_uri())
    # 1. 300 generations (600 images) and 1,200 votes on the topics.
    generations = [sample_generation(store, f"req-{i}") for i in range(300)]
    votes = [sample_vote(g, rank, v, user=f"u{u}") for g in generations for rank, v in ((1, "up"), (2, "down"))
             for u in range(2)]
    with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool-snap", topics=kafka_topics) as producer:
        for event in generations + votes:
            producer.emit(event)
        assert producer.flush(60)
    # 2. The snapshot CLI cuts a version every 100 events; SIGKILL it after its second version.
    out = tmp_path / "dataset"
    prefix = kafka_topics.feedback[: -len("alignloop.feedback")]
    child = subprocess.Popen(
        [sys.executable, "-m", "alignloop.cli", "feedback", "snapshot", "--out", str(out), "--bootstrap",
         kafka_broker.bootstrap, "--images", store.url, "--topic-prefix", prefix, "--every", "100",
         "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: len(versions(out)) >= 2 or child.poll() is not None, 120, "two snapshot versions")
        assert child.poll() is None, f"the snapshot finished before the kill:\n{child.stderr.read()[-2000:]}"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    killed_at = len(versions(out))
    assert killed_at < 15  # mid-stream: 1,500 events at 100 per version would make 15
    # 3. Restart: it resumes from the last durable version and finishes.
    writer = SnapshotWriter(out, kafka_broker.bootstrap, store, kafka_topics)
    newest = writer.run(progress=False)
    writer.close()
    assert not list(out.glob(".tmp-*")), "the interrupted version was cleaned up"
    assert [p.name for p in versions(out)] == [f"v{i:06d}" for i in range(1, len(versions(out)) + 1)]
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["counts"]["generation_events"] == 300 and manifest["counts"]["feedback_events"] == 1200
    feedback_ids = pq.read_table(newest / "feedback.parquet").column("event_id").to_pylist()
    assert sorted(feedback_ids) == sorted(str(v.event_id) for v in votes)  # none lost, none twice
    images = pq.read_table(newest / "generations.parquet").column("image_id").to_pylist()
    assert len(images) == len(set(images)) == 600
    assert len(list((newest / "images").iterdir())) == 600
    assert pq.read_table(newest / "votes.parquet").num_rows == 1200
