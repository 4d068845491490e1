"""Adapters' life cycle and the rollout: which adapter versions serve which share of users.

    from alignloop import rollout
    from alignloop.registry import Registry

    reg = Registry()
    m = rollout.publish_adapter(reg, "out/adapter", base=base_model_identity(pipe), config={...}, metrics={...},
                                data={...}, parent=None, who="trainer", why="rwr: oracle accuracy 0.61 > 0.55")
    rollout.start_canary(reg, m.version, share=0.1, who="nightly", why="new adapter")   # A = live, B = m, 10%
    rollout.current_rollout(reg)          # what serving workers poll: Rollout(id="v000012", arms=[A, B], ...)
    rollout.promote(reg, m.version, who="guardrail", why="P(B>A)=0.97 ...", numbers={...})   # A = m, 100%
    rollout.rollback(reg, who="operator", why="artifacts in faces")                         # back one step

A rollout is a version of the registry kind "rollout": a `rollout.json` with the arms (name, adapter version or
"base", share), when it started, why, and the numbers of the decision that made it. Every rollout is published
live (the registry retires the previous one), so the current rollout is the newest live version and its version
string is the rollout id; serving hashes the user with it, so each new rollout reshuffles who is in B. Rollout
versions are never edited: the history of rollouts is the list of versions.

The adapter states mean: candidate = published, never served; canary = served to a share of users (arm B);
live = the arm every user gets once the canary is over (arm A); retired = served no more (kept, for rollback).

Consistency. A change writes the adapters' states first and the new rollout last, all under the registry's
operation lock on "rollout" (publish and set_state take their own, inner, locks), so two changes never
interleave. Why this order is safe under a crash between the two writes:
- Workers route users by the rollout only. A rollout names only versions that are canary or live at the moment
  it is written (`_publish` checks), so no worker ever sends a user to a version that was never approved for
  traffic, which the reverse order would do for a moment at every canary start.
- A crash after the states and before the rollout leaves the previous rollout in force: users keep getting
  exactly what they got before the command, the states are one step ahead, and `rollout show` names the
  mismatch. The rollout is a function of the states (A = the live adapter or "base", B = the canary), so
  running the same command again completes it: every operation accepts a version already in its target state.
- A retired version may still be served for that moment; the registry never deletes files, so it still loads.
"""

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from alignloop.errors import UserFacingError
from alignloop.events import Label
from alignloop.registry import Manifest, Registry, RegistryError, Source, newest_live

log = logging.getLogger(__name__)

ROLLOUT_FILE = "rollout.json"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (alignloop.adapters.WEIGHTS)
BASE = "base"  # the arm's adapter when it serves the base model, no LoRA
SERVED = ("canary", "live")  # the adapter states a rollout may route users to


class RolloutError(UserFacingError):
    """A rollout or adapter change that cannot be made as asked; the message says what to do instead."""


class RolloutArm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Label  # "A" (the live adapter), "B" (the canary), "C", ...
    adapter: str = Field(pattern=r"^(base|v\d{6,})$")  # an adapter version, or "base"
    share: float = Field(ge=0, le=1)  # of users, by a hash of the user id and the rollout id


