"""Adapters' life cycle and the rollout (alignloop.rollout): canary, promote, rollback, retire, the states and
the rollout staying consistent (also across a crash between them), clear errors, and the `alignloop adapters` /
`alignloop rollout` commands."""

import json
import threading

import pytest
import torch
from safetensors.torch import save

from alignloop import rollout
from alignloop.cli import main
from alignloop.errors import UserFacingError
from alignloop.registry import Registry, RegistryError
from alignloop.rollout import ADAPTER_FILE, Rollout, RolloutArm, RolloutError


pytestmark = pytest.mark.usefixtures("own_registry_home")


@pytest.fixture
def reg(registry_url):
    return Registry(registry_url)


def _lora(value: float = 0.01) -> bytes:
    return save({"unet.mid_block.attentions.0.to_q.lora_A.weight": torch.full((4, 8), value),
                 "unet.mid_block.attentions.0.to_q.lora_B.weight": torch.zeros(8, 4)})


def _adapter(reg, value: float = 0.01, **fields):
    return rollout.publish_adapter(reg, {ADAPTER_FILE: _lora(value)}, **{"who": "trainer", "why": "rwr", **fields})


def _arms(r: Rollout) -> list:
    return [(a.name, a.adapter, round(a.share, 6)) for a in r.arms]


def _states(reg) -> dict:
    return {m.version: m.state for m in reg.versions("adapter")}


# -- the rollout record -------------------------------------------------------------------------------------


def test_rollout_model_checks_its_arms():
    now = "2026-11-28T07:00:00+00:00"
    ok = Rollout(id="v000001", arms=[{"name": "A", "adapter": "base", "share": 0.9},
                                     {"name": "B", "adapter": "v000003", "share": 0.1}], started_at=now, reason="r")
    assert ok.arm("B").adapter == "v000003" and ok.arm("C") is None
    assert ok.describe() == "v000001: A=base 90%, B=v000003 10%"
    bad = [
        ([], "at least 1 item"),
        ([{"name": "A", "adapter": "base", "share": 0.5}, {"name": "A", "adapter": "v000002", "share": 0.5}],
         "arm names must be distinct"),
        ([{"name": "A", "adapter": "base", "share": 0.9}], "arm shares must sum to 1"),
        ([{"name": "A", "adapter": "base", "share": 1.5}, {"name": "B", "adapter": "base", "share": -0.5}],
         "less than or equal to 1"),
        ([{"name": "A", "adapter": "lora-7", "share": 1.0}], "should match pattern"),
    ]
    for arms, message in bad:
        with pytest.raises(ValueError, match=message):
            Rollout(id="v000001", arms=arms, started_at=now, reason="r")
    assert RolloutArm(name="A", adapter="base", share=1.0).share == 1.0


# -- publishing adapters ------------------------------------------------------------------------------------


def test_publish_adapter_from_a_folder_or_bytes_checks_the_weights(reg, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_FILE).write_bytes(_lora())
    (folder / "training.json").write_text("{}")
    m = rollout.publish_adapter(reg, folder, base={"unet_sha256": "ab"}, config={"r": 4}, metrics={"oracle": 0.6},
                                data={"snapshot": 3}, parent=None, who="trainer", why="rwr: 0.6 > 0.55")
    assert (m.kind, m.version, m.state, m.base, m.metrics) == ("adapter", "v000001", "candidate",
                                                               {"unet_sha256": "ab"}, {"oracle": 0.6})
    assert set(m.files) == {ADAPTER_FILE, "training.json"}
    assert _adapter(reg, parent="v000001").parent == "v000001"

    nan = save({"unet.x.lora_A.weight": torch.tensor([[1.0, float("nan")]])})
    cases = [
        ({"weights.bin": b"x"}, f"an adapter needs {ADAPTER_FILE}; got ['weights.bin']"),
        ({ADAPTER_FILE: b"not safetensors"}, f"{ADAPTER_FILE} is not a readable safetensors file"),
        ({ADAPTER_FILE: nan}, f"{ADAPTER_FILE}: tensor 'unet.x.lora_A.weight' holds NaN or Inf values"),
        ({ADAPTER_FILE: save({})}, f"{ADAPTER_FILE} holds no tensors"),
        (tmp_path / "nowhere", "is not a folder; pass the folder save_adapter wrote"),
    ]
    for files, message in cases:
        with pytest.raises(RolloutError) as err:
            rollout.publish_adapter(reg, files, who="t", why="w")
        assert message in str(err.value)
    assert [v.version for v in reg.versions("adapter")] == ["v000001", "v000002"]  # nothing else was written


