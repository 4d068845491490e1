"""`alignloop bench feedback`: the project's producer against a bare kafka-python producer, in one run.

Both send the same feedback events to the same broker with acks=all and idempotence, the same linger and
batch size. Ours also validates each event (pydantic) and keeps its spool ready; the bare one json.dumps a
dict. Measured per producer: events/s (first send to last ack), the time the caller is blocked per call, and
the produce latency from the call to the broker's ack. Rounds alternate bare / ours and the median round
counts, because this machine may be shared. `ratio` = ours / bare events/s (bigger is better; goal >= 0.5).
"""

import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer

from alignloop.events import FeedbackEvent
from alignloop.feedback import broker
from alignloop.feedback.config import ProducerConfig, TopicSettings, Topics
from alignloop.feedback.producer import EventProducer
from alignloop.machine import describe_machine
from alignloop.settings import kafka_bootstrap


def run(bootstrap: str | None = None, events: int = 10_000, rounds: int = 3) -> dict:
    with _broker(bootstrap) as address:
        topics = Topics().prefixed(f"bench-{uuid.uuid4().hex[:8]}.")
        broker.create_topics(address, topics, TopicSettings(partitions=3, replication=1))
        config = ProducerConfig()
        payloads = [_payload() for _ in range(events)]
        _bare(address, topics, payloads[:200], config)  # warm-up: connections, metadata, the broker's JIT
        _ours(address, topics, payloads[:200], config)
        results = {"bare": [], "ours": []}
        for _ in range(rounds):
            results["bare"].append(_bare(address, topics, payloads, config))
            results["ours"].append(_ours(address, topics, payloads, config))
        bare = _median_round(results["bare"])
        ours = _median_round(results["ours"])
        broker.delete_topics(address, topics)
    return {
        "benchmark": "feedback",
        "machine": describe_machine(),
        "settings": {"events": events, "rounds": rounds, "acks": "all", "enable_idempotence": True,
                     "linger_ms": config.linger_ms, "batch_size": config.batch_size, "partitions": 3,
                     "broker": "Apache Kafka 4.4.0, one KRaft node on loopback", "validation": True, "spool": True},
        "ours": ours,
        "bare": bare,
        "ratio": round(ours["events_per_s"] / bare["events_per_s"], 3),
        "ratio_means": "ours / bare kafka-python events per second; bigger is better",
    }


def _payload() -> dict:
    image_id = f"img-{uuid.uuid4().hex[:16]}"
    return {
        "schema": "alignloop.feedback/1", "event_id": str(uuid.uuid4()),
        "ts": "2026-11-24T12:00:00.000000Z", "request_id": f"req-{uuid.uuid4().hex[:16]}", "image_id": image_id,
        "vote": "up", "user_hash": "ab" * 32, "arm": "A", "adapter_version": "base",
        "image_uri": f"file:///var/alignloop/images/{image_id[:2]}/{image_id}.png",
    }


def _bare(address: str, topics: Topics, payloads: list[dict], config: ProducerConfig) -> dict:
    producer = KafkaProducer(bootstrap_servers=address.split(","), acks="all", enable_idempotence=True,
                             linger_ms=config.linger_ms, batch_size=config.batch_size)
    acked, blocked = [], []
    start = time.perf_counter()
    for payload in payloads:
        t0 = time.perf_counter()
        future = producer.send(topics.feedback, value=json.dumps(payload).encode(), key=payload["image_id"].encode())
        blocked.append(time.perf_counter() - t0)
        future.add_callback(lambda _, t0=t0: acked.append(time.perf_counter() - t0))
    producer.flush()
    elapsed = time.perf_counter() - start
    producer.close()
    return _figures(len(payloads), elapsed, blocked, acked)


def _ours(address: str, topics: Topics, payloads: list[dict], config: ProducerConfig) -> dict:
    acked = []
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-spool-") as spool:
        producer = EventProducer(address, spool_dir=Path(spool) / "bench", config=config, topics=topics,
                                 on_ack=lambda record: acked.append(time.monotonic() - record.emitted_at))
        if not producer.wait_connected(30):  # connected before the clock starts, as the bare producer is
            raise broker.BrokerError(f"the producer could not reach Kafka at {address}")
        blocked = []
        start = time.perf_counter()
        for payload in payloads:
            t0 = time.perf_counter()
            producer.emit(FeedbackEvent.model_validate_json(json.dumps(payload)))
            blocked.append(time.perf_counter() - t0)
        delivered = producer.flush(120)
        elapsed = time.perf_counter() - start
        producer.close()
    if not delivered:
        raise broker.BrokerError("our producer did not deliver every event within 120 s; is the broker healthy?")
    return _figures(len(payloads), elapsed, blocked, acked)


def _figures(n: int, elapsed: float, blocked: list[float], acked: list[float]) -> dict:
    def ms(values, q):
        return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 3)

    return {
        "events": n, "acked": len(acked), "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed, 1),
        "produce_latency_ms": {"p50": ms(acked, 50), "p99": ms(acked, 99)},
        "call_blocked_ms": {"p50": ms(blocked, 50), "p99": ms(blocked, 99), "max": round(max(blocked) * 1000, 3)},
    }


def _median_round(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["events_per_s"])
    return {**ordered[len(ordered) // 2], "events_per_s_rounds": [r["events_per_s"] for r in rounds]}


class _broker:
    """The given broker; else the one at settings.kafka_bootstrap() if it answers; else a throwaway node."""

    def __init__(self, bootstrap: str | None):
        self.bootstrap = bootstrap
        self.tmp = None
        self.cluster = None

    def __enter__(self) -> str:
        address = self.bootstrap or kafka_bootstrap()
        if self.bootstrap or broker.reachable(address):
            return address
        self.tmp = tempfile.TemporaryDirectory(prefix="alignloop-bench-kafka-")
        self.cluster = broker.up(port=broker.free_port(), controller_port=broker.free_port(),
                                 path=Path(self.tmp.name), topics=None)
        return self.cluster.bootstrap

    def __exit__(self, *exc):
        if self.cluster is not None:
            self.cluster.stop()
            self.tmp.cleanup()
