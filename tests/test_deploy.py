"""The deploy/ folder against the code it deploys: no cluster, no docker, only what can be checked by reading.

Every manifest parses; every setting a manifest names is one the code reads; the ports and probe paths are the
service's; every command a manifest or script runs parses with the `alignloop` CLI; the bentofile is valid for
BentoML 1.4 and its service imports; the Kafka resources carry the project's topics at replication 3.
"""

import argparse
import dataclasses
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from alignloop.cli import build_parser
from alignloop.feedback.config import Topics
from alignloop.serving.config import ENV_PREFIX, ServingConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NIGHTLY = DEPLOY / "trainer" / "nightly.sh"
CRON = DEPLOY / "cron" / "alignloop-nightly.cron"
CODE_DIRS = ("alignloop", "serving", "feedback", "trainer", "kernels")

# Variables the manifests may set that alignloop does not read itself, each with who does.
THIRD_PARTY_ENV = {
    "BENTOML_DO_NOT_TRACK": "BentoML (no usage reports)",
    "HF_HUB_OFFLINE": "huggingface_hub (alignloop/models.py reads it too)",
    "CRON_TZ": "cron", "SHELL": "cron", "PATH": "cron and the shell",
}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> list[dict]:
    return [d for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for d in _docs(path)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _k8s() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs() -> list[tuple[str, dict]]:
    """(workload name, pod spec) of every workload."""
    specs = []
    for d in _k8s():
        if d["kind"] in ("StatefulSet", "Deployment"):
            specs.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            specs.append((d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def _containers():
    return [(name, c) for name, spec in _pod_specs() for c in spec["containers"]]


def _serving_container() -> dict:
    (container,) = _one("StatefulSet", "alignloop-serving")["spec"]["template"]["spec"]["containers"]
    return container


def _config_map() -> dict:
    return _one("ConfigMap", "alignloop-config")["data"]


def _env_read_by_code() -> set[str]:
    """The ALIGNLOOP_* variables the code reads: literals in the source, the secrets by the names load_secret is
    called with (ALIGNLOOP_<NAME>), and ServingConfig's fields (ALIGNLOOP_SERVE_<FIELD>, serving/config.py)."""
    names, secrets = set(), set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            names |= {n for n in re.findall(r'"(ALIGNLOOP_[A-Z0-9_]+)"', text) if not n.endswith("_")}
            secrets |= set(re.findall(r'load_secret\("(\w+)"\)', text))
    names |= {f"ALIGNLOOP_{s.upper()}" for s in secrets}
    names |= {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServingConfig)}
    return names


def _secret_env_names() -> set[str]:
    names = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            names |= {f"ALIGNLOOP_{s.upper()}" for s in re.findall(r'load_secret\("(\w+)"\)', path.read_text())}
    return names


def _cron_env() -> dict[str, str]:
    env = {}
    for line in CRON.read_text().splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


# -- parsing -----------------------------------------------------------------------------------------------------

def test_every_yaml_file_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert _docs(path), f"{path} is empty"
    for d in _k8s():
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert d["metadata"].get("name"), d


def test_kustomization_lists_every_manifest():
    listed = set(_docs(K8S / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_no_secret_value_is_in_the_repository():
    assert not [d for d in _k8s() if d["kind"] == "Secret"], "secrets come from `kubectl create secret`, not the repo"
    secret_names = _secret_env_names()
    assert secret_names == {"ALIGNLOOP_FEEDBACK_TOKEN_KEY", "ALIGNLOOP_USER_HASH_KEY", "ALIGNLOOP_ANON_COOKIE_KEY",
                            "ALIGNLOOP_ADMIN_TOKEN"}
    assert not secret_names & set(_config_map()) and not secret_names & set(_cron_env())
    for workload, container in _containers():
        for env in container.get("env", []):
            if env["name"] in secret_names:
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "alignloop-secrets", workload


def test_every_serving_replica_gets_every_secret_from_the_secret():
    given = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _serving_container()["env"] if "valueFrom" in e}
    assert set(given) == _secret_env_names()
    assert all(ref["name"] == "alignloop-secrets" and not ref.get("optional") for ref in given.values())


# -- settings the code reads --------------------------------------------------------------------------------------

def test_every_variable_a_manifest_sets_is_read_by_the_code():
    known = _env_read_by_code()
    nightly_reads = set(re.findall(r"\$\{?(NIGHTLY_[A-Z_]+)", NIGHTLY.read_text()))
    named = set(_config_map()) | set(_cron_env())
    named |= {e["name"] for _, c in _containers() for e in c.get("env", [])}
    for name in sorted(named):
        if name.startswith("ALIGNLOOP_"):
            assert name in known, f"{name}: no code reads it"
        elif name.startswith("NIGHTLY_"):
            assert name in nightly_reads, f"{name}: deploy/trainer/nightly.sh does not read it"
        else:
            assert name in THIRD_PARTY_ENV, f"{name}: who reads it?"
    # The script's own ALIGNLOOP_* references too.
    for name in set(re.findall(r"\$\{?(ALIGNLOOP_[A-Z0-9_]+)", NIGHTLY.read_text())):
        assert name in known, f"nightly.sh reads {name}, which the code does not"


def test_the_shared_settings_use_the_names_the_code_reads():
    data = _config_map()
    # alignloop/settings.py, alignloop/registry.py, feedback/config.py; serving falls back to them when its own
    # registry / image_store / kafka_bootstrap fields are "" (serving/config.py), so one name serves every pod.
    for name in ("ALIGNLOOP_HOME", "ALIGNLOOP_KAFKA", "ALIGNLOOP_REGISTRY", "ALIGNLOOP_IMAGE_STORE"):
        assert name in data
    assert data["ALIGNLOOP_REGISTRY"].startswith(("s3://", "gs://"))
    assert data["ALIGNLOOP_IMAGE_STORE"].startswith(("s3://", "gs://"))
    for field in ("registry", "image_store", "kafka_bootstrap"):
        assert getattr(ServingConfig(), field) == ""


def test_the_serving_variables_make_a_valid_serving_config():
    serve = {k: v for k, v in _config_map().items() if k.startswith(ENV_PREFIX)}
    config = ServingConfig.from_env(serve)
    assert config.device == "cuda" and config.workers == 1
    assert config.generator.startswith("/models/") and config.clip_checkpoint.startswith("/models/")


# -- ports and probes ---------------------------------------------------------------------------------------------

def _serve_args(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)  # the serve command's default port reads $PORT
    container = _serving_container()
    assert container["args"][0] == "alignloop"
    return _strict(build_parser()).parse_args(container["args"][1:]), build_parser().parse_args(["serve"])


def test_serving_listens_where_the_manifests_send_traffic(monkeypatch):
    args, defaults = _serve_args(monkeypatch)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert args.port == defaults.port == 3000
    (port,) = _serving_container()["ports"]
    assert port["containerPort"] == args.port
    for name in ("alignloop-serving", "alignloop-serving-pods"):
        service = _one("Service", name)
        assert service["spec"]["ports"][0]["targetPort"] == port["name"]
        labels = _one("StatefulSet", "alignloop-serving")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    annotations = _one("StatefulSet", "alignloop-serving")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.port and annotations["prometheus.io/path"] == "/metrics"


def test_probes_ask_the_paths_the_service_serves():
    from bentoml._internal.server.base_app import BaseAppFactory
    import inspect

    served = set(re.findall(r'"(/livez|/readyz)"', inspect.getsource(BaseAppFactory)))
    assert served == {"/livez", "/readyz"}
    container = _serving_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    # The service's readiness is its own: 503 until the worker's models are loaded and warm.
    service = importlib.import_module("alignloop.serving.service")
    assert hasattr(service.AlignLoop.inner, "__is_ready__")


def test_the_autoscaler_scales_the_serving_set():
    hpa = _one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "alignloop-serving")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    gpus = _serving_container()["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 1 and ServingConfig.from_env(_config_map()).workers == 1  # one worker, one GPU per replica


# -- commands -----------------------------------------------------------------------------------------------------

def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI's parser without prefix matching, so that a misspelt flag (--no-progres) does not pass."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


def _parses(argv: list[str]) -> None:
    try:
        _strict(build_parser()).parse_args(argv)
    except SystemExit as exit_:
        raise AssertionError(f"`alignloop {shlex.join(argv)}` does not parse") from exit_


def _script_commands(text: str) -> list[list[str]]:
    """Every `alignloop ...` line of a shell script, split as the shell would (variables left as they are)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("exec ")
        if line.startswith("alignloop "):
            commands.append(shlex.split(line)[1:])
    return commands


def test_every_command_a_manifest_runs_parses():
    ran = 0
    for workload, container in _containers():
        args = container.get("command", []) + container.get("args", [])
        if args[0] == "alignloop":
            _parses(args[1:])
            ran += 1
        else:  # a script from the image: it must be one the Bento includes
            assert args[:2] == ["bash", "src/deploy/trainer/nightly.sh"], workload
    assert ran == 2  # serving and the guardrail


def test_every_command_the_nightly_script_runs_parses():
    commands = _script_commands(NIGHTLY.read_text())
    assert [c[0] for c in commands] == ["nightly"]
    values = {"${NIGHTLY_CANARY_SHARE:-0.1}": "0.1", "${NIGHTLY_NPROC_PER_NODE:-1}": "1"}
    assert set(values) <= set(commands[0])
    for method in ("rwr", "ppo", "refl", "kto"):
        _parses([method if a == "${NIGHTLY_METHOD:-refl}" else values.get(a, a) for a in commands[0]])


def test_the_cron_entry_runs_the_nightly_script():
    (entry,) = [line for line in CRON.read_text().splitlines() if re.match(r"^\d", line)]
    fields = entry.split(None, 5)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    assert [w for w in fields[5].split() if w.endswith("/deploy/trainer/nightly.sh")], fields[5]
    assert _one("CronJob")["spec"]["schedule"] == " ".join(fields[:5])


def test_the_nightly_job_never_overlaps_and_keeps_its_state():
    job = _one("CronJob", "alignloop-nightly")["spec"]
    assert job["concurrencyPolicy"] == "Forbid"
    (container,) = job["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in job["jobTemplate"]["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[env["ALIGNLOOP_HOME"]]]  # resumable across nights
    # One fine-tuning process per GPU (torchrun), and the requested GPUs are the ones it may use
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env["NIGHTLY_NPROC_PER_NODE"]) == gpus == container["resources"]["requests"]["nvidia.com/gpu"]
    assert "--nproc-per-node" in _script_commands(NIGHTLY.read_text())[0]
    from alignloop.trainer.config import METHOD_CONFIGS, NightlyConfig
    from alignloop.trainer.finetune import check_world_size

    NightlyConfig(method=env["NIGHTLY_METHOD"], canary_share=float(env["NIGHTLY_CANARY_SHARE"]), nproc_per_node=gpus)
    check_world_size(METHOD_CONFIGS[env["NIGHTLY_METHOD"]](), gpus)  # its default batches split over the GPUs


# -- the image ----------------------------------------------------------------------------------------------------

def _bentofile() -> dict:
    return _docs(DEPLOY / "bentofile.yaml")[0]


def test_bentofile_is_valid_for_bentoml():
    from bentoml._internal.bento.build_config import BentoBuildConfig

    with open(DEPLOY / "bentofile.yaml") as f:
        config = BentoBuildConfig.from_yaml(f)  # unknown keys, distro, python version are checked here
    assert config.docker.distro == "debian" and config.docker.python_version == "3.11"


def test_bentofile_service_is_the_one_serve_runs_and_imports():
    from alignloop.serving.cli import SERVICE

    service = _bentofile()["service"]
    assert service == SERVICE
    module, _, name = service.partition(":")
    assert getattr(importlib.import_module(module), name).name == "alignloop"


def test_bentofile_installs_the_package_with_its_pinned_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = _bentofile()["python"]
    assert python["packages"] == project["dependencies"] + ["s3fs==2026.9.0"]
    (wheel,) = python["wheels"]
    assert Path(wheel).name == f"{project['name']}-{project['version']}-py3-none-any.whl"
    for pattern in _bentofile()["include"]:
        assert list(ROOT.glob(pattern)), f"include {pattern!r} matches nothing"
        assert not pattern.startswith(CODE_DIRS), "the code comes from the wheel; a copy would shadow it"


# -- Kafka --------------------------------------------------------------------------------------------------------

def test_kafka_is_kraft_with_three_brokers_and_three_controllers():
    kafka = _one("Kafka")
    name = kafka["metadata"]["name"]
    pools = [d for d in _k8s() if d["kind"] == "KafkaNodePool"]
    assert all(p["metadata"]["labels"]["strimzi.io/cluster"] == name for p in pools)
    roles = {role: sum(p["spec"]["replicas"] for p in pools if role in p["spec"]["roles"]) for role in
             ("broker", "controller")}
    assert roles == {"broker": 3, "controller": 3}
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == config["offsets.topic.replication.factor"] == 3
    assert config["min.insync.replicas"] == 2
    assert "zookeeper" not in kafka["spec"]
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert _config_map()["ALIGNLOOP_KAFKA"] == f"{name}-kafka-bootstrap:{listener['port']}"


def test_kafka_topics_are_the_projects_two_at_replication_three():
    topics = [d for d in _k8s() if d["kind"] == "KafkaTopic"]
    assert sorted(t["spec"]["topicName"] for t in topics) == sorted([Topics().generations, Topics().feedback])
    for topic in topics:
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == _one("Kafka")["metadata"]["name"]
        assert spec["replicas"] == 3 and spec["config"]["min.insync.replicas"] == 2
        assert spec["partitions"] >= 3


@pytest.mark.parametrize("path", ["deploy/trainer/nightly.sh"])
def test_scripts_are_executable(path):
    assert (ROOT / path).stat().st_mode & 0o111