# -- the life cycle -----------------------------------------------------------------------------------------


def test_canary_promote_rollback_life_cycle(reg):
    assert rollout.current_rollout(reg) is None  # serving uses its configured arms
    v1, v2 = _adapter(reg).version, _adapter(reg).version

    # 1. First canary: against the base model.
    r1 = rollout.start_canary(reg, v1, 0.1, who="nightly", why="new adapter")
    assert _arms(r1) == [("A", "base", 0.9), ("B", v1, 0.1)] and r1.reason == "new adapter"
    assert rollout.current_rollout(reg) == r1 and _states(reg) == {v1: "canary", v2: "candidate"}
    assert r1.started_at.tzinfo is not None

    # 2. Promote it, with the guardrail's numbers: into the adapter's history and the rollout's record.
    numbers = {"p_b_beats_a": 0.998, "a": {"up": 90, "down": 110}, "b": {"up": 130, "down": 70}}
    r2 = rollout.promote(reg, v1, who="guardrail", why="B is better: P(B>A)=0.998", numbers=numbers,
                         expect_rollout=r1.id)
    assert _arms(r2) == [("A", v1, 1.0)] and r2.id > r1.id and r2.numbers == numbers
    assert reg.get("rollout", r2.id).metrics == numbers and reg.get("rollout", r2.id).parent == r1.id
    assert reg.get("rollout", r1.id).state == "retired" and reg.latest("rollout", "live").version == r2.id
    history = reg.get("adapter", v1).history
    assert [(h.state, h.who, h.why) for h in history] == [
        ("candidate", "trainer", "rwr"), ("canary", "nightly", "new adapter"),
        ("live", "guardrail", "B is better: P(B>A)=0.998")]

    # 3. A second canary against the live adapter; rolled back: retired, everyone on v1 again.
    r3 = rollout.start_canary(reg, v2, 0.25, who="nightly", why="next")
    assert _arms(r3) == [("A", v1, 0.75), ("B", v2, 0.25)]
    r4 = rollout.rollback(reg, who="guardrail", why="B is worse")
    assert _arms(r4) == [("A", v1, 1.0)] and _states(reg) == {v1: "live", v2: "retired"}
    assert reg.get("adapter", v2).reason == "rolled back: B is worse"

    # 4. Without a canary, a rollback undoes the live adapter: back to the base model when nothing was before it.
    r5 = rollout.rollback(reg, who="operator", why="artifacts")
    assert _arms(r5) == [("A", "base", 1.0)] and _states(reg) == {v1: "retired", v2: "retired"}
    assert reg.get("adapter", v1).reason == "rolled back to the base model: artifacts"
    with pytest.raises(RolloutError, match="nothing to roll back: no adapter is in canary or live"):
        rollout.rollback(reg, who="operator", why="again")
    assert [m.version for m in reg.versions("rollout")] == [r.id for r in (r1, r2, r3, r4, r5)]
    assert [m.state for m in reg.versions("rollout")] == ["retired"] * 4 + ["live"]


def test_rollbacks_walk_back_the_live_lineage_without_ping_pong(reg):
    v1, v2, v3, v4 = (_adapter(reg).version for _ in range(4))
    for version in (v1, v2, v3):
        rollout.promote(reg, version, who="op", why=f"ship {version}")
    assert _arms(rollout.rollback(reg, who="op", why="bad")) == [("A", v2, 1.0)]
    assert reg.get("adapter", v2).history[-1].why == f"rolled back from {v3}: bad"
    assert reg.get("adapter", v3).reason == f"replaced by {v2} as live: rolled back from {v3}: bad"
    # The one retired last is v3, the version just rolled back: going by it would swap v2 and v3 forever.
    assert _arms(rollout.rollback(reg, who="op", why="worse")) == [("A", v1, 1.0)]
    rollout.promote(reg, v4, who="op", why="ship v4")
    assert _arms(rollout.rollback(reg, who="op", why="v4 bad")) == [("A", v1, 1.0)]
    assert _arms(rollout.rollback(reg, who="op", why="v1 bad")) == [("A", "base", 1.0)]
    assert set(_states(reg).values()) == {"retired"}


