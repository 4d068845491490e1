"""The artifact registry: versions visible only when complete, distinct numbers under concurrency, one live per
kind with its history, checksums verified on fetch, clear errors, and the `alignloop registry` commands."""

import hashlib
import json
import subprocess
import sys
import threading
import uuid
from datetime import datetime

import pytest

from alignloop.cli import main
from alignloop.errors import UserFacingError
from alignloop.registry import Manifest, Registry, RegistryError, default_registry_url


pytestmark = pytest.mark.usefixtures("own_registry_home")


@pytest.fixture
def url(registry_url):
    return registry_url


def _publish(reg, payload=b"weights", **changes):
    fields = dict(kind="reward", files={"head.safetensors": payload}, who="trainer", why="gate: 0.81 > 0.78")
    return reg.publish(**{**fields, **changes})


def _corrupt(reg, kind, version, name, data=b"flipped bits"):
    reg.fs.pipe_file(f"{reg.root}/{kind}/{version}/{name}", data)


# -- round trip ---------------------------------------------------------------------------------------------


def test_publish_list_get_fetch_round_trip(url, tmp_path):
    reg = Registry(url)
    config_file = tmp_path / "config.json"
    config_file.write_bytes(b'{"hidden": 256}')
    m = reg.publish(kind="reward", files={"head.safetensors": b"\x00\x01weights", "config.json": config_file},
                    base={"clip": "shapes-clip-tiny", "clip_hash": "ab12"},
                    data={"snapshot_version": 3, "offsets": {"alignloop.feedback": {"0": 120}}},
                    config={"lr": 1e-3, "layers": [64, 32]}, metrics={"pref_acc": 0.81, "clip_baseline": 0.74},
                    who="trainer", why="gate: 0.81 > 0.78")

    assert (m.version, m.kind, m.parent, m.state, m.reason) == ("v000001", "reward", None, "candidate",
                                                                "gate: 0.81 > 0.78")
    assert m.created_at.tzinfo is not None
    assert m.files == {"head.safetensors": hashlib.sha256(b"\x00\x01weights").hexdigest(),
                       "config.json": hashlib.sha256(b'{"hidden": 256}').hexdigest()}
    assert [(h.state, h.who, h.why) for h in m.history] == [("candidate", "trainer", "gate: 0.81 > 0.78")]
    assert Manifest.model_validate_json(m.to_json()) == m

    second = _publish(reg, b"better", parent=m.version)
    assert second.version == "v000002" and second.parent == "v000001"
    again = Registry(url)  # a fresh reader sees what the writer published
    assert [v.version for v in again.versions("reward")] == ["v000001", "v000002"]
    assert again.versions("adapter") == []
    assert again.get("reward", "v000001") == m

    folder = again.fetch("reward", "v000001")
    assert (folder / "head.safetensors").read_bytes() == b"\x00\x01weights"
    assert (folder / "config.json").read_bytes() == b'{"hidden": 256}'
    assert Manifest.model_validate_json((folder / "manifest.json").read_text()) == m
    assert again.fetch("reward", "v000001") == folder  # a second fetch answers the same folder


def test_fetch_of_a_local_registry_is_the_version_folder_and_remote_ones_are_cached(tmp_path):
    local = Registry(tmp_path / "registry")
    _publish(local)
    assert local.fetch("reward", "v000001") == tmp_path / "registry" / "reward" / "v000001"

    remote = Registry(f"memory://registry-{uuid.uuid4().hex}")
    _publish(remote)
    folder = remote.fetch("reward", "v000001")
    assert (tmp_path / "home" / "registry-cache") in folder.parents and folder.name == "v000001"


def test_default_url_is_the_environment_else_a_folder_under_home(tmp_path, monkeypatch):
    assert default_registry_url() == str(tmp_path / "home" / "registry")
    assert Registry().url == str(tmp_path / "home" / "registry")
    monkeypatch.setenv("ALIGNLOOP_REGISTRY", "memory://elsewhere")
    assert default_registry_url() == "memory://elsewhere" and Registry().url == "memory://elsewhere"


