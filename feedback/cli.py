"""`alignloop kafka ...`, `alignloop feedback ...` and `alignloop bench feedback`.

Imports of the Kafka client, pyarrow and friends happen inside the commands, keeping `alignloop --help` fast.
"""

import json
import logging
import sys
from pathlib import Path

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "schemas"


def add_commands(sub) -> None:
    kafka = sub.add_parser("kafka", help="Apache Kafka (KRaft) on loopback: up, down, cluster-up, cluster-down, topics",
                           description="Runs brokers assembled from Maven Central jars; state under ALIGNLOOP_HOME/kafka.")
    ksub = kafka.add_subparsers(dest="kafka_command", required=True, metavar="COMMAND")

    p = ksub.add_parser("up", help="start the single-node broker (idempotent) and create the topics")
    p.add_argument("--port", type=int, default=9092, help="client port on 127.0.0.1 (default 9092)")
    p.add_argument("--controller-port", type=int, default=None, help="KRaft controller port (default port+1)")
    p.add_argument("--heap", default="512m", help="JVM heap, e.g. 512m (default)")
    p.set_defaults(func=_kafka_up)

    p = ksub.add_parser("down", help="stop the single-node broker (its data stays)")
    p.set_defaults(func=_kafka_down)

    p = ksub.add_parser("cluster-up", help="start an N-node cluster for drills (replication 3, min.insync.replicas 2)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=19092, help="node i listens on base-port+i-1 (default 19092)")
    p.add_argument("--heap", default="512m")
    p.set_defaults(func=_cluster_up)

    p = ksub.add_parser("cluster-down", help="stop the drill cluster")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base-port", type=int, default=19092)
    p.set_defaults(func=_cluster_down)

    p = ksub.add_parser("topics", help="create the event topics on a running broker, if missing")
    p.add_argument("--bootstrap", default=None, help="default: ALIGNLOOP_KAFKA or 127.0.0.1:9092")
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--replication", type=int, default=1)
    p.add_argument("--min-insync-replicas", type=int, default=1)
    p.add_argument("--retention-hours", type=float, default=14 * 24)
    p.set_defaults(func=_kafka_topics)

    feedback = sub.add_parser("feedback", help="the feedback stream: dataset snapshots, event schemas")
    fsub = feedback.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")

    p = fsub.add_parser("snapshot", help="consume both topics into a new versioned dataset under --out",
                        description="Parquet tables + images, deduped by event_id; offsets are committed only "
                                    "after the version is durably written. Resumes where the last version ended.")
    p.add_argument("--out", type=Path, required=True, help="dataset folder; versions appear as v000001, ...")
    p.add_argument("--bootstrap", default=None, help="default: ALIGNLOOP_KAFKA or 127.0.0.1:9092")
    p.add_argument("--images", default=None, help="image store URL (default: file://ALIGNLOOP_HOME/images)")
    p.add_argument("--topic-prefix", default="", help="read <prefix>alignloop.generations / <prefix>alignloop.feedback")
    p.add_argument("--group", default=None, help="consumer group (default: one derived from --out)")
    p.add_argument("--every", type=int, default=10_000, help="cut a version every N new events (default 10000)")
    p.add_argument("--follow", action="store_true", help="keep consuming; cut a version every --every-seconds")
    p.add_argument("--every-seconds", type=float, default=60.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_snapshot)

    p = fsub.add_parser("schemas", help="write the JSON Schemas of the events (deploy/schemas by default)")
    p.add_argument("--out", type=Path, default=SCHEMAS_DIR)
    p.set_defaults(func=_schemas)


def add_benchmarks(bench_sub) -> None:
    p = bench_sub.add_parser("feedback", help="our producer vs a bare kafka-python producer: events/s, latency",
                             description="Uses --bootstrap, else the broker at ALIGNLOOP_KAFKA if it answers, else "
                                         "starts a throwaway broker.")
    p.add_argument("--quick", action="store_true", help="2,000 events, 1 round (default 10,000 events, 3 rounds)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--events", type=int, default=None)
    p.add_argument("--bootstrap", default=None)
    p.set_defaults(func=_bench)


def _quiet_kafka_client() -> None:
    # kafka-python logs every refused connection at ERROR; these commands report failures themselves.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


def _user_errors(fn):
    """BrokerError and SnapshotError become alignloop.cli.UserFacingError: a message, no traceback."""

    def wrapper(args):
        from alignloop.cli import UserFacingError
        from alignloop.feedback.broker import BrokerError
        from alignloop.feedback.snapshot import SnapshotError

        _quiet_kafka_client()
        try:
            return fn(args)
        except (BrokerError, SnapshotError) as err:
            raise UserFacingError(str(err)) from err

    return wrapper


@_user_errors
def _kafka_up(args):
    from alignloop.feedback import broker

    was_running = broker.cluster_for(1, args.port, args.controller_port).running()
    cluster = broker.up(port=args.port, controller_port=args.controller_port, heap=args.heap)
    state = "already running" if was_running else "started"
    print(f"kafka {state} at {cluster.bootstrap} (state in {cluster.state_dir})")


@_user_errors
def _kafka_down(args):
    from alignloop.feedback import broker

    cluster = broker.down()
    print(f"kafka stopped (data kept in {cluster.state_dir})")


@_user_errors
def _cluster_up(args):
    from alignloop.feedback import broker

    cluster = broker.cluster_up(nodes=args.nodes, base_port=args.base_port, heap=args.heap)
    print(f"kafka cluster of {args.nodes} nodes at {cluster.bootstrap} (state in {cluster.state_dir})")


@_user_errors
def _cluster_down(args):
    from alignloop.feedback import broker

    cluster = broker.cluster_down(nodes=args.nodes, base_port=args.base_port)
    print(f"kafka cluster stopped (data kept in {cluster.state_dir})")


def _answering_bootstrap(given):
    """--bootstrap or the configured broker, refused with a hint when nothing answers there."""
    from alignloop.feedback import broker
    from alignloop.settings import kafka_bootstrap

    bootstrap = given or kafka_bootstrap()
    if not broker.reachable(bootstrap):
        raise broker.BrokerError(f"no Kafka broker answers at {bootstrap}; start one with `alignloop kafka up`")
    return bootstrap


@_user_errors
def _kafka_topics(args):
    from alignloop.feedback import broker
    from alignloop.feedback.config import TopicSettings, Topics

    bootstrap = _answering_bootstrap(args.bootstrap)
    settings = TopicSettings(partitions=args.partitions, replication=args.replication,
                             min_insync_replicas=args.min_insync_replicas,
                             retention_ms=int(args.retention_hours * 3600 * 1000))
    topics = Topics()
    broker.create_topics(bootstrap, topics, settings)
    print(f"topics {topics.generations}, {topics.feedback} present at {bootstrap}")


@_user_errors
def _snapshot(args):
    from alignloop.feedback.config import Topics
    from alignloop.feedback.image_store import ImageStore
    from alignloop.feedback.snapshot import SnapshotWriter

    bootstrap = _answering_bootstrap(args.bootstrap)
    writer = SnapshotWriter(args.out, bootstrap, ImageStore(args.images), Topics().prefixed(args.topic_prefix),
                            group_id=args.group)
    try:
        newest = writer.run(follow=args.follow, every_events=args.every, every_s=args.every_seconds,
                            progress=not args.no_progress)
    finally:
        writer.close()
    if newest is None:
        print("no events yet; no snapshot written")
    else:
        counts = json.loads((newest / "manifest.json").read_text())["counts"]
        print(f"snapshot {newest}: {counts['images']} images, {counts['votes']} votes, "
              f"{counts['rejected']} malformed events skipped")


def _schemas(args):
    from alignloop.events import json_schemas

    args.out.mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (args.out / name).write_text(json.dumps(schema, indent=2) + "\n")
        print(args.out / name)


@_user_errors
def _bench(args):
    from alignloop.feedback import bench

    events = args.events or (2_000 if args.quick else 10_000)
    result = bench.run(args.bootstrap, events=events, rounds=1 if args.quick else 3)
    if not args.json:
        for name in ("bare", "ours"):
            r = result[name]
            print(f"{name:>5}: {r['events_per_s']:>9.1f} events/s  produce p50 {r['produce_latency_ms']['p50']} ms  "
                  f"p99 {r['produce_latency_ms']['p99']} ms  call p99 {r['call_blocked_ms']['p99']} ms",
                  file=sys.stderr)
        print(f"ratio (ours / bare events/s): {result['ratio']}", file=sys.stderr)
    print(json.dumps(result))