def test_promote_retires_other_canaries_and_retire_gives_the_share_back(reg):
    v1, v2, v3 = (_adapter(reg).version for _ in range(3))
    rollout.promote(reg, v1, who="op", why="first")
    rollout.start_canary(reg, v2, 0.2, who="op", why="try v2")
    r = rollout.promote(reg, v3, who="op", why="v3 straight to live")  # a candidate may skip the canary
    assert _arms(r) == [("A", v3, 1.0)] and _states(reg) == {v1: "retired", v2: "retired", v3: "live"}
    assert reg.get("adapter", v2).reason == f"dropped: {v3} promoted: v3 straight to live"

    v4 = _adapter(reg).version
    rollout.start_canary(reg, v4, 0.3, who="op", why="try v4")
    m = rollout.retire(reg, v4, who="op", why="wrong data")
    assert m.state == "retired" and m.reason == "wrong data"
    current = rollout.current_rollout(reg)
    assert _arms(current) == [("A", v3, 1.0)] and current.reason == f"{v4} retired: wrong data"
    v5 = _adapter(reg).version
    rollout.retire(reg, v5, who="op", why="never mind")  # a candidate: no rollout change
    assert rollout.current_rollout(reg) == current
    assert rollout.promote(reg, v3, who="op", why="again").arms == current.arms  # idempotent


def test_errors_say_what_to_do(reg):
    v1, v2, v3 = (_adapter(reg).version for _ in range(3))
    rollout.promote(reg, v1, who="op", why="first")
    rollout.start_canary(reg, v2, 0.1, who="op", why="try")
    first = rollout.current_rollout(reg)
    rollout.rollback(reg, who="op", why="no")
    cases = [
        (lambda: rollout.promote(reg, v2, "op", "again"),
         f"adapter {v2} is retired; `alignloop adapters rollback` returns to the previous live adapter"),
        (lambda: rollout.start_canary(reg, v2, 0.1, "op", "again"),
         f"adapter {v2} is retired; only a candidate can start a canary (publish it again to retry it)"),
        (lambda: rollout.start_canary(reg, v1, 0.1, "op", "x"), f"adapter {v1} is live; only a candidate can start"),
        (lambda: rollout.start_canary(reg, v3, 1.0, "op", "x"), "share must be a fraction of users strictly between"),
        (lambda: rollout.start_canary(reg, v3, 0, "op", "x"), "share must be a fraction of users strictly between"),
        (lambda: rollout.promote(reg, "v000042", "op", "x"), f"no adapter version 'v000042' in {reg.url}; it has"),
        (lambda: rollout.retire(reg, v1, "op", "x"), f"adapter {v1} is live; roll it back"),
        (lambda: rollout.retire(reg, v2, "op", "x"), f"adapter {v2} is already retired"),
        (lambda: rollout.promote(reg, v3, "op", "x", expect_rollout=first.id),
         f"the rollout changed from {first.id} to "),
        (lambda: rollout.promote(reg, v3, "", "x"), "set_state needs who and why as non-empty strings"),
    ]
    for call, message in cases:
        with pytest.raises(UserFacingError) as err:
            call()
        assert message in str(err.value)
    rollout.start_canary(reg, v3, 0.1, "op", "x")
    with pytest.raises(RolloutError, match=f"adapter {v3} is already in canary; promote it or roll it back first"):
        rollout.start_canary(reg, _adapter(reg).version, 0.1, "op", "y")
    assert _states(reg)[v3] == "canary" and _arms(rollout.current_rollout(reg))[1] == ("B", v3, 0.1)


def test_a_malformed_rollout_file_is_an_error_naming_it(tmp_path):
    reg = Registry(tmp_path / "registry")
    reg.publish(kind="rollout", files={"rollout.json": b'{"arms": []}'}, state="live", who="hand", why="edit")
    with pytest.raises(RegistryError, match="rollout/v000001/rollout.json is not a valid rollout"):
        rollout.current_rollout(reg)