def test_manifest_is_strict():
    m = _publish(Registry(f"memory://registry-{uuid.uuid4().hex}"))
    fields = json.loads(m.to_json())
    for bad in ({**fields, "extra": 1}, {**fields, "kind": "dataset"}, {**fields, "state": "dead"},
                {**fields, "version": "7"}, {**fields, "created_at": "2026-11-28T07:00:00"},
                {**fields, "files": {"../escape": "0" * 64}}, {**fields, "files": {"a": "not-a-digest"}}):
        with pytest.raises(ValueError):
            Manifest.model_validate_json(json.dumps(bad))
    with pytest.raises(ValueError):
        Manifest(**{**m.model_dump(), "created_at": datetime(2026, 11, 28)})  # naive datetimes are refused


# -- visibility and crashes ---------------------------------------------------------------------------------


def test_a_crash_mid_publish_leaves_no_visible_version_and_the_next_publish_works(url, monkeypatch):
    reg = Registry(url)

    def crash(self, manifest):
        raise OSError("power lost before the manifest was written")

    monkeypatch.setattr(Registry, "_write_manifest", crash)
    with pytest.raises(OSError, match="power lost"):
        _publish(reg, b"half written")
    monkeypatch.undo()

    assert reg.versions("reward") == [] and reg.live("reward") is None
    with pytest.raises(RegistryError, match="no reward version 'v000001' .* it has no complete versions"):
        reg.get("reward", "v000001")
    m = _publish(reg, b"whole")
    assert m.version == "v000002"  # the crashed publish's number is never reused
    assert [v.version for v in reg.versions("reward")] == ["v000002"]
    assert (reg.fetch("reward", "v000002") / "head.safetensors").read_bytes() == b"whole"


def test_a_reader_listing_during_a_publish_never_sees_the_partial_version(url, monkeypatch):
    reg, reader = Registry(url), Registry(url)
    _publish(reg, b"first")
    seen = []
    write_file = Registry._write_file

    def write_and_look(self, path, source):
        digest = write_file(self, path, source)
        seen.append([m.version for m in reader.versions("reward")])  # a file is in place, the manifest is not
        return digest

    monkeypatch.setattr(Registry, "_write_file", write_and_look)
    reg.publish(kind="reward", files={"a.bin": b"a", "b.bin": b"b"}, who="trainer", why="two files")
    assert seen == [["v000001"], ["v000001"]]
    assert [m.version for m in reader.versions("reward")] == ["v000001", "v000002"]


def test_concurrent_publishes_from_threads_get_distinct_versions(url):
    reg = Registry(url)
    errors = []

    def publisher(i):
        try:
            for j in range(3):
                Registry(url).publish(kind="adapter", files={"lora.safetensors": f"{i}-{j}".encode()},
                                      who=f"thread-{i}", why="concurrency test")
        except Exception as err:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = reg.versions("adapter")
    assert [m.version for m in versions] == [f"v{n:06d}" for n in range(1, 19)]
    payloads = {(reg.fetch("adapter", m.version) / "lora.safetensors").read_bytes() for m in versions}
    assert payloads == {f"{i}-{j}".encode() for i in range(6) for j in range(3)}  # nobody overwrote anybody


