"""Typed configuration of the feedback stage: topics, producer, snapshots. Every field carries its unit."""

import os
from dataclasses import dataclass
from pathlib import Path

from alignloop.events import FEEDBACK_TOPIC, GENERATIONS_TOPIC
from alignloop.settings import home

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Topics:
    """Topic names. Tests and benchmarks use prefixed copies so they never read each other's events."""

    generations: str = GENERATIONS_TOPIC
    feedback: str = FEEDBACK_TOPIC

    def prefixed(self, prefix: str) -> "Topics":
        return Topics(generations=f"{prefix}{self.generations}", feedback=f"{prefix}{self.feedback}")


@dataclass(frozen=True)
class TopicSettings:
    """How topics are created (`alignloop kafka topics`, and inside `kafka up` / `cluster-up`)."""

    partitions: int = 3  # per topic; order is guaranteed per key, and keys spread over partitions
    replication: int = 1  # 3 on the drill cluster
    min_insync_replicas: int = 1  # with acks=all, a write needs this many replicas; 2 on the drill cluster
    # Kafka is the buffer between serving and the trainer, not the archive (snapshots are): two weeks covers
    # a trainer that was down over a long weekend several times over.
    retention_ms: int = 14 * DAY_MS


@dataclass(frozen=True)
class ProducerConfig:
    """EventProducer knobs. Defaults keep emit() at microseconds and votes durable through broker outages."""

    # Records waiting for broker acknowledgement longer than this mean the broker is down or too slow: the
    # producer stops sending, writes the unacknowledged and all new records to the spool, and replays later.
    spool_after_s: float = 5.0
    # While spooling, how often to try reconnecting (seconds).
    reconnect_interval_s: float = 1.0
    # Disk bound of the spool (bytes). Past it, new events are dropped, counted and logged: the spool protects
    # against outages of hours, not against a broker that never returns.
    max_spool_bytes: int = 256 * 1024 * 1024
    # Records rotate into a new spool segment past this size (bytes); replayed segments are deleted whole.
    segment_bytes: int = 8 * 1024 * 1024
    # In-memory hand-off between emit() and the shipper thread (records). Full means the shipper is stuck.
    inbox_records: int = 100_000
    # Replay sends this many spooled records, then waits for their acks before advancing the cursor.
    replay_chunk: int = 1_000
    # kafka-python batching: wait up to linger_ms to fill a batch (ms); batch_size bytes per partition.
    linger_ms: int = 5
    batch_size: int = 64 * 1024
    # How long kafka-python waits for one request's answer (ms), and keeps retrying one record before giving
    # up on it (ms; must exceed request_timeout_ms + linger_ms). The spool takes over long before either.
    request_timeout_ms: int = 10_000
    delivery_timeout_ms: int = 30_000


def cache_root() -> Path:
    """Downloaded artefacts shared by every state dir (the Kafka jars); `ALIGNLOOP_CACHE`, as scripts/env.sh."""
    path = Path(os.environ.get("ALIGNLOOP_CACHE", Path.home() / ".cache" / "alignloop"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_spool_dir() -> Path:
    """One spool per producer process: give each serving worker its own (e.g. spool/worker-3)."""
    return home() / "spool" / "default"


def default_image_store_url() -> str:
    return os.environ.get("ALIGNLOOP_IMAGE_STORE", (home() / "images").as_uri())
