"""Event producer: the service hands events to `emit()` and gets on with answering the user.

    producer = EventProducer()            # bootstrap from settings, spool under ALIGNLOOP_HOME
    producer.emit(GenerationEvent(...))    # microseconds; never raises for broker trouble
    producer.flush(timeout_s=5)            # True once Kafka acknowledged everything emitted so far
    producer.close()                       # sends what it can, spools the rest, releases the spool

How it works. `emit` serializes the (already validated, frozen) event and appends it to an in-memory inbox;
one shipper thread owns everything else, so records keep the order they were emitted in:

- DIRECT: the shipper sends records with kafka-python (acks=all, idempotent) and tracks each one until its
  ack. If the oldest unacknowledged record waits longer than `spool_after_s`, or a send fails, the broker
  counts as down: the shipper abandons the kafka-python producer, writes the unacknowledged records and,
  from then on, every new one to the spool (fsync'd) and switches to SPOOLING.
- SPOOLING: every `reconnect_interval_s` it tries to reconnect, then replays the spool in chunks, oldest
  first, moving the spool cursor only after a chunk is acknowledged. New records keep going to the spool's tail
  meanwhile, so they stay behind the older ones. Once the spool is empty it switches back to DIRECT.

Delivery is at-least-once: a record whose ack was lost with the connection is sent again from the spool.
Per partition the broker accepts an idempotent producer's records only in sequence, so what got through
before the switch is a prefix of what the spool replays; after dedupe by event_id (first copy wins) every
key's events stay in emit order.

What is durable when: a record is on disk once it is spooled; in DIRECT mode it lives in memory until Kafka
acknowledges it, like with any Kafka producer, and `close()` spools whatever is still unacknowledged.
"""

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Protocol

from kafka import KafkaProducer
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from prometheus_client import Counter, Gauge, Histogram

from alignloop.events import FeedbackEvent, GenerationEvent
from alignloop.feedback import broker
from alignloop.feedback.config import ProducerConfig, Topics, default_spool_dir
from alignloop.feedback.spool import Record, Spool
from alignloop.settings import kafka_bootstrap

log = logging.getLogger(__name__)

