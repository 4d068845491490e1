"""Run Apache Kafka (KRaft mode) on loopback from jars fetched off Maven Central: a single node or a cluster.

The one place that starts and stops brokers: `alignloop kafka up/down/cluster-up/cluster-down` and the pytest
fixtures (tests/kafka_fixtures.py) call these functions.

    cluster = up()                       # single node on 127.0.0.1:9092, topics created; idempotent
    cluster = cluster_up(nodes=3)        # 127.0.0.1:19092-19094, replication 3, min.insync.replicas 2
    cluster.bootstrap                    # "127.0.0.1:9092"
    down() / cluster_down()

1. Jars: `mvn dependency:copy-dependencies` on deploy/kafka/pom.xml, once, into
   <ALIGNLOOP_CACHE>/kafka-<pom hash>/libs (outside the clone; a changed pom gets a fresh folder).
2. Config: deploy/kafka/server.properties rendered per node into <state dir>/node-<id>/.
3. Storage: `kafka.tools.StorageTool format`: `--standalone` for one node; for a cluster every node is
   formatted with the same `--initial-controllers` list (node id, controller endpoint, directory id).
4. Start `kafka.Kafka` detached (it outlives the CLI), pid in node-<id>/pid, output in node-<id>/broker.log.
5. Ready when every node is registered and unfenced; then topics are created (explicit partitions,
   replication and retention).

State (data, pid files, logs) lives under <ALIGNLOOP_HOME>/kafka/<name>, never in the clone.
"""

import base64
import fcntl
import hashlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from alignloop.feedback.config import TopicSettings, Topics, cache_root
from alignloop.settings import home

log = logging.getLogger(__name__)

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"
SINGLE = "single"
CLUSTER = "cluster"


class BrokerError(RuntimeError):
    """Something a person must fix (no Java, no Maven, a port in use); the message says what."""


# -- 1. jars ----------------------------------------------------------------------------------------------


def libs_dir() -> Path:
    """The broker's classpath folder, fetched with Maven on first use (about 45 MB)."""
    pom = DEPLOY_DIR / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    target = cache_root() / f"kafka-{digest}" / "libs"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel first runs (CLI and tests) fetch once
        if (target / ".complete").exists():
            return target
        if shutil.which("mvn") is None:
            raise BrokerError("Maven (mvn) is needed once to fetch Apache Kafka's jars; install it (apt-get install "
                              "maven) or put the jars of deploy/kafka/pom.xml into " + str(target))
        staging = target.parent / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        log.info("fetching Apache Kafka jars with Maven into %s", target)
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", "-DincludeScope=runtime",
             f"-DoutputDirectory={staging}"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise BrokerError(f"mvn could not fetch Kafka's jars (exit {result.returncode}):\n"
                              f"{(result.stdout + result.stderr)[-3000:]}")
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("Java 17+ is needed to run the Kafka broker; install it (apt-get install openjdk-17-jre)")
    return java