# -- consistency --------------------------------------------------------------------------------------------


def _crash_before_the_rollout(monkeypatch):
    publish = Registry.publish

    def crash(self, kind, *args, **kwargs):
        if kind == "rollout":
            raise OSError("power lost")
        return publish(self, kind, *args, **kwargs)

    monkeypatch.setattr(Registry, "publish", crash)


def test_a_crash_between_the_states_and_the_rollout_keeps_the_old_rollout_and_a_rerun_completes(reg, monkeypatch):
    v1, v2 = _adapter(reg).version, _adapter(reg).version
    rollout.promote(reg, v1, who="op", why="first")
    before = rollout.current_rollout(reg)
    _crash_before_the_rollout(monkeypatch)
    with pytest.raises(OSError):
        rollout.start_canary(reg, v2, 0.1, who="op", why="try v2")
    monkeypatch.undo()

    # Users get what they got before; the states are one step ahead, and that is said.
    assert rollout.current_rollout(reg) == before and _states(reg) == {v1: "live", v2: "canary"}
    assert rollout.problems(reg) == [f"adapter {v2} is canary but the rollout routes no users to it",
                                     "the last adapter or rollout command did not finish; run it again to complete it"]
    assert _arms(rollout.start_canary(reg, v2, 0.1, who="op", why="try v2")) == [("A", v1, 0.9), ("B", v2, 0.1)]
    assert rollout.problems(reg) == []


@pytest.mark.parametrize("step", ["rollback_canary", "rollback_live", "retire_canary"])
def test_a_rollback_or_retire_run_again_after_a_crash_completes_it_and_takes_no_further_step(reg, monkeypatch, step):
    """Run again, the command completes the change it crashed in (the rollout the states imply) instead of stepping
    once more: before, a rerun rollback retired the live adapter too (or walked one more step down the lineage), and a
    rerun retire said 'already retired' while users were still routed to it."""
    v1, v2, v3 = (_adapter(reg).version for _ in range(3))
    rollout.promote(reg, v1, who="op", why="first")
    rollout.promote(reg, v2, who="op", why="second")  # v1 retired, v2 live: a lineage to roll back along
    rollout.start_canary(reg, v3, 0.1, who="op", why="try v3")
    if step == "rollback_live":
        rollout.promote(reg, v3, who="op", why="v3 wins")
    command = {"rollback_canary": lambda: rollout.rollback(reg, who="op", why="worse"),
               "rollback_live": lambda: rollout.rollback(reg, who="op", why="worse"),
               "retire_canary": lambda: rollout.retire(reg, v3, who="op", why="enough")}[step]
    _crash_before_the_rollout(monkeypatch)
    with pytest.raises(OSError):
        command()
    monkeypatch.undo()
    assert rollout.problems(reg)  # the rollout still routes users to what the states retired
    command()
    expected = {"rollback_canary": [("A", v2, 1.0)], "rollback_live": [("A", v2, 1.0)],
                "retire_canary": [("A", v2, 1.0)]}[step]
    assert _arms(rollout.current_rollout(reg)) == expected and rollout.problems(reg) == []
    assert _states(reg)[v2] == "live" and _states(reg)[v3] == "retired"


def test_current_rollout_reads_one_manifest(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "registry")
    versions = [_adapter(reg).version for _ in range(4)]
    for version in versions:
        rollout.promote(reg, version, who="op", why="ship")
    (tmp_path / "registry" / "rollout" / "v000099").mkdir()  # a claimed number whose publish crashed
    reads = []
    read_manifest = Registry._read_manifest
    monkeypatch.setattr(Registry, "_read_manifest", lambda self, kind, v: reads.append(v) or read_manifest(self, kind, v))
    assert _arms(rollout.current_rollout(reg)) == [("A", versions[-1], 1.0)]
    assert reads == ["v000099", "v000004"]  # the incomplete one is tried (no manifest), then the newest


