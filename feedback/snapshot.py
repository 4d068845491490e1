"""Snapshot writer: both topics -> deduped, joined, versioned dataset on disk, committed to Kafka afterwards.

    <out>/v000001/            one complete version; versions are cumulative, so a trainer reads only the newest
        generations.parquet   one row per returned image (prompt, arm, adapter, sampler params, reward, rank)
        feedback.parquet      one row per vote event
        votes.parquet         feedback inner-joined with generations on image_id, plus label (1 = up, 0 = down)
        images/<image_id>.png copied from the image store (hard links to the previous version's copies)
        manifest.json         version, parent, next offset per topic partition, counts, file checksums
    <out>/v000002/ ...

Guarantees, and how:
1. Nothing lost: a version is built in `.tmp-*`, every file fsync'd, then renamed into place (atomic) and the
   directory fsync'd; only then are the offsets committed to the consumer group. A crash at any point leaves
   the last complete version and offsets at or before it.
2. Nothing counted twice: a restart resumes from the newest manifest's offsets (a partition it does not name from
   the beginning, never from the group's committed offset: versions are cumulative, and a group ahead of the
   dataset means the folder was moved or wiped, so its events are not in it) and dedupes by event_id against
   everything already in the dataset, so events re-read after a crash, or re-sent by a producer replaying its spool, are dropped.
3. Malformed events (schema violations) are skipped, logged and counted in the manifest, not fatal: one bad
   record must not stop the dataset.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError
from tqdm import tqdm

from alignloop.events import FEEDBACK_SCHEMA, GENERATION_SCHEMAS, FeedbackEvent, GenerationEvent, parse_event
from alignloop.feedback.config import Topics
from alignloop.durable import fsync_dir, fsync_file, make_dirs_durably, write_durably
from alignloop.feedback.image_store import ImageStore

log = logging.getLogger(__name__)

GENERATIONS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("request_id", pa.string()), ("event_id", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")), ("user_hash", pa.string()), ("prompt", pa.string()),
    ("arm", pa.string()), ("adapter_version", pa.string()), ("n", pa.int16()), ("k", pa.int16()),
    ("steps", pa.int16()), ("guidance", pa.float32()), ("seed", pa.int64()), ("rank", pa.int16()),
    ("reward", pa.float64()), ("image_uri", pa.string()), ("image_path", pa.string()),
    # From alignloop.generation/2 on (null for /1 events): what ranked it, and how to redraw and reweight it.
    ("reward_model", pa.string()), ("candidate_index", pa.int16()), ("candidate_seed", pa.int64()),
    ("shown_probability", pa.float64()),
])
FEEDBACK_TABLE_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("request_id", pa.string()),
    ("image_id", pa.string()), ("vote", pa.string()), ("user_hash", pa.string()), ("arm", pa.string()),
    ("adapter_version", pa.string()), ("image_uri", pa.string()),
])
_JOINED = ("prompt", "n", "k", "steps", "guidance", "seed", "rank", "reward", "image_path", "reward_model",
           "candidate_index", "candidate_seed", "shown_probability")
VOTES_SCHEMA = pa.schema(
    list(FEEDBACK_TABLE_SCHEMA) + [GENERATIONS_SCHEMA.field(name) for name in _JOINED] + [("label", pa.int8())]
)


@dataclass
class Dataset:
    """The cumulative content of the newest version, held in memory while a run extends it."""

    generations: list[dict] = field(default_factory=list)
    feedback: list[dict] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # event_ids already in the dataset
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)  # topic -> partition -> next offset
    rejected: int = 0
    version: int = 0
    image_ids: set[str] = field(default_factory=set)  # image_ids already in the dataset

    def add(self, event: GenerationEvent | FeedbackEvent) -> bool:
        event_id = str(event.event_id)
        if event_id in self.seen:
            return False
        self.seen.add(event_id)
        if isinstance(event, GenerationEvent):
            p = event.params
            for image in event.images:
                if image.image_id in self.image_ids:
                    # A second image under one id would collide on images/<image_id>.png (and make the vote
                    # join ambiguous): keep the first, reject this one like a malformed record.
                    self.rejected += 1
                    log.warning("skipping image %s of event %s: image_id already in the dataset",
                                image.image_id, event_id)
                    continue
                self.image_ids.add(image.image_id)
                self.generations.append({
                    "image_id": image.image_id, "request_id": event.request_id, "event_id": event_id, "ts": event.ts,
                    "user_hash": event.user_hash, "prompt": event.prompt, "arm": event.arm,
                    "adapter_version": event.adapter_version, "n": p.n, "k": p.k, "steps": p.steps,
                    "guidance": p.guidance, "seed": p.seed, "rank": image.rank, "reward": image.reward,
                    "image_uri": image.uri, "image_path": None, "reward_model": event.reward_model,
                    "candidate_index": image.candidate_index, "candidate_seed": image.seed,
                    "shown_probability": image.shown_probability,
                })
        else:
            self.feedback.append({
                "event_id": event_id, "ts": event.ts, "request_id": event.request_id, "image_id": event.image_id,
                "vote": event.vote, "user_hash": event.user_hash, "arm": event.arm,
                "adapter_version": event.adapter_version, "image_uri": event.image_uri,
            })
        return True

    def votes(self) -> list[dict]:
        by_image = {row["image_id"]: row for row in self.generations}
        joined = []
        for vote in self.feedback:
            generation = by_image.get(vote["image_id"])
            if generation is not None:  # its generation event may still be on its way (next version)
                joined.append({**vote, **{name: generation[name] for name in _JOINED},
                               "label": 1 if vote["vote"] == "up" else 0})
        return joined


def versions(out: Path) -> list[Path]:
    """Complete versions, oldest first (a version directory exists only once it is complete)."""
    return sorted(p for p in Path(out).glob("v[0-9]*") if p.is_dir() and (p / "manifest.json").exists())


def latest(out: Path) -> Path | None:
    found = versions(out)
    return found[-1] if found else None


def load(out: Path) -> Dataset:
    """The newest version as a Dataset (empty if there is none)."""
    newest = latest(out)
    if newest is None:
        return Dataset()
    manifest = json.loads((newest / "manifest.json").read_text())
    data = Dataset(
        generations=pq.read_table(newest / "generations.parquet").to_pylist(),
        feedback=pq.read_table(newest / "feedback.parquet").to_pylist(),
        offsets={t: {int(p): o for p, o in parts.items()} for t, parts in manifest["offsets"].items()},
        rejected=manifest["counts"]["rejected"],
        version=manifest["version"],
    )
    data.seen = {row["event_id"] for row in data.generations} | {row["event_id"] for row in data.feedback}
    data.image_ids = {row["image_id"] for row in data.generations}
    return data


class SnapshotError(RuntimeError):
    """A condition a person must fix (a second writer on the folder, a missing topic)."""


class SnapshotWriter:
    def __init__(self, out: Path, bootstrap: str, image_store: ImageStore, topics: Topics = Topics(),
                 group_id: str | None = None):
        self.out = Path(out).resolve()
        make_dirs_durably(self.out)
        self._lock = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SnapshotError(f"another snapshot writer is running on {self.out}") from None
        for leftover in self.out.glob(".tmp-*"):  # a version a crash interrupted before its rename
            shutil.rmtree(leftover)
        self.bootstrap = bootstrap
        self.store = image_store
        self.topics = topics
        # One consumer group per output folder, so the group's committed offsets describe this dataset.
        self.group_id = group_id or "alignloop-snapshot-" + hashlib.sha256(str(self.out).encode()).hexdigest()[:10]
        self.data = load(self.out)

    def run(self, follow: bool = False, every_events: int = 10_000, every_s: float = 60.0,
            progress: bool = True) -> Path | None:
        """Consume from the resume point; cut a version every `every_events` new events (and, when following,
        every `every_s` seconds with news). Without follow, stop at the end offsets seen at start.
        Returns the newest version's folder."""
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap.split(","), group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id="alignloop-snapshot", max_poll_records=1000,
        )
        try:
            partitions = self._assign(consumer)
            end = consumer.end_offsets(partitions)
            backlog = sum(max(0, end[tp] - consumer.position(tp)) for tp in partitions)
            bar = tqdm(total=None if follow else backlog, unit="event", desc="snapshot", disable=not progress)
            new_events, last_cut = 0, time.monotonic()
            while True:
                for tp, messages in consumer.poll(timeout_ms=500).items():
                    for message in messages:
                        new_events += self._take(message.value, tp, message.offset)
                    bar.update(len(messages))
                caught_up = all(consumer.position(tp) >= end[tp] for tp in partitions)
                due = new_events >= every_events or (follow and new_events and time.monotonic() - last_cut >= every_s)
                if due or (caught_up and not follow and self._has_news()):
                    self._cut(consumer)
                    new_events, last_cut = 0, time.monotonic()
                if caught_up and not follow:
                    break
            bar.close()
        finally:
            consumer.close()
        return latest(self.out)

    def close(self) -> None:
        self._lock.close()

    # -- consuming ------------------------------------------------------------------------------------------

    def _assign(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        """Take every partition of both topics (one writer per dataset) and seek to the resume point."""
        partitions = []
        for topic in (self.topics.generations, self.topics.feedback):
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                raise SnapshotError(f"topic {topic!r} does not exist on {self.bootstrap}; create it with "
                                   "`alignloop kafka topics`")
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        consumer.assign(partitions)
        for tp in partitions:
            # The manifest decides: it is written before the commit, so it is never behind the group.
            start = self.data.offsets.get(tp.topic, {}).get(tp.partition)
            if start is not None:
                consumer.seek(tp, start)
                continue
            committed = consumer.committed(tp)
            if committed:  # the dataset was moved or wiped: starting there would leave out everything before
                log.warning("%s: the group committed offset %d but dataset %s has none; reading from the "
                            "beginning, since a version holds every event", tp, committed, self.out)
            consumer.seek_to_beginning(tp)
        return partitions

    def _take(self, value: bytes, tp: TopicPartition, offset: int) -> int:
        self.data.offsets.setdefault(tp.topic, {})[tp.partition] = offset + 1
        try:
            event = parse_event(value)
        except ValidationError as err:
            self.data.rejected += 1
            log.warning("skipping malformed event at %s[%d]@%d: %s", tp.topic, tp.partition, offset,
                        str(err).splitlines()[0])
            return 0
        return int(self.data.add(event))

    def _has_news(self) -> bool:
        newest = latest(self.out)
        if newest is None:
            return bool(self.data.offsets)
        committed = json.loads((newest / "manifest.json").read_text())["offsets"]
        current = {t: {str(p): o for p, o in parts.items()} for t, parts in self.data.offsets.items()}
        return current != committed

    # -- writing a version ----------------------------------------------------------------------------------

    def _cut(self, consumer: KafkaConsumer) -> Path:
        parent = latest(self.out)
        version = self.data.version + 1
        final = self.out / f"v{version:06d}"
        tmp = self.out / f".tmp-{final.name}-{os.getpid()}"
        images = tmp / "images"
        images.mkdir(parents=True)
        # 1. Images: a hard link to the parent's copy when there is one, else a copy from the store.
        missing = 0
        for row in self.data.generations:
            target = images / f"{row['image_id']}.png"
            previous = parent / row["image_path"] if parent and row["image_path"] else None
            if target.exists():
                pass  # a version written before image_ids were deduped can hold one id twice: one file serves both
            elif previous and previous.exists():
                os.link(previous, target)
            else:
                try:
                    png = self.store.get(row["image_uri"])
                except (OSError, ValueError) as err:  # any store failure for one image, not only "not found"
                    missing += 1
                    log.warning("image %s not copied: %s", row["image_uri"], err)
                    row["image_path"] = None
                    continue
                # Errors writing our own folder stay fatal: they are not one bad image.
                target.write_bytes(png)
                fsync_file(target)
            row["image_path"] = f"images/{target.name}"
        fsync_dir(images)
        # 2. Tables.
        votes = self.data.votes()
        files = {}
        for name, rows, schema in (("generations", self.data.generations, GENERATIONS_SCHEMA),
                                   ("feedback", self.data.feedback, FEEDBACK_TABLE_SCHEMA),
                                   ("votes", votes, VOTES_SCHEMA)):
            path = tmp / f"{name}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
            fsync_file(path)
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        # 3. Manifest, then the atomic rename that makes the version exist.
        manifest = {
            "version": version,
            "parent": parent.name if parent else None,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "schemas": [*GENERATION_SCHEMAS, FEEDBACK_SCHEMA],
            "topics": {"generations": self.topics.generations, "feedback": self.topics.feedback},
            "consumer_group": self.group_id,
            "offsets": {t: {str(p): o for p, o in sorted(parts.items())} for t, parts in self.data.offsets.items()},
            "counts": {"generation_events": len({r["event_id"] for r in self.data.generations}),
                       "images": len(self.data.generations), "feedback_events": len(self.data.feedback),
                       "votes": len(votes), "unjoined_feedback": len(self.data.feedback) - len(votes),
                       "missing_images": missing, "rejected": self.data.rejected},
            "sha256": files,
        }
        write_durably(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())
        os.rename(tmp, final)
        fsync_dir(self.out)
        self.data.version = version
        # 4. Only now may the group move on: the version these offsets fed is durable.
        try:
            consumer.commit({
                TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                for t, parts in self.data.offsets.items() for p, o in parts.items()
            })
        except KafkaError as err:  # the manifest already holds these offsets; a restart resumes from it
            log.warning("snapshot %s written, but committing its offsets failed: %s", final, err)
        log.info("snapshot %s: %d images, %d votes", final, len(self.data.generations), len(votes))
        return final
