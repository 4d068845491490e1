"""Cluster drill: three nodes, the partition leader SIGKILLed while 10,000 events flow."""

import threading
import time

import pytest
from kafka_fixtures import read_topic
from test_kafka_drills import FAST_FAILOVER, deduped_by_key, vote

from alignloop.feedback.config import Topics
from alignloop.feedback.producer import EventProducer


@pytest.mark.slow
def test_leader_killed_while_events_flow(kafka_cluster, tmp_path):
    topics = kafka_cluster.create_topics(Topics().prefixed("drill."))
    producer = EventProducer(kafka_cluster.bootstrap, spool_dir=tmp_path / "spool-cluster", config=FAST_FAILOVER,
                             topics=topics)
    assert producer.wait_connected(60)
    events = [vote(i) for i in range(10_000)]
    emitted = 0

    def emit_all():
        nonlocal emitted
        for i, event in enumerate(events):
            producer.emit(event)
            emitted = i + 1
            if i % 500 == 0:
                time.sleep(0.1)  # a steady stream over several seconds, not one burst

    sender = threading.Thread(target=emit_all)
    sender.start()
    while emitted < 3000:
        time.sleep(0.01)
    victim = kafka_cluster.leader(topics.feedback, 0)
    victim.kill()
    sender.join()
    assert producer.flush(180), f"{producer.pending} events pending after the leader was killed"
    producer.close()
    assert kafka_cluster.leader(topics.feedback, 0).node_id != victim.node_id
    seen, per_key = deduped_by_key(read_topic(kafka_cluster.bootstrap, topics.feedback, timeout_s=120))
    assert seen == {event.event_id for event in events}
    assert all(order == sorted(order) for order in per_key.values())