class Rollout(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^v\d{6,}$")  # the rollout's registry version
    arms: list[RolloutArm] = Field(min_length=1)
    started_at: AwareDatetime
    reason: str  # why this rollout: the command's or the guardrail's `why`
    numbers: dict[str, JsonValue] = {}  # the numbers of the decision that made it (posterior, counts), if any

    @model_validator(mode="after")
    def _arms_add_up(self):
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct; got {names}")
        total = sum(arm.share for arm in self.arms)
        if abs(total - 1) > 1e-6:
            shares = [(arm.name, arm.share) for arm in self.arms]
            raise ValueError(f"arm shares must sum to 1; got {shares} (sum {total:.6g})")
        return self

    def arm(self, name: str) -> Optional[RolloutArm]:
        return next((arm for arm in self.arms if arm.name == name), None)

    def describe(self) -> str:
        """One line: 'v000012: A=v000003 90%, B=v000007 10%'."""
        return f"{self.id}: " + ", ".join(f"{a.name}={a.adapter} {a.share:.0%}" for a in self.arms)


# -- reading ------------------------------------------------------------------------------------------------


def current_rollout(registry: Registry) -> Optional[Rollout]:
    """The rollout in force, or None when none was ever published (serving then uses its configured arms).

    Cheap enough to poll every half second: one listing, the newest rollout manifest and its rollout.json."""
    manifest = registry.latest("rollout", "live")
    return None if manifest is None else _read(registry, manifest)


def _read(registry: Registry, manifest: Manifest) -> Rollout:
    try:
        return Rollout(id=manifest.version, **json.loads(registry.read_file(manifest, ROLLOUT_FILE)))
    except (ValueError, TypeError) as err:  # ValidationError and JSONDecodeError are ValueErrors
        raise RegistryError(f"{registry.url}: rollout/{manifest.version}/{ROLLOUT_FILE} is not a valid rollout: "
                            f"{err}") from None


def problems(registry: Registry, rollout: Optional[Rollout] = None) -> list[str]:
    """Where the rollout and the adapters' states disagree, as a crash between the two writes leaves them."""
    rollout = rollout or current_rollout(registry)
    routed = {arm.adapter for arm in rollout.arms} if rollout else {BASE}
    found = []
    for adapter in registry.versions("adapter"):
        if adapter.version in routed and adapter.state not in SERVED:
            found.append(f"adapter {adapter.version} is {adapter.state} but the rollout still routes users to it")
        elif adapter.state in SERVED and adapter.version not in routed and rollout is not None:
            found.append(f"adapter {adapter.version} is {adapter.state} but the rollout routes no users to it")
    if found:
        found.append("the last adapter or rollout command did not finish; run it again to complete it")
    return found


# -- adapters -----------------------------------------------------------------------------------------------


def publish_adapter(registry: Registry, folder_or_files: Union[str, Path, dict[str, Source]],
                    base: Optional[dict] = None, config: Optional[dict] = None, metrics: Optional[dict] = None,
                    data: Optional[dict] = None, parent: Optional[str] = None, who: Optional[str] = None,
                    why: Optional[str] = None) -> Manifest:
    """Publish an adapter as a candidate: a folder's files (as `save_adapter` writes it) or {name: path or bytes}.

    Checked before anything is written: the LoRA file is there, parses as safetensors and every weight is
    finite. The full check against the base UNet (LoRA header, keys, shapes, rank, target modules, base hash)
    happens where the UNet is, in the serving worker, before the adapter takes traffic
    (alignloop.adapters.validate_adapter).
    """
    if isinstance(folder_or_files, dict):
        files = dict(folder_or_files)
    else:
        folder = Path(folder_or_files)
        if not folder.is_dir():
            raise RolloutError(f"{str(folder)!r} is not a folder; pass the folder save_adapter wrote")
        files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    if ADAPTER_FILE not in files:
        raise RolloutError(f"an adapter needs {ADAPTER_FILE}; got {sorted(files) or 'no files'}")
    _check_weights(files[ADAPTER_FILE])
    manifest = registry.publish(kind="adapter", files=files, parent=parent, base=base, data=data, config=config,
                                metrics=metrics, state="candidate", who=who, why=why)
    log.info("adapter %s published as candidate by %s: %s", manifest.version, who, why)
    return manifest


def _check_weights(source: Source) -> None:
    """The LoRA file parses as safetensors, holds tensors, and every one of them is finite."""
    import torch
    from safetensors.torch import load, load_file

    try:
        tensors = load(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else load_file(source)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own errors, OSError, ValueError...
        raise RolloutError(f"{ADAPTER_FILE} is not a readable safetensors file: {err}") from None
    if not tensors:
        raise RolloutError(f"{ADAPTER_FILE} holds no tensors")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RolloutError(f"{ADAPTER_FILE}: tensor {name!r} holds NaN or Inf values")


# -- changes ------------------------------------------------------------------------------------------------


def start_canary(registry: Registry, version: str, share: float, who: str, why: str,
                 numbers: Optional[dict] = None) -> Rollout:
    """Serve adapter `version` to `share` of users (arm B) beside the live adapter or the base model (arm A)."""
    if not (isinstance(share, (int, float)) and 0 < share < 1):
        raise RolloutError(f"share must be a fraction of users strictly between 0 and 1; got {share!r}")
    with registry.operation_lock("rollout"):
        adapter = registry.get("adapter", version)
        if adapter.state not in ("candidate", "canary"):
            raise RolloutError(f"adapter {version} is {adapter.state}; only a candidate can start a canary"
                               + (" (publish it again to retry it)" if adapter.state == "retired" else ""))
        adapters = registry.versions("adapter")
        others = [m.version for m in adapters if m.state == "canary" and m.version != version]
        if others:
            raise RolloutError(f"adapter {others[0]} is already in canary; promote it or roll it back first")
        live = newest_live(adapters)
        # 1. The state, so that the rollout below names only an approved version.
        if adapter.state != "canary":
            registry.set_state("adapter", version, "canary", who, why)
        # 2. The rollout.
        control = live.version if live else BASE
        arms = [RolloutArm(name="A", adapter=control, share=1 - share),
                RolloutArm(name="B", adapter=version, share=share)]
        return _publish(registry, arms, who, why, numbers)


def promote(registry: Registry, version: str, who: str, why: str, numbers: Optional[dict] = None,
            expect_rollout: Optional[str] = None) -> Rollout:
    """Make adapter `version` live for every user; the previous live one and any other canary are retired.

    `expect_rollout`: act only if that is still the current rollout (the guardrail passes the one it counted)."""
    with registry.operation_lock("rollout"):
        _expect(registry, expect_rollout)
        adapter = registry.get("adapter", version)
        if adapter.state == "retired":
            raise RolloutError(f"adapter {version} is retired; `alignloop adapters rollback` returns to the previous "
                               "live adapter, or publish it again to give it a new canary")
        # 1. States: live (the registry retires the previous live one), then the canaries that lose their users.
        if adapter.state != "live":
            registry.set_state("adapter", version, "live", who, why)
        for other in registry.versions("adapter"):
            if other.state == "canary":
                registry.set_state("adapter", other.version, "retired", who, f"dropped: {version} promoted: {why}")
        # 2. The rollout.
        return _publish(registry, [RolloutArm(name="A", adapter=version, share=1.0)], who, why, numbers)


def rollback(registry: Registry, who: str, why: str, numbers: Optional[dict] = None,
             expect_rollout: Optional[str] = None) -> Rollout:
    """Undo one step. With a canary out: retire it, every user back on the live adapter. Without: the live adapter
    is retired and the previous live one (or the base model, when there is none) serves everyone again."""
    with registry.operation_lock("rollout"):
        _expect(registry, expect_rollout)
        adapters = registry.versions("adapter")
        canaries = [m.version for m in adapters if m.state == "canary"]
        live = newest_live(adapters)
        if not canaries and _serves_a_retired(registry, current_rollout(registry)):
            # A rollback that crashed between its states and its rollout: this run completes it, one step, not two
            return _publish(registry, [RolloutArm(name="A", adapter=live.version if live else BASE, share=1.0)],
                            who, why, numbers)
        # 1. States.
        if canaries:
            for version in canaries:
                registry.set_state("adapter", version, "retired", who, f"rolled back: {why}")
            control = live.version if live else BASE
        elif live is not None:
            previous = [v for v in _live_lineage(adapters) if v != live.version]
            if previous:
                control = previous[-1]
                registry.set_state("adapter", control, "live", who, f"rolled back from {live.version}: {why}")
            else:
                control = BASE
                registry.set_state("adapter", live.version, "retired", who, f"rolled back to the base model: {why}")
        else:
            raise RolloutError("nothing to roll back: no adapter is in canary or live (users get the base model)")
        # 2. The rollout.
        return _publish(registry, [RolloutArm(name="A", adapter=control, share=1.0)], who, why, numbers)


def retire(registry: Registry, version: str, who: str, why: str) -> Manifest:
    """Serve adapter `version` no more. A canary's users go back to the other arms; a live adapter is refused
    (`rollback` or `promote` say what serves instead)."""
    with registry.operation_lock("rollout"):
        adapter = registry.get("adapter", version)
        current = current_rollout(registry)
        serving_it = current is not None and any(arm.adapter == version for arm in current.arms)
        if adapter.state == "retired" and not serving_it:
            raise RolloutError(f"adapter {version} is already retired")
        if adapter.state == "live":
            raise RolloutError(f"adapter {version} is live; roll it back (`alignloop adapters rollback`) or promote "
                               "another adapter instead, so that something serves its users")
        # 1. The state (already retired: a retire that crashed before its rollout, which this run completes).
        retired = adapter if adapter.state == "retired" else registry.set_state("adapter", version, "retired", who, why)
        # 2. The rollout, if it served the version: its share spread over the other arms.
        if serving_it:
            kept = [arm for arm in current.arms if arm.adapter != version]
            total = sum(arm.share for arm in kept)
            if kept and total > 0:
                arms = [arm.model_copy(update={"share": arm.share / total}) for arm in kept]
            else:
                live = registry.live("adapter")
                arms = [RolloutArm(name="A", adapter=live.version if live else BASE, share=1.0)]
            _publish(registry, arms, who, f"{version} retired: {why}")
        return retired


# -- internals ----------------------------------------------------------------------------------------------


def _serves_a_retired(registry: Registry, current: Optional[Rollout]) -> bool:
    """The rollout still routes users to a retired adapter: a change's states were written, its rollout not."""
    return current is not None and any(arm.adapter != BASE and registry.get("adapter", arm.adapter).state == "retired"
                                       for arm in current.arms)


def _publish(registry: Registry, arms: list[RolloutArm], who: str, why: str,
             numbers: Optional[dict] = None) -> Rollout:
    """Write the new rollout as a live version (the registry retires the previous one). Caller holds the lock."""
    for arm in arms:
        if arm.adapter != BASE and (state := registry.get("adapter", arm.adapter).state) not in SERVED:
            raise RolloutError(f"a rollout may route users only to a canary or live adapter; {arm.adapter} is {state}")
    current = current_rollout(registry)
    record = {"arms": [arm.model_dump() for arm in arms], "started_at": datetime.now(timezone.utc).isoformat(),
              "reason": why, "numbers": numbers or {}}
    try:
        Rollout(id="v000000", **record)
    except ValidationError as err:
        raise RolloutError(f"invalid rollout: {err}") from None
    manifest = registry.publish(kind="rollout", files={ROLLOUT_FILE: json.dumps(record, indent=2).encode()},
                                parent=current.id if current else None, metrics=numbers or {}, state="live",
                                who=who, why=why)
    rollout = _read(registry, manifest)
    log.info("rollout %s by %s: %s", rollout.describe(), who, why)
    return rollout


def _expect(registry: Registry, expected: Optional[str]) -> None:
    if expected is None:
        return
    current = current_rollout(registry)
    if current is None or current.id != expected:
        raise RolloutError(f"the rollout changed from {expected} to {current.id if current else 'none'} meanwhile; "
                           "not acting on numbers counted for the old one")


def _live_lineage(adapters: list[Manifest]) -> list[str]:
    """The stack of live adapters, oldest first, replayed from the adapters' histories: a promotion pushes, going
    back to a version already on the stack pops down to it, retiring the top (a rollback to base) pops it.

    Rolling back goes to the entry under the top. Going by the stack rather than "the version retired last"
    keeps two rollbacks in a row from swapping the last two versions back and forth."""
    stack: list[str] = []
    moves = sorted((h.at, m.version, h.state) for m in adapters for h in m.history if h.state in ("live", "retired"))
    for _, version, state in moves:
        if state == "live":
            if version in stack:
                del stack[stack.index(version) + 1:]
            else:
                stack.append(version)
        elif stack and stack[-1] == version:
            stack.pop()
    return stack
