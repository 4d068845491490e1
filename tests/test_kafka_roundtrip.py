"""Against the real broker: events produced, consumed, snapshot written; malformed events rejected."""

import json

import pyarrow.parquet as pq
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka_fixtures import read_topic, sample_generation, sample_vote

from alignloop.events import parse_event
from alignloop.feedback import broker
from alignloop.feedback.image_store import ImageStore
from alignloop.feedback.producer import EventProducer
from alignloop.feedback.snapshot import SnapshotWriter, versions


def test_round_trip_snapshot_dedupe_and_rejection(kafka_broker, kafka_topics, tmp_path):
    store = ImageStore((tmp_path / "images").as_uri())
    # 1. Produce: 3 generations (2 images each), 4 votes, one vote sent twice (a replay), one malformed record.
    generations = [sample_generation(store, f"req-{i}") for i in range(3)]
    votes = [sample_vote(generations[0], 1, "up"), sample_vote(generations[0], 2, "down"),
             sample_vote(generations[1], 1, "up"), sample_vote(generations[2], 2, "down", user="user-2")]
    with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool-rt", topics=kafka_topics) as producer:
        for event in generations + votes + [votes[0]]:
            producer.emit(event)
        assert producer.flush(30) and producer.connected and producer.spool_depth == 0
    bare = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    bare.send(kafka_topics.feedback, key=b"img-x", value=json.dumps({"schema": "alignloop.feedback/1",
                                                                      "vote": "sideways"}).encode())
    bare.flush()
    bare.close()

    # 2. Consume: keys and values as the contract says.
    records = read_topic(kafka_broker.bootstrap, kafka_topics.generations)
    assert sorted(r.key.decode() for r in records) == ["req-0", "req-1", "req-2"]
    assert sorted((parse_event(r.value) for r in records), key=lambda e: e.request_id) == generations
    feedback_records = read_topic(kafka_broker.bootstrap, kafka_topics.feedback)
    assert len(feedback_records) == 6
    assert all(r.key.decode() == json.loads(r.value).get("image_id", "img-x") for r in feedback_records)

    # 3. Snapshot: deduped, joined, images copied, offsets in the manifest and committed to the group.
    writer = SnapshotWriter(tmp_path / "dataset", kafka_broker.bootstrap, store, kafka_topics)
    newest = writer.run(progress=False)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["counts"] == {"generation_events": 3, "images": 6, "feedback_events": 4, "votes": 4,
                                  "unjoined_feedback": 0, "missing_images": 0, "rejected": 1}
    table = pq.read_table(newest / "votes.parquet").to_pylist()
    assert sorted((r["image_id"], r["vote"], r["label"]) for r in table) == [
        ("req-0-1", "up", 1), ("req-0-2", "down", 0), ("req-1-1", "up", 1), ("req-2-2", "down", 0)]
    assert all(r["prompt"].startswith("two blue squares") and r["seed"] == 7 for r in table)
    for row in pq.read_table(newest / "generations.parquet").to_pylist():
        assert (newest / row["image_path"]).read_bytes() == store.get(row["image_uri"])
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=writer.group_id)
    for topic, partitions in manifest["offsets"].items():
        for partition, offset in partitions.items():
            assert consumer.committed(TopicPartition(topic, int(partition))) == offset
    consumer.close()

    # 4. Nothing new: no new version. New events: a cumulative v2 that links the old images.
    assert writer.run(progress=False) == newest
    later = sample_generation(store, "req-9")
    with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool-rt", topics=kafka_topics) as producer:
        producer.emit(later)
        producer.emit(sample_vote(later, 1, "up"))
        producer.emit(votes[1])  # a duplicate of an event already in v1
        assert producer.flush(30)
    second = writer.run(progress=False)
    writer.close()
    assert [p.name for p in versions(tmp_path / "dataset")] == ["v000001", "v000002"]
    counts = json.loads((second / "manifest.json").read_text())["counts"]
    assert (counts["images"], counts["votes"], counts["rejected"]) == (8, 5, 1)
    assert (second / "images" / "req-0-1.png").stat().st_ino == (newest / "images" / "req-0-1.png").stat().st_ino

    # 5. The dataset folder wiped (its consumer group's offsets still committed): the new v000001 holds every event,
    #    read from the beginning, not only those after the group's offsets.
    import shutil

    shutil.rmtree(tmp_path / "dataset")
    rebuilt = SnapshotWriter(tmp_path / "dataset", kafka_broker.bootstrap, store, kafka_topics)
    again = rebuilt.run(progress=False)
    rebuilt.close()
    assert again.name == "v000001" and json.loads((again / "manifest.json").read_text())["counts"] == counts


def test_broker_up_is_idempotent(kafka_broker):
    node = kafka_broker.nodes[0]
    pid = node.pid()
    again = broker.up(port=node.port, controller_port=node.controller_port, path=kafka_broker.state_dir, topics=None)
    assert again.nodes[0].pid() == pid and again.bootstrap == kafka_broker.bootstrap