EVENTS = Counter("alignloop_feedback_events_total", "Events by outcome", ["producer", "outcome"])
SPOOL_DEPTH = Gauge("alignloop_feedback_spool_depth", "Events waiting in the local spool", ["producer"])
SPOOL_BYTES = Gauge("alignloop_feedback_spool_bytes", "Bytes of spool segments on disk", ["producer"])
SPOOL_FULL = Gauge("alignloop_feedback_spool_full", "1 while the spool is full and events are dropped", ["producer"])
CONNECTED = Gauge("alignloop_feedback_broker_connected", "1 while events go straight to Kafka", ["producer"])
ACK_LATENCY = Histogram(
    "alignloop_feedback_ack_seconds",
    "emit() to broker acknowledgement",
    ["producer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600),
)
# Outcomes: emitted (accepted by emit), acked (acknowledged by Kafka; replays count again), spooled,
# dropped_inbox_full (shipper stuck), dropped_spool_full (outage longer than the spool holds), dropped_spool_error
# (the spool's disk failing, e.g. full).


class EventSink(Protocol):
    """What the service needs from a producer; MemorySink implements it for unit tests."""

    def emit(self, event: GenerationEvent | FeedbackEvent) -> bool:
        """True when the event is queued for Kafka; False when it was dropped (it never will be)."""

    def flush(self, timeout_s: float = 10.0) -> bool: ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps emitted events in a list, in order. For unit tests of code that emits; no Kafka involved."""

    def __init__(self):
        self.events: list[GenerationEvent | FeedbackEvent] = []
        self.closed = False

    def emit(self, event: GenerationEvent | FeedbackEvent) -> bool:
        _check_event(event)
        if self.closed:
            raise RuntimeError("emit() after close()")
        self.events.append(event)
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class EventProducer:
    def __init__(
        self,
        bootstrap: str | None = None,
        spool_dir: Path | None = None,
        config: ProducerConfig = ProducerConfig(),
        topics: Topics = Topics(),
        on_ack: Callable[[Record], None] | None = None,
    ):
        """`on_ack(record)` runs on kafka-python's I/O thread after each acknowledgement: keep it tiny."""
        self.bootstrap = bootstrap or kafka_bootstrap()
        self.config = config
        self.topics = topics
        self._on_ack = on_ack
        self._spool = Spool(Path(spool_dir or default_spool_dir()), config.max_spool_bytes, config.segment_bytes)
        self._name = self._spool.path.name
        # 1. The inbox: emit() appends under _lock; the shipper takes everything at once.
        self._lock = threading.Lock()
        self._inbox: deque[Record] = deque()
        self._in_hand = 0  # records the shipper took from the inbox and has not yet sent or spooled
        self._wake = threading.Event()
        self._closing = False
        # 2. Records handed to kafka-python and not yet acknowledged, in send order: seq -> (record, sent_at).
        self._inflight: dict[int, tuple[Record, float]] = {}
        self._inflight_lock = threading.Lock()
        self._seq = 0
        self._send_failed = False
        self._kafka: KafkaProducer | None = None
        self._next_reconnect = 0.0
        self._replaying = None  # (futures, spool position after the chunk, records) of the chunk in flight
        self._spool_full_logged_at = 0.0
        # A spool left by an earlier run is replayed before anything new is sent.
        self._direct = False
        self._update_gauges()
        self._shipper = threading.Thread(target=self._run, name=f"alignloop-producer-{self._name}", daemon=True)
        self._shipper.start()

    # -- the caller's side ----------------------------------------------------------------------------------

    def emit(self, event: GenerationEvent | FeedbackEvent) -> bool:
        """Queue one event for Kafka: True, or False when the inbox is full (the shipper is stuck) and the event
        was dropped. Raises only for a programming error (not an event, or after close)."""
        _check_event(event)
        topic = self.topics.generations if isinstance(event, GenerationEvent) else self.topics.feedback
        record = Record(topic, event.kafka_key(), event.to_json(), time.monotonic())
        with self._lock:
            if self._closing:
                raise RuntimeError("emit() after close()")
            full = len(self._inbox) >= self.config.inbox_records
            if not full:
                self._inbox.append(record)
        if full:
            EVENTS.labels(self._name, "dropped_inbox_full").inc()
            log.error("producer %s: inbox full (%d events); the shipper thread is stuck; event %s dropped",
                      self._name, self.config.inbox_records, event.event_id)
            return False
        EVENTS.labels(self._name, "emitted").inc()
        if not self._wake.is_set():
            self._wake.set()
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until Kafka acknowledged every event emitted so far (True), or timeout_s passed (False).

        False is not loss: whatever is not acknowledged is in memory on its way, or durable in the spool.
        """
        deadline = time.monotonic() + timeout_s
        while self.pending:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """Wait until events go straight to Kafka (spool replayed). For benchmarks and drills; the service
        itself need not wait: emit() works, and keeps order, in either mode."""
        deadline = time.monotonic() + timeout_s
        while not self._direct:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what can be delivered within timeout_s; spool the rest durably for the next run."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + timeout_s
        self._wake.set()
        self._shipper.join()
        self._spool.close()
        for gauge in (SPOOL_DEPTH, SPOOL_BYTES, SPOOL_FULL, CONNECTED):
            gauge.remove(self._name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def pending(self) -> int:
        """Events emitted (or recovered from the spool) and not yet acknowledged by Kafka."""
        with self._lock:
            waiting = len(self._inbox) + self._in_hand
        with self._inflight_lock:
            waiting += len(self._inflight)
        return waiting + self._spool.depth

    @property
    def spool_depth(self) -> int:
        return self._spool.depth

    @property
    def connected(self) -> bool:
        """True while events go straight to Kafka; False while they go to the spool."""
        return self._direct

    # -- the shipper thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            with self._lock:
                batch = list(self._inbox)
                self._inbox.clear()
                self._in_hand = len(batch)
                closing = self._closing
            try:
                if self._direct:
                    self._send(batch)
                    if self._stalled():
                        self._switch_to_spool("no acknowledgement within %.1fs" % self.config.spool_after_s)
                else:
                    self._append_to_spool(batch)
                    if not closing:
                        self._replay_step()
            except Exception:  # a bug or an unexpected client error must not stop the shipping of votes
                log.exception("producer %s: unexpected error; spooling", self._name)
                # Some of the batch may be in flight or spooled already: at-least-once, consumers dedupe.
                self._switch_to_spool("unexpected error")
                try:
                    self._append_to_spool(batch)
                except OSError as err:  # the spool's disk failing too (full): these events are lost, not the thread
                    EVENTS.labels(self._name, "dropped_spool_error").inc(len(batch))
                    log.error("producer %s: spool %s not writable (%s); %d events dropped", self._name,
                              self._spool.path, err, len(batch))
            finally:
                with self._lock:
                    self._in_hand = 0
            self._update_gauges()
            if closing:
                break
        self._shutdown()

    def _send(self, batch: list[Record]) -> None:
        for i, record in enumerate(batch):
            try:
                self._send_one(record)
            except KafkaError as err:  # e.g. no metadata within max_block_ms: the broker went away
                # The record is registered in flight, so the switch spools it; the rest of the batch follows.
                self._switch_to_spool(f"send failed: {err}")
                self._append_to_spool(batch[i + 1 :])
                return

    def _send_one(self, record: Record) -> None:
        with self._inflight_lock:
            self._seq += 1
            seq = self._seq
            self._inflight[seq] = (record, time.monotonic())
        future = self._kafka.send(record.topic, value=record.value, key=record.key.encode())
        future.add_callback(self._acked, seq)
        future.add_errback(self._failed, seq)

    def _acked(self, seq: int, _metadata) -> None:  # runs on kafka-python's I/O thread
        with self._inflight_lock:
            record, _ = self._inflight.pop(seq, (None, 0))
        if record is None:  # already abandoned and spooled: the spool will resend it
            return
        EVENTS.labels(self._name, "acked").inc()
        ACK_LATENCY.labels(self._name).observe(time.monotonic() - record.emitted_at)
        if self._on_ack:
            self._on_ack(record)

    def _failed(self, seq: int, error) -> None:  # runs on kafka-python's I/O thread
        with self._inflight_lock:
            tracked = seq in self._inflight
        if tracked:  # not a record we abandoned ourselves (those are in the spool already)
            log.warning("producer %s: send failed: %s", self._name, error)
            self._send_failed = True

    def _stalled(self) -> bool:
        if self._send_failed:
            return True
        with self._inflight_lock:
            oldest = next(iter(self._inflight.values()), None)
        return oldest is not None and time.monotonic() - oldest[1] > self.config.spool_after_s

    def _switch_to_spool(self, reason: str) -> None:
        """Abandon the Kafka connection; its unacknowledged records go to the spool first, in send order."""
        if self._direct:
            log.warning("producer %s: broker unavailable (%s); spooling events to %s",
                        self._name, reason, self._spool.path)
        self._direct = False
        self._abandon_and_spool()
        self._next_reconnect = time.monotonic() + self.config.reconnect_interval_s

    def _abandon_and_spool(self) -> None:
        """Take the unacknowledged records (in send order), stop the Kafka client, spool them."""
        with self._inflight_lock:
            unacked = [record for record, _ in self._inflight.values()]
            self._inflight.clear()
        self._abandon_kafka()
        self._append_to_spool(unacked)

    def _append_to_spool(self, records: list[Record]) -> None:
        if not records:
            return
        written = self._spool.append(records)
        EVENTS.labels(self._name, "spooled").inc(written)
        dropped = len(records) - written
        SPOOL_FULL.labels(self._name).set(1 if dropped else 0)
        if dropped:
            EVENTS.labels(self._name, "dropped_spool_full").inc(dropped)
            now = time.monotonic()
            if now - self._spool_full_logged_at > 10:  # once per 10 s, not once per vote
                self._spool_full_logged_at = now
                log.error("producer %s: spool %s is full (%d bytes, limit %d); dropping events until the broker "
                          "returns (alignloop_feedback_events_total{outcome=\"dropped_spool_full\"})",
                          self._name, self._spool.path, self._spool.size_bytes, self.config.max_spool_bytes)

    def _replay_step(self) -> None:
        """Advance the replay without blocking: the shipper keeps moving new events to the spool meanwhile.

        One chunk is outstanding at a time; the cursor moves only once all of it is acknowledged. A slow broker
        gets kafka-python's full delivery timeout per chunk; a failed chunk is sent again after a reconnect.
        """
        if self._replaying is None:
            if time.monotonic() >= self._next_reconnect and self._connect():
                self._send_chunk()
            return
        futures, end, records = self._replaying
        if not all(f.is_done for f in futures):
            return
        self._replaying = None
        if not all(f.succeeded() for f in futures):
            log.warning("producer %s: replay interrupted; %d events still spooled", self._name, self._spool.depth)
            self._abandon_kafka()
            self._next_reconnect = time.monotonic() + self.config.reconnect_interval_s
            return
        if self._spool.depth == len(records):
            # The last chunk: DIRECT before the cursor moves, so no one sees "nothing pending" while spooling.
            self._go_direct()
        self._spool.advance(end, len(records))
        EVENTS.labels(self._name, "acked").inc(len(records))
        if self._on_ack:
            for record in records:
                self._on_ack(record)
        if not self._direct:
            self._send_chunk()

    def _go_direct(self) -> None:
        log.info("producer %s: spool replayed; sending directly to %s", self._name, self.bootstrap)
        self._direct = True

    def _send_chunk(self) -> None:
        records, end = self._spool.read(self.config.replay_chunk)
        if not records:
            self._go_direct()
            return
        try:
            futures = [self._kafka.send(r.topic, value=r.value, key=r.key.encode()) for r in records]
        except KafkaError as err:  # metadata unavailable: the broker went away again
            log.warning("producer %s: replay failed: %s", self._name, err)
            self._abandon_kafka()
            self._next_reconnect = time.monotonic() + self.config.reconnect_interval_s
            return
        futures[-1].add_both(lambda _: self._wake.set())  # check the chunk as soon as its last ack is in
        self._replaying = (futures, end, records)

    def _connect(self) -> bool:
        if self._kafka is not None:
            return True
        self._send_failed = False
        if not broker.reachable(self.bootstrap):  # cheap check first: kafka-python logs every refused connection
            return False
        try:
            self._kafka = KafkaProducer(
                bootstrap_servers=self.bootstrap.split(","),
                acks="all",
                enable_idempotence=True,
                linger_ms=self.config.linger_ms,
                batch_size=self.config.batch_size,
                delivery_timeout_ms=self.config.delivery_timeout_ms,
                request_timeout_ms=self.config.request_timeout_ms,
                # Bounds the shipper's wait for topic metadata; the caller never waits on it.
                max_block_ms=int(self.config.spool_after_s * 1000),
                bootstrap_timeout_ms=int(self.config.reconnect_interval_s * 1000),
                client_id=f"alignloop-{self._name}",
            )
        except (KafkaTimeoutError, KafkaConnectionError) as err:  # no broker answered in time
            log.debug("producer %s: broker not reachable yet: %s", self._name, err)
            return False
        return True

    def _abandon_kafka(self) -> None:
        """Stop the kafka-python producer now, failing what it still holds.

        kafka-python 3.0's close(timeout=0) calls flush(0) first, which raises while records are pending; so
        the I/O thread is force-closed first (its abort fails every pending future), then close() is instant.
        Nothing it held is lost: those records are still in _inflight or the spool.
        """
        kafka, self._kafka = self._kafka, None
        self._replaying = None  # its records are still in the spool, before the cursor
        if kafka is None:
            return
        kafka._sender.force_close()
        kafka._sender.join(5)
        try:
            kafka.close(timeout=0)
        except KafkaError as err:
            log.debug("producer %s: close after force-close: %s", self._name, err)

    def _shutdown(self) -> None:
        remaining = max(0.0, self._close_deadline - time.monotonic())
        if self._direct:
            try:
                self._kafka.flush(timeout=remaining)
            except KafkaError:
                pass
        self._direct = False
        self._abandon_and_spool()  # only what Kafka did not acknowledge; an unfinished replay stays spooled
        self._update_gauges()
        if self._spool.depth:
            log.warning("producer %s: closed with %d events in the spool %s; the next run replays them",
                        self._name, self._spool.depth, self._spool.path)

    def _update_gauges(self) -> None:
        SPOOL_DEPTH.labels(self._name).set(self._spool.depth)
        SPOOL_BYTES.labels(self._name).set(self._spool.size_bytes)
        CONNECTED.labels(self._name).set(1 if self._direct else 0)


def _check_event(event) -> None:
    if not isinstance(event, (GenerationEvent, FeedbackEvent)):
        raise TypeError(f"emit() takes a GenerationEvent or FeedbackEvent; got {type(event).__name__}")

