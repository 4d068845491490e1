"""Real Apache Kafka for the test suite (registered in tests/conftest.py's pytest_plugins).

Fixtures:
- `kafka_broker` (session): one single-node KRaft broker on free loopback ports with its own temporary data
  dir, started once for the whole session and stopped at its end. A `alignloop.feedback.broker.Cluster`:
  `.bootstrap` ("127.0.0.1:PORT"), `.create_topics(topics)`, and `.stop()` / `.start()` for outage drills (a
  test that stops it must start it again, in a `finally`).
- `kafka_topics` (function): a fresh, prefixed pair of topics on `kafka_broker`, so tests never read each
  other's events. Pass it as `topics=` to EventProducer / SnapshotWriter.
- `kafka_cluster` (function, for `@pytest.mark.slow` drills): three nodes, replication 3,
  min.insync.replicas 2, torn down after the test.

Startup takes about 5-10 s on a 2-core machine; the jars come from the Maven cache (fetched once).
"""

import uuid

import pytest

from alignloop.feedback import broker
from alignloop.feedback.broker import read_topic  # noqa: F401 (the tests import it from here)
from alignloop.feedback.config import Topics


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    path = tmp_path_factory.mktemp("kafka-single")
    cluster = broker.up(port=broker.free_port(), controller_port=broker.free_port(), path=path, heap="384m",
                        topics=None)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def kafka_topics(kafka_broker) -> Topics:
    return kafka_broker.create_topics(Topics().prefixed(f"test-{uuid.uuid4().hex[:8]}."))


@pytest.fixture
def kafka_cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("kafka-cluster")
    # Nodes take ports base..base+2 and controllers base+100..: probe a base whose six ports are all free.
    base = _free_block()
    cluster = broker.cluster_up(nodes=3, base_port=base, path=path, heap="384m", topics=None)
    try:
        yield cluster
    finally:
        cluster.stop()


def _free_block() -> int:
    # Nodes take ports base..base+2 and controllers base+100..base+102.
    return broker.free_port(offsets=(0, 1, 2, 100, 101, 102))


def sample_generation(store, request_id: str, k: int = 2):
    """A generation event whose k images really are in `store` (an ImageStore)."""
    from alignloop.events import GeneratedImage, GenerationEvent, GenerationParams
    from alignloop.feedback.image_store import PNG_MAGIC

    images = [
        GeneratedImage(image_id=f"{request_id}-{rank}", rank=rank, reward=1.0 / rank, candidate_index=rank - 1,
                       seed=100 + rank, shown_probability=1.0,
                       uri=store.put(f"{request_id}-{rank}", PNG_MAGIC + request_id.encode() + bytes([rank])))
        for rank in range(1, k + 1)
    ]
    return GenerationEvent(request_id=request_id, prompt=f"two blue squares on a white background ({request_id})",
                           arm="A", adapter_version="base", params=GenerationParams(n=4, k=k, steps=10, guidance=5.0,
                                                                                   seed=7), images=images, reward_model="clip")


def sample_vote(generation, rank: int = 1, vote: str = "up", user: str = "user-1"):
    from alignloop.events import FeedbackEvent, hash_user_id

    image = next(i for i in generation.images if i.rank == rank)
    return FeedbackEvent(request_id=generation.request_id, image_id=image.image_id, vote=vote,
                         user_hash=hash_user_id(user), arm=generation.arm,
                         adapter_version=generation.adapter_version, image_uri=image.uri)
