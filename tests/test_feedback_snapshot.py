"""The snapshot writer's version cuts without a broker: events go in through `_take` (what `run` does with each
Kafka message) and `_cut` gets a stand-in consumer, since the cut only uses it to commit offsets."""

import json

import pyarrow.parquet as pq
from kafka import TopicPartition
from kafka_fixtures import sample_generation, sample_vote

from alignloop.events import FeedbackEvent
from alignloop.feedback.config import Topics
from alignloop.feedback.image_store import ImageStore
from alignloop.feedback.snapshot import SnapshotWriter, versions

TOPICS = Topics()


class CommitOnlyConsumer:
    def __init__(self):
        self.committed = []

    def commit(self, offsets):
        self.committed.append(offsets)


class Feed:
    """Hands events to a writer at increasing offsets, one partition per topic, as a consumer would."""

    def __init__(self):
        self.next = {TOPICS.generations: 0, TOPICS.feedback: 0}

    def __call__(self, writer, *events):
        for event in events:
            topic = TOPICS.feedback if isinstance(event, FeedbackEvent) else TOPICS.generations
            writer._take(event.to_json(), TopicPartition(topic, 0), self.next[topic])
            self.next[topic] += 1


def _writer(tmp_path, store):
    return SnapshotWriter(tmp_path / "dataset", "127.0.0.1:1", store, TOPICS)  # never connects: no run()


def _manifest(version):
    return json.loads((version / "manifest.json").read_text())


def _image_ids(version):
    return sorted(row["image_id"] for row in pq.read_table(version / "generations.parquet").to_pylist())


def test_a_repeated_image_id_is_rejected_and_later_cuts_still_succeed(tmp_path):
    store = ImageStore((tmp_path / "images").as_uri())
    feed = Feed()
    first = sample_generation(store, "req-0")
    repeat = sample_generation(store, "req-0")  # another event_id, the same two image_ids
    writer = _writer(tmp_path, store)
    feed(writer, first, repeat, sample_vote(first, 1, "up"))
    v1 = writer._cut(CommitOnlyConsumer())
    assert _image_ids(v1) == ["req-0-1", "req-0-2"]
    assert _manifest(v1)["counts"]["rejected"] == 2 and _manifest(v1)["counts"]["votes"] == 1

    # A restart, then a new generation and yet another event reusing req-0's ids: the next cut is written.
    writer.close()
    writer = _writer(tmp_path, store)
    feed(writer, sample_generation(store, "req-1"), sample_generation(store, "req-0"))
    v2 = writer._cut(CommitOnlyConsumer())
    writer.close()
    assert [p.name for p in versions(tmp_path / "dataset")] == ["v000001", "v000002"]
    assert _image_ids(v2) == ["req-0-1", "req-0-2", "req-1-1", "req-1-2"]
    assert _manifest(v2)["counts"]["rejected"] == 4
    assert (v2 / "images" / "req-0-1.png").stat().st_ino == (v1 / "images" / "req-0-1.png").stat().st_ino


def test_a_version_already_holding_an_image_id_twice_can_be_extended(tmp_path):
    # What the writer produced before it deduped image_ids: two rows naming one image file.
    store = ImageStore((tmp_path / "images").as_uri())
    feed = Feed()
    writer = _writer(tmp_path, store)
    feed(writer, sample_generation(store, "req-0"))
    writer.data.generations.append(dict(writer.data.generations[0], event_id="an-older-duplicate"))
    v1 = writer._cut(CommitOnlyConsumer())
    writer.close()
    writer = _writer(tmp_path, store)
    feed(writer, sample_generation(store, "req-1"))
    v2 = writer._cut(CommitOnlyConsumer())  # used to raise FileExistsError linking req-0-1.png twice
    writer.close()
    rows = pq.read_table(v2 / "generations.parquet").to_pylist()
    assert all((v2 / row["image_path"]).read_bytes() == store.get(row["image_uri"]) for row in rows)
    assert (v2 / "images" / "req-0-1.png").stat().st_ino == (v1 / "images" / "req-0-1.png").stat().st_ino


def test_an_unreadable_image_is_counted_missing_and_copied_once_readable(tmp_path, monkeypatch):
    store = ImageStore((tmp_path / "images").as_uri())
    feed = Feed()
    generation = sample_generation(store, "req-0", k=3)
    denied, flaky = generation.images[0].uri, generation.images[1].uri
    read = store.get

    def failing_get(uri):
        if uri == denied:
            raise PermissionError(13, "Permission denied", uri)
        if uri == flaky:
            raise OSError("object store: 503 Slow Down")
        return read(uri)

    monkeypatch.setattr(store, "get", failing_get)
    writer = _writer(tmp_path, store)
    feed(writer, generation, sample_vote(generation, 1, "up"))
    v1 = writer._cut(CommitOnlyConsumer())
    assert _manifest(v1)["counts"]["missing_images"] == 2
    rows = {row["image_id"]: row for row in pq.read_table(v1 / "generations.parquet").to_pylist()}
    assert rows["req-0-1"]["image_path"] is None and rows["req-0-2"]["image_path"] is None
    assert (v1 / rows["req-0-3"]["image_path"]).read_bytes() == read(generation.images[2].uri)

    # The store recovers: the next cut copies what the last one missed.
    monkeypatch.setattr(store, "get", read)
    feed(writer, sample_generation(store, "req-1"))
    v2 = writer._cut(CommitOnlyConsumer())
    writer.close()
    assert _manifest(v2)["counts"]["missing_images"] == 0
    assert (v2 / "images" / "req-0-1.png").read_bytes() == read(denied)