# -- 2-4. nodes -------------------------------------------------------------------------------------------


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    dir: Path
    heap: str = "512m"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def controller(self) -> str:
        return f"{self.node_id}@127.0.0.1:{self.controller_port}"

    @property
    def properties(self) -> Path:
        return self.dir / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.dir / "broker.log"

    def pid(self) -> int | None:
        """The running broker's pid, or None. A pid is trusted only if that process runs this node's config."""
        try:
            pid = int((self.dir / "pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
            return None
        if state == "Z":
            return None
        # The cmdline reads empty for a moment while the java launcher re-executes itself: still starting.
        return pid if not cmdline or str(self.properties).encode() in cmdline else None

    def render(self, quorum: str, replication: int, min_insync: int) -> None:
        template = Template((DEPLOY_DIR / "server.properties").read_text())
        self.dir.mkdir(parents=True, exist_ok=True)
        self.properties.write_text(template.substitute(
            node_id=self.node_id, port=self.port, controller_port=self.controller_port, quorum=quorum,
            data_dir=self.dir / "data", replication=replication, min_insync=min_insync,
        ))

    def format(self, cluster_id: str, initial_controllers: str | None) -> None:
        """Format KRaft storage once; a formatted data dir (meta.properties) is left alone."""
        if (self.dir / "data" / "meta.properties").exists():
            return
        quorum_args = ["--initial-controllers", initial_controllers] if initial_controllers else ["--standalone"]
        result = subprocess.run(
            _jvm(self, "kafka.tools.StorageTool", heap="256m")
            + ["format", "-t", cluster_id, "-c", str(self.properties), *quorum_args],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage for node {self.node_id} failed:\n{result.stdout[-2000:]}"
                              f"{result.stderr[-2000:]}")

    def start(self) -> None:
        if self.pid() is not None:
            return
        for port in (self.port, self.controller_port):
            if _port_open(port):
                raise BrokerError(f"port {port} is in use by another program; stop it or choose other ports")
        with open(self.log_file, "ab") as out:
            process = subprocess.Popen(
                _jvm(self, "kafka.Kafka", heap=self.heap) + [str(self.properties)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI that started it, and its Ctrl-C
            )
        (self.dir / "pid").write_text(str(process.pid))

    def stop(self, timeout_s: float = 30) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL if it takes longer than timeout_s."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        if not _wait_exit(pid, timeout_s):
            log.warning("node %d did not stop within %.0fs; killing it", self.node_id, timeout_s)
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault drills)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_exit(pid, 10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _jvm(node: Node, main: str, heap: str) -> list[str]:
    return [
        _java(),
        f"-Xmx{heap}", "-Xms64m",
        # Serial GC and the C1 compiler only: on a 2-core machine shared with model training, they start the
        # broker in a few seconds and leave the cores to others; loopback throughput does not need C2.
        "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={DEPLOY_DIR / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={node.dir}",
        "-cp", str(libs_dir() / "*"),
        main,
    ]


def _port_open(port: int) -> bool:
    return reachable(f"127.0.0.1:{port}")


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # Reap it if it is our child (fixtures), so it does not linger as a zombie that still "exists".
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


# -- 5. a set of nodes ------------------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: list[Node]
    state_dir: Path
    topic_settings: TopicSettings

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> Node:
        return next(node for node in self.nodes if node.node_id == node_id)

    def start(self, timeout_s: float = 120) -> None:
        """Start every node that is not running and wait until all are registered and unfenced."""
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def running(self) -> bool:
        return all(node.pid() is not None for node in self.nodes)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.pid() is None:
                    raise BrokerError(f"Kafka node {node.node_id} exited while starting; its log "
                                      f"({node.log_file}) ends with:\n{node.log_tail()}")
            if not all(_port_open(node.port) for node in self.nodes):
                time.sleep(0.3)  # still booting; asking Kafka now would only log connection errors
                continue
            try:
                with _admin(self.bootstrap) as admin:
                    brokers = admin.describe_cluster()["brokers"]
                live = [b for b in brokers if not b.get("is_fenced")]
                if len(live) == len(self.nodes):
                    return
                last_error = f"{len(live)} of {len(self.nodes)} brokers registered"
            except KafkaError as err:
                last_error = repr(err)
            time.sleep(0.5)
        raise BrokerError(f"Kafka at {self.bootstrap} not ready after {timeout_s:.0f}s ({last_error}); see the logs "
                          f"in {self.state_dir}")

    def create_topics(self, topics: Topics = Topics(), settings: TopicSettings | None = None) -> Topics:
        """Create both topics if missing (explicit partitions, replication, retention); returns `topics`."""
        settings = settings or self.topic_settings
        create_topics(self.bootstrap, topics, settings)
        return topics

    def leader(self, topic: str, partition: int = 0) -> Node:
        """The node leading one partition now (for drills that kill it)."""
        with _admin(self.bootstrap) as admin:
            described = admin.describe_topics([topic])[0]
        info = next(p for p in described["partitions"] if p["partition_index"] == partition)
        return self.node(info["leader_id"])


def create_topics(bootstrap: str, topics: Topics, settings: TopicSettings) -> None:
    configs = {"retention.ms": str(settings.retention_ms), "min.insync.replicas": str(settings.min_insync_replicas)}
    spec = {
        name: {"num_partitions": settings.partitions, "replication_factor": settings.replication, "configs": configs}
        for name in (topics.generations, topics.feedback)
    }
    with _admin(bootstrap) as admin:
        existing = set(admin.list_topics())
        missing = {name: options for name, options in spec.items() if name not in existing}
        if missing:
            try:
                admin.create_topics(missing, wait_for_metadata=True)
            except TopicAlreadyExistsError:  # created concurrently by another `up`
                pass


def delete_topics(bootstrap: str, topics: Topics) -> None:
    with _admin(bootstrap) as admin:
        admin.delete_topics([topics.generations, topics.feedback])


def reachable(bootstrap: str, timeout_s: float = 0.2) -> bool:
    """Whether any of the comma-separated servers accepts a TCP connection."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
            return True
        except OSError:
            continue
    return False


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60) -> list:
    """Every record of `topic` from the beginning up to its end offsets now, as kafka-python ConsumerRecords
    (the tests' and the load tests' count of what really reached the broker)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            raise BrokerError(f"topic {topic} does not exist on {bootstrap}")
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic} timed out after {timeout_s} s")
            for batch in consumer.poll(timeout_ms=500).values():
                records += batch
        return records
    finally:
        consumer.close()


# Below Linux's ephemeral range (32768-60999): the kernel never hands these to outgoing connections, so a port
# found free here stays free until the broker binds it (an ephemeral one was seen taken in between).
_FIXED_PORTS = (20000, 32000)


def free_port(offsets=(0,)) -> int:
    """A loopback port base such that base + each offset is free now (for fixtures and throwaway brokers)."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(*_FIXED_PORTS)
        if all(_bindable(base + offset) for offset in offsets):
            return base
    raise BrokerError(f"no free loopback ports in {_FIXED_PORTS} for offsets {offsets}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class _admin:
    """KafkaAdminClient as a context manager, with short timeouts: callers poll."""

    def __init__(self, bootstrap: str):
        self.client = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=10_000,
                                       bootstrap_timeout_ms=3_000, client_id="alignloop-admin")

    def __enter__(self) -> KafkaAdminClient:
        return self.client

    def __exit__(self, *exc):
        self.client.close()


# -- entry points -----------------------------------------------------------------------------------------


def state_dir(name: str) -> Path:
    return home() / "kafka" / name


def cluster_for(
    nodes: int = 1, base_port: int = 9092, controller_base_port: int | None = None, path: Path | None = None,
    heap: str = "512m",
) -> Cluster:
    """Describe a cluster (ports, dirs, topic settings) without starting it."""
    path = Path(path or state_dir(SINGLE if nodes == 1 else CLUSTER))
    controller_base_port = controller_base_port or base_port + (1 if nodes == 1 else 100)
    members = [
        Node(node_id=i + 1, port=base_port + i, controller_port=controller_base_port + i, dir=path / f"node-{i + 1}",
             heap=heap)
        for i in range(nodes)
    ]
    # One node cannot replicate; three tolerate one failure with acks=all (min.insync.replicas 2).
    replication = min(nodes, 3)
    settings = TopicSettings(replication=replication, min_insync_replicas=max(1, replication - 1))
    return Cluster(nodes=members, state_dir=path, topic_settings=settings)


def start(cluster: Cluster, topics: Topics | None = Topics(), timeout_s: float = 120) -> Cluster:
    """Render, format (once) and start every node, wait until ready, create topics. Idempotent."""
    cluster.state_dir.mkdir(parents=True, exist_ok=True)
    with open(cluster.state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `up`s at once must not format or start twice
        if not cluster.running():
            libs_dir()
            quorum = ",".join(f"127.0.0.1:{node.controller_port}" for node in cluster.nodes)
            settings = cluster.topic_settings
            for node in cluster.nodes:
                node.render(quorum, settings.replication, settings.min_insync_replicas)
            cluster_id = _cluster_id(cluster.state_dir)
            initial = _initial_controllers(cluster) if len(cluster.nodes) > 1 else None
            for node in cluster.nodes:
                node.format(cluster_id, initial)
            for node in cluster.nodes:
                node.start()
        cluster.wait_ready(timeout_s)
        if topics is not None:
            cluster.create_topics(topics)
    return cluster


def stop(cluster: Cluster) -> None:
    cluster.stop()


def up(port: int = 9092, controller_port: int | None = None, path: Path | None = None, heap: str = "512m",
       topics: Topics | None = Topics(), timeout_s: float = 120) -> Cluster:
    """Start (or find running) the single-node broker; returns it."""
    return start(cluster_for(1, port, controller_port, path, heap), topics, timeout_s)


def down(port: int = 9092, path: Path | None = None) -> Cluster:
    cluster = cluster_for(1, port, path=path)
    stop(cluster)
    return cluster


def cluster_up(nodes: int = 3, base_port: int = 19092, path: Path | None = None, heap: str = "512m",
               topics: Topics | None = Topics(), timeout_s: float = 180) -> Cluster:
    if nodes < 3:
        raise BrokerError(f"a cluster needs at least 3 nodes (replication 3, min.insync.replicas 2); got {nodes}")
    return start(cluster_for(nodes, base_port, path=path, heap=heap), topics, timeout_s)


def cluster_down(nodes: int = 3, base_port: int = 19092, path: Path | None = None) -> Cluster:
    cluster = cluster_for(nodes, base_port, path=path)
    stop(cluster)
    return cluster


def _cluster_id(path: Path) -> str:
    """One id per state dir, kept so a restarted node rejoins the cluster it was formatted for."""
    file = path / "cluster.id"
    if not file.exists():
        file.write_text(_kafka_uuid())
    return file.read_text().strip()


def _initial_controllers(cluster: Cluster) -> str:
    """`id@host:port:directory-id` for each node: the voters of a dynamic (KIP-853) quorum."""
    entries = []
    for node in cluster.nodes:
        dir_id_file = node.dir / "directory.id"
        if not dir_id_file.exists():
            dir_id_file.write_text(_kafka_uuid())
        entries.append(f"{node.controller}:{dir_id_file.read_text().strip()}")
    return ",".join(entries)


def _kafka_uuid() -> str:
    """Kafka's textual Uuid: 16 random bytes, URL-safe base64 without padding (and not starting with '-')."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text