def test_two_processes_publishing_at_once_get_distinct_versions(tmp_path):
    script = ("import sys\nfrom alignloop.registry import Registry\nreg = Registry(sys.argv[1])\n"
              "for j in range(5):\n"
              "    reg.publish(kind='reward', files={'head.bin': f'{sys.argv[2]}-{j}'.encode()}, who=sys.argv[2], "
              "why='race')\n")
    url = str(tmp_path / "registry")
    procs = [subprocess.Popen([sys.executable, "-c", script, url, name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    reg = Registry(url)
    assert [m.version for m in reg.versions("reward")] == [f"v{n:06d}" for n in range(1, 11)]
    payloads = {(reg.fetch("reward", m.version) / "head.bin").read_bytes() for m in reg.versions("reward")}
    assert payloads == {f"{name}-{j}".encode() for name in "ab" for j in range(5)}


# -- states -------------------------------------------------------------------------------------------------


def test_promoting_retires_the_previous_live_version_and_records_history(url):
    reg = Registry(url)
    v1, v2 = _publish(reg, b"one"), _publish(reg, b"two")
    reg.set_state("reward", v1.version, "live", who="operator", why="first head")
    canary = reg.set_state("reward", v2.version, "canary", who="rollout", why="10% of users")
    assert canary.state == "canary" and reg.live("reward").version == "v000001"

    promoted = reg.set_state("reward", v2.version, "live", who="guardrail", why="thumbs-up 0.62 vs 0.55")
    assert reg.live("reward") == promoted
    assert [(h.state, h.who, h.why) for h in promoted.history] == [
        ("candidate", "trainer", "gate: 0.81 > 0.78"), ("canary", "rollout", "10% of users"),
        ("live", "guardrail", "thumbs-up 0.62 vs 0.55")]
    assert all(h.at.tzinfo is not None for h in promoted.history)
    assert [h.at for h in promoted.history] == sorted(h.at for h in promoted.history)

    retired = reg.get("reward", "v000001")
    assert retired.state == "retired"
    assert retired.reason == "replaced by v000002 as live: thumbs-up 0.62 vs 0.55"
    assert [h.state for h in retired.history] == ["candidate", "live", "retired"]
    assert retired.history[-1].who == "guardrail"
    assert [m.state for m in reg.versions("reward")].count("live") == 1

    # Rolling back is a promotion too.
    reg.set_state("reward", "v000001", "live", who="guardrail", why="rollback: error rate")
    assert reg.live("reward").version == "v000001" and reg.get("reward", "v000002").state == "retired"
    assert reg.get("reward", "v000002").reason == "replaced by v000001 as live: rollback: error rate"


def test_publishing_live_retires_the_previous_live_one(url):
    reg = Registry(url)
    _publish(reg, b"one", state="live")
    second = _publish(reg, b"two", state="live")
    assert reg.live("reward") == second
    assert reg.get("reward", "v000001").state == "retired"
    assert reg.live("adapter") is None  # kinds are independent


def test_after_a_crash_between_promote_and_retire_live_answers_the_newest_promotion(url, monkeypatch):
    reg = Registry(url)
    _publish(reg, b"one")
    _publish(reg, b"two", state="live")
    monkeypatch.setattr(Registry, "_retire_others", lambda self, *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        reg.set_state("reward", "v000001", "live", who="guardrail", why="rollback")
    monkeypatch.undo()

    assert [m.state for m in reg.versions("reward")] == ["live", "live"]
    assert reg.live("reward").version == "v000001"  # the one made live last, not the highest number
    reg.set_state("reward", "v000001", "live", who="operator", why="repair")
    assert [m.state for m in reg.versions("reward")] == ["live", "retired"]


# -- checksums ----------------------------------------------------------------------------------------------


def test_fetch_refuses_a_corrupted_file_naming_it(url):
    reg = Registry(url)
    _publish(reg, b"good weights")
    _corrupt(reg, "reward", "v000001", "head.safetensors")
    with pytest.raises(RegistryError, match=r"reward v000001: file 'head.safetensors' in .* is corrupt \(sha256 "):
        reg.fetch("reward", "v000001")


def test_fetch_refuses_a_missing_file(url):
    reg = Registry(url)
    reg.publish(kind="adapter", files={"lora.safetensors": b"w", "extra.json": b"{}"}, who="t", why="w")
    reg.fs.rm(f"{reg.root}/adapter/v000001/extra.json")
    with pytest.raises(RegistryError, match="adapter v000001: file 'extra.json' is missing from"):
        reg.fetch("adapter", "v000001")


def test_a_corrupted_cached_copy_is_downloaded_again():
    reg = Registry(f"memory://registry-{uuid.uuid4().hex}")
    _publish(reg, b"good weights")
    folder = reg.fetch("reward", "v000001")
    (folder / "head.safetensors").write_bytes(b"rot")
    assert (reg.fetch("reward", "v000001") / "head.safetensors").read_bytes() == b"good weights"


# -- errors -------------------------------------------------------------------------------------------------


def test_errors_say_what_is_wrong(tmp_path):
    reg = Registry(tmp_path / "registry")
    _publish(reg)
    _publish(reg)
    where = tmp_path / "registry"
    cases = [
        (lambda: reg.versions("dataset"), "unknown kind 'dataset'; kinds are reward, adapter"),
        (lambda: _publish(reg, kind="lora"), "unknown kind 'lora'; kinds are reward, adapter"),
        (lambda: reg.get("reward", "v000009"), f"no reward version 'v000009' in {where}; it has v000001, v000002"),
        (lambda: reg.get("reward", "../../etc"), f"no reward version '../../etc' in {where}"),
        (lambda: reg.get("adapter", "v000001"), f"no adapter version 'v000001' in {where}; it has no complete versions"),
        (lambda: reg.set_state("reward", "v000001", "dead", "me", "why"),
         "state must be one of candidate, canary, live, retired; got 'dead'"),
        (lambda: _publish(reg, state="shipped"), "state must be one of candidate, canary, live, retired; got 'shipped'"),
        (lambda: reg.set_state("reward", "v000001", "live", "", "why"),
         "set_state needs who and why as non-empty strings, for the version's history; got who='', why='why'"),
        (lambda: reg.publish(kind="reward", files={"a": b"x"}), "publish needs who and why"),
        (lambda: _publish(reg, files={}), "files is empty: a reward version needs at least one file"),
        (lambda: _publish(reg, parent="v000042"), f"no reward version 'v000042' in {where}"),
        (lambda: _publish(reg, files={"a.bin": tmp_path / "nowhere.bin"}),
         f"files['a.bin']: '{tmp_path / 'nowhere.bin'}' is not a file"),
        (lambda: _publish(reg, metrics={"acc": {1, 2}}), "invalid manifest: metrics.acc: input was not a valid JSON value"),
    ]
    for name in ("a/b.bin", "..", "../x", "sub\\x", ".hidden", "manifest.json", ""):
        cases.append((lambda name=name: _publish(reg, files={name: b"x"}),
                      f"file name {name!r} must be a plain name (letters, digits, '.', '_', '-'; no path separators"))
    for call, message in cases:
        with pytest.raises(RegistryError) as err:
            call()
        assert message in str(err.value)
    assert issubclass(RegistryError, UserFacingError)
    assert [m.version for m in reg.versions("reward")] == ["v000001", "v000002"]  # no failed call claimed a number


def test_a_version_folder_copied_by_hand_is_refused(tmp_path):
    reg = Registry(tmp_path / "registry")
    _publish(reg)
    reg.fs.copy(f"{reg.root}/reward/v000001", f"{reg.root}/reward/v000007", recursive=True)
    with pytest.raises(RegistryError, match="reward/v000007/manifest.json describes reward v000001; fix or remove"):
        reg.versions("reward")


# -- command line -------------------------------------------------------------------------------------------


def test_cli_list_and_show(tmp_path, capsys):
    url = str(tmp_path / "registry")
    reg = Registry(url)
    _publish(reg, metrics={"pref_acc": 0.812345, "loss": 0.1}, state="live")
    reg.publish(kind="reward", files={"head.safetensors": b"2"}, parent="v000001", metrics={"pref_acc": 0.9},
                who="trainer", why="gate")
    reg.publish(kind="adapter", files={"lora.safetensors": b"3"}, who="trainer", why="rwr")

    assert main(["registry", "list", "--registry", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "VERSION", "STATE", "CREATED", "(UTC)", "PARENT", "HEADLINE"]
    assert [line.split()[:3] + line.split()[5:] for line in lines[1:]] == [
        ["reward", "v000001", "live", "-", "pref_acc=0.8123"],
        ["reward", "v000002", "candidate", "v000001", "pref_acc=0.9"],
        ["adapter", "v000001", "candidate", "-", "-"],
    ]

    assert main(["registry", "list", "--kind", "adapter", "--registry", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["kind"], m["version"]) for m in listed] == [("adapter", "v000001")]
    assert Manifest.model_validate_json(json.dumps(listed[0])) == reg.get("adapter", "v000001")

    assert main(["registry", "show", "reward", "v000002", "--registry", url]) == 0
    assert Manifest.model_validate_json(capsys.readouterr().out) == reg.get("reward", "v000002")


def test_cli_errors_and_empty_registry(tmp_path, capsys, monkeypatch):
    url = str(tmp_path / "registry")
    assert main(["registry", "list", "--registry", url]) == 0
    assert capsys.readouterr().out.strip() == f"no versions in {url}"

    monkeypatch.setenv("ALIGNLOOP_REGISTRY", url)  # the default --registry
    assert main(["registry", "show", "reward", "v000001"]) == 2
    assert capsys.readouterr().err.strip() == (f"alignloop: error: no reward version 'v000001' in {url}; "
                                               "it has no complete versions")
    assert main(["registry", "list", "--kind", "dataset"]) == 2
    assert "unknown kind 'dataset'; kinds are reward, adapter" in capsys.readouterr().err

    for command in (["registry"], ["registry", "list"], ["registry", "show"]):
        with pytest.raises(SystemExit) as exit:
            main(command + ["--help"])
        assert exit.value.code == 0
        assert capsys.readouterr().out.startswith("usage: alignloop " + " ".join(command))


# -- latest, read_file, operation_lock (what alignloop.rollout builds on) ----------------------------------------


def test_latest_answers_the_newest_complete_version_in_a_state(url):
    reg = Registry(url)
    assert reg.latest("rollout") is None and reg.latest("reward", "live") is None
    v1, v2, v3 = _publish(reg, b"1"), _publish(reg, b"2", state="live"), _publish(reg, b"3")
    assert reg.latest("reward") == v3
    assert reg.latest("reward", "live") == v2 and reg.latest("reward", "retired") is None
    reg.set_state("reward", v1.version, "live", who="op", why="back")
    assert reg.latest("reward", "live").version == v1.version  # the highest live number, not the newest promotion
    reg.fs.makedirs(f"{reg.root}/reward/v000009", exist_ok=True)  # a claimed number whose publish never finished
    reg.fs.pipe_file(f"{reg.root}/reward/v000009/.claim", b"x")
    assert reg.latest("reward").version == "v000003"
    with pytest.raises(RegistryError, match="unknown kind 'dataset'"):
        reg.latest("dataset")
    with pytest.raises(RegistryError, match="state must be one of"):
        reg.latest("reward", "dead")


def test_read_file_checks_the_checksum(url):
    reg = Registry(url)
    m = reg.publish(kind="rollout", files={"rollout.json": b'{"arms": []}'}, who="t", why="w")
    assert reg.read_file(m, "rollout.json") == b'{"arms": []}'
    with pytest.raises(RegistryError, match=r"rollout v000001 has no file 'other.json'; it has rollout.json"):
        reg.read_file(m, "other.json")
    _corrupt(reg, "rollout", "v000001", "rollout.json")
    with pytest.raises(RegistryError, match=r"rollout v000001: file 'rollout.json' in .* is corrupt"):
        reg.read_file(m, "rollout.json")


def test_operation_lock_serializes_compound_changes_and_admits_set_state_inside(tmp_path):
    url = str(tmp_path / "registry")
    reg = Registry(url)
    _publish(reg, b"1")
    order = []
    inside = threading.Event()

    def second():
        inside.wait(10)
        with Registry(url).operation_lock("reward"):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with reg.operation_lock("reward"):
        inside.set()
        reg.set_state("reward", "v000001", "live", who="op", why="inside the lock")  # its own lock: no deadlock
        _publish(reg, b"2")
        thread.join(0.5)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]
    script = ("import sys; from alignloop.registry import Registry\n"
              "with Registry(sys.argv[1]).operation_lock('reward'): print('got it')")
    with reg.operation_lock("reward"):  # another process waits for it too
        proc = subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
    assert proc.communicate(timeout=60)[0] == "got it\n"