def test_concurrent_canaries_one_wins(tmp_path):
    reg = Registry(tmp_path / "registry")
    versions = [_adapter(reg).version for _ in range(4)]
    outcomes = []

    def start(version):
        try:
            outcomes.append(rollout.start_canary(Registry(tmp_path / "registry"), version, 0.1, "op", "race").id)
        except RolloutError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=start, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o.startswith("v") for o in outcomes) == 1
    assert list(_states(reg).values()).count("canary") == 1
    assert rollout.problems(reg) == []


# -- command line -------------------------------------------------------------------------------------------


def test_cli_adapters_and_rollout(tmp_path, capsys):
    url = str(tmp_path / "registry")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_FILE).write_bytes(_lora())

    def run(*argv):
        code = main([*argv, "--registry", url])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert run("rollout", "show")[1] == f"no rollout in {url}: serving uses its configured arms\n"
    assert run("adapters", "list")[1] == f"no adapter versions in {url}\n"
    assert run("adapters", "publish", str(folder), "--why", "rwr", "--who", "trainer",
               "--metrics", '{"oracle_acc": 0.61}', "--base", '{"unet_sha256": "ab"}') == (
        0, "adapter v000001 published as candidate\n", "")
    run("adapters", "publish", str(folder), "--why", "second", "--parent", "v000001")
    assert run("rollout", "canary", "v000001", "--share", "0.2", "--why", "nightly")[1] == (
        "adapter v000001 is in canary; rollout v000001: A=base 80%, B=v000001 20%\n")

    code, out, _ = run("adapters", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["VERSION", "STATE", "ARM", "CREATED", "(UTC)", "PARENT", "HEADLINE"]
    assert [line.split()[:3] + line.split()[5:] for line in lines[1:3]] == [
        ["v000001", "canary", "B:20%", "-", "oracle_acc=0.61"], ["v000002", "candidate", "-", "v000001", "-"]]
    assert lines[3] == "base model: arm A:80%"

    code, out, _ = run("rollout", "show")
    assert out.splitlines()[0].startswith("rollout v000001, since ") and out.splitlines()[0].endswith(": nightly")
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["ARM", "SHARE", "ADAPTER", "STATE"], ["A", "80.0%", "base", "-"], ["B", "20.0%", "v000001", "canary"]]
    assert json.loads(run("rollout", "show", "--json")[1])["arms"][1] == {"name": "B", "adapter": "v000001",
                                                                          "share": 0.2}

    assert run("adapters", "promote", "v000001", "--why", "good", "--who", "ops")[1] == (
        "adapter v000001 is live; rollout v000002: A=v000001 100%\n")
    shown = json.loads(run("adapters", "show", "v000001")[1])
    assert [(h["state"], h["who"], h["why"]) for h in shown["history"]][-1] == ("live", "ops", "good")
    assert run("adapters", "retire", "v000002", "--why", "stale")[1] == (
        "adapter v000002 is retired; rollout v000002: A=v000001 100%\n")
    assert run("adapters", "rollback", "--why", "bad")[1] == "rolled back; rollout v000003: A=base 100%\n"

    # Errors: one line, exit 2.
    for argv, message in [
        (("adapters", "promote", "v000009", "--why", "x"), f"no adapter version 'v000009' in {url}; it has v000001, v000002"),
        (("adapters", "promote", "v000001", "--why", "x"), "adapter v000001 is retired; `alignloop adapters rollback`"),
        (("adapters", "rollback", "--why", "x"), "nothing to roll back"),
        (("rollout", "canary", "v000002", "--share", "2", "--why", "x"), "share must be a fraction of users"),
        (("adapters", "publish", str(tmp_path), "--why", "x"), f"an adapter needs {ADAPTER_FILE}"),
    ]:
        code, out, err = run(*argv)
        assert code == 2 and err.startswith("alignloop: error: ") and message in err and err.count("\n") == 1

    for argv in (["adapters", "promote", "v000001"], ["adapters", "publish", str(folder), "--base", "[1]"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: --why" in err and "must be a JSON object" in err

    for command in (["adapters"], ["rollout"], ["adapters", "publish"], ["rollout", "watch"]):
        with pytest.raises(SystemExit) as exit:
            main(command + ["--help"])
        assert exit.value.code == 0
        assert capsys.readouterr().out.startswith("usage: alignloop " + " ".join(command))
