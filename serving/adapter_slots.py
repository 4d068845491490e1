"""The LoRA adapters a serving worker holds, and how it follows the registry's rollout.

    slots = AdapterSlots(pipe, batcher, max_slots=3, max_rank=16)      # batcher.activate = slots.activate
    follower = RolloutFollower(slots, registry_url, config_arms, poll_s=0.5).start()
    table = follower.table            # RoutingTable(rollout_id, arms): what one request is routed by

**Slots.** peft names adapters and matches those names by substring (hot-swapping into `v1` also zeroed `v10`),
and names cannot hold "."; so adapters live in fixed-width slots `slot00`, `slot01`, ... (never a prefix of one
another) and a version maps to a slot. At most `max_slots` are resident (live, canary, and the previous live
one for an instant rollback). A new version goes into a free slot, or replaces the least recently used one
that neither the routing table nor a queued request uses. The first load into a slot pads it to `max_rank`
(`enable_lora_hotswap`); later loads into that slot hot-swap its weights in place, so a worker's memory does
not grow with each swap (diffusers #8532: it does over load / delete cycles) and a compiled UNet would not
recompile.

**Order of a load.** (1) `validate_adapter` reads and checks the file on the caller's thread (keys, shapes,
rank, target modules, finite weights, the base model's hash): a failed diffusers load deletes the adapter it
loads into, and a bad one must never get that far. (2) On the batcher's thread, between passes (`batcher.call`):
load into the chosen slot (never the slot of an adapter in use), then a smoke generation with it (1 image,
2 steps, finite). Loads are serialized by that thread (concurrent LoRA loads can leave modules on the meta
device). (3) Only then does the version map to its slot, and only when every adapter of a new rollout is
resident does the follower switch its routing table: one reference assignment.

**Rollout.** BentoML workers are processes and an admin request reaches one of them, so no worker is told:
each polls `alignloop.rollout.current_rollout` every `poll_s` and converges by itself. A rollout whose adapter
is refused is logged and counted, the current table keeps serving, and that adapter is not retried until its
manifest changes.
"""

import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch

from alignloop.adapters import AdapterRejected, base_model_identity, validate_adapter
from alignloop.generation import generate
from alignloop.serving import metrics
from alignloop.serving.polling import Poller, transient
from alignloop.serving.config import ArmSpec

log = logging.getLogger("alignloop.serving")
BASE = "base"  # the arm adapter that means "no adapter"
CONFIG_ROLLOUT = "config"  # rollout id when the registry has no rollout: the serving config's arms
STARTING_ROLLOUT = "starting"  # the table while the config arms' adapters load: the base model for everyone


class SlotsBusy(Exception):
    """Every slot holds an adapter still in use; the load is retried at the next poll."""


@dataclass
class _Slot:
    name: str  # peft adapter name: slot00, slot01, ...
    modules: frozenset = frozenset()  # UNet modules with LoRA layers for this slot (empty: never loaded)
    version: Optional[str] = None  # the version it serves; None = free (its weights may still be there)
    last_used: float = 0.0


class AdapterSlots:
    def __init__(self, pipe, batcher, max_slots: int = 3, max_rank: int = 16, smoke_steps: int = 2):
        if not 1 <= max_slots <= 100:
            raise ValueError(f"max_slots must be in 1..100 (two-digit slot names), got {max_slots}")
        self.pipe = pipe
        self.batcher = batcher
        self.max_rank = max_rank
        self.smoke_steps = smoke_steps
        self.max_slots = max_slots
        self._slots = [_Slot(f"slot{i:02d}") for i in range(max_slots)]
        self.reference_modules: Optional[frozenset] = None  # modules of the first adapter loaded here
        self._active: Optional[str] = None  # adapter the UNet is set to now (batcher thread only)
        self._loading = threading.Lock()  # one load at a time from this side too
        self.loads = 0  # adapters loaded (fresh or hot-swapped)
        self.last_timings: dict = {}  # validate_s, load_s, smoke_s of the last load (the benchmark reads them)

    @cached_property
    def identity(self) -> dict:
        """The base UNet's identity, hashed on first need (a load, GET /admin/rollout), not at start-up: it reads
        every UNet weight file, and a worker that serves no adapter never needs it."""
        return base_model_identity(self.pipe)

    # -- what is resident ---------------------------------------------------------------------------------------

    def resident(self) -> dict:
        """version -> slot name of the adapters that can take traffic now."""
        return {s.version: s.name for s in self._slots if s.version is not None}

    def __contains__(self, version: str) -> bool:
        return version == BASE or version in self.resident()

    # -- loading (any thread; the pipeline work runs on the batcher's) -----------------------------------------

    def load(self, folder, manifest=None, keep=()) -> dict:
        """Validate the adapter version in `folder`, load it into a slot, smoke-test it, make it routable.
        `keep`: versions that must stay resident (the rollouts' arms). Raises AdapterRejected (the adapter is
        bad: nothing that serves changed) or SlotsBusy (no slot can be freed now). Returns the timings."""
        with self._loading:
            started = time.perf_counter()
            report = validate_adapter(folder, self.identity, self.pipe.unet, self.max_rank,
                                      reference_modules=self.reference_modules, manifest=manifest)
            validate_s = time.perf_counter() - started
            if report.version in self.resident():
                return {"validate_s": validate_s, "load_s": 0.0, "smoke_s": 0.0}
            timings = self.batcher.call(lambda: self._install(report, set(keep))).result()
            self.last_timings = {"validate_s": validate_s, **timings}
            return self.last_timings

    def _install(self, report, keep: set) -> dict:
        """On the batcher thread: load `report` into a slot and smoke-test it there."""
        unet = self.pipe.unet
        # 1. A slot: a never-used one, else the least recently used one that nothing in use needs.
        # (Between passes, on the batcher thread: the adapter the UNet was last set to is not in use by a pass.)
        busy = keep | self.batcher.pending_adapters()
        free = [s for s in self._slots if s.version is None or s.version not in busy]
        if not free:
            raise SlotsBusy(f"all {len(self._slots)} adapter slots serve adapters in use "
                            f"({sorted(self.resident())}); {report.version} waits for one")
        slot = min(free, key=lambda s: (bool(s.modules), s.version is not None, s.last_used))
        if slot.version is not None:
            log.info("adapter %s leaves %s for %s", slot.version, slot.name, report.version)
            slot.version = None

        # 2. Load: hot-swap in place when the slot's layers cover the adapter, else a fresh load padded to
        #    max_rank (so later, larger ranks hot-swap into it too).
        started = time.perf_counter()
        self._active = None  # a load activates what it loads
        try:
            if slot.modules and report.modules <= slot.modules:
                unet.load_lora_adapter(dict(report.state_dict), prefix="unet", metadata=dict(report.metadata),
                                       adapter_name=slot.name, hotswap=True)
            else:
                if slot.modules:
                    unet.delete_adapters(slot.name)
                    slot.modules = frozenset()
                unet.enable_lora_hotswap(target_rank=self.max_rank, check_compiled="ignore")
                unet.load_lora_adapter(dict(report.state_dict), prefix="unet", metadata=dict(report.metadata),
                                       adapter_name=slot.name)
                slot.modules = report.modules
        except Exception as err:
            if slot.name not in getattr(unet, "peft_config", {}):  # diffusers' error handler deleted it
                slot.modules = frozenset()
            raise AdapterRejected(f"adapter {report.version} failed to load into {slot.name}: {err}") from err
        load_s = time.perf_counter() - started

        # 3. Smoke generation with it: one image, a few steps, finite.
        started = time.perf_counter()
        self._set_active(slot.name)
        images = generate(self.pipe, ["a smoke test"], [0], self.smoke_steps, 5.0)
        if not torch.isfinite(images).all():
            raise AdapterRejected(f"adapter {report.version}: the smoke generation gave NaN or Inf pixels")
        smoke_s = time.perf_counter() - started

        # 4. Routable from here on.
        slot.version, slot.last_used = report.version, time.monotonic()
        self._active = report.version
        if self.reference_modules is None:
            self.reference_modules = report.modules
        self.loads += 1
        log.info("adapter %s is resident in %s (rank %d, %d modules)", report.version, slot.name, report.rank,
                 len(report.modules))
        return {"load_s": load_s, "smoke_s": smoke_s}

    # -- the batcher thread, before each pass -------------------------------------------------------------------

    def activate(self, adapter: str) -> None:
        """Make the UNet draw with `adapter` ("base": no adapter). Batcher thread only, between passes."""
        if adapter == self._active:
            return
        if adapter == BASE:
            if any(s.modules for s in self._slots):
                self.pipe.unet.disable_lora()  # set_adapters([]) raises; this serves the base weights
        else:
            slot = next((s for s in self._slots if s.version == adapter), None)
            if slot is None:
                raise RuntimeError(f"adapter {adapter} is not resident (resident: {sorted(self.resident())})")
            self._set_active(slot.name)
            slot.last_used = time.monotonic()
        self._active = adapter

    def _set_active(self, slot_name: str) -> None:
        self.pipe.unet.set_adapter(slot_name)
        self.pipe.unet.enable_lora()


# -- rollout reconciliation ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingTable:
    rollout_id: str  # the registry's rollout version, or CONFIG_ROLLOUT (none published: the config's arms)
    arms: tuple  # ArmSpec, shares summing to 1

    @property
    def adapters(self) -> set:
        return {a.adapter for a in self.arms if a.adapter != BASE}


class RolloutFollower(Poller):
    """Keeps a worker's routing table on the registry's current rollout (poll every `poll_s` seconds)."""

    thread_name = "rollout-follower"

    def __init__(self, slots: AdapterSlots, registry_url: Optional[str], config_arms, poll_s: float = 0.5,
                 source: Optional[Callable] = None):
        from alignloop.registry import Registry

        self.slots = slots
        self.registry = Registry(registry_url)
        self.config_table = RoutingTable(CONFIG_ROLLOUT, tuple(config_arms))
        # Config arms that name adapters are loaded like a rollout's, by the first reconcile (at start); until they
        # are resident the base model serves everyone (routing to an adapter not loaded failed every such request)
        self.table = self.config_table if not self.config_table.adapters else RoutingTable(
            STARTING_ROLLOUT, (ArmSpec("A", BASE, 1.0),))
        self.poll_s = poll_s
        self._source = source or self._current_rollout
        self._refused: dict = {}  # version -> the manifest (or error) it was refused with
        self.last_switch: dict = {}
        # True once a reconcile has read the registry and serves its rollout (or refused it, keeping what served):
        # the worker's readiness waits for it, and a later registry outage does not take it back
        self.settled = False

    def _current_rollout(self):
        from alignloop.rollout import current_rollout

        return current_rollout(self.registry)

    def target(self, rollout) -> RoutingTable:
        if rollout is None:
            return self.config_table
        return RoutingTable(str(rollout.id), tuple(ArmSpec(a.name, a.adapter, float(a.share)) for a in rollout.arms))

    def reconcile(self) -> bool:
        """One check: load what the current rollout needs and switch to it once all of it is resident. True when
        the table changed. Never raises: a bad adapter or an unreadable registry leaves the current table."""
        noticed = time.monotonic()
        try:
            target = self.target(self._source())
        except Exception as err:  # noqa: BLE001 - retried at the next poll
            log.warning("rollout not readable from %s, keeping %s: %s", self.registry.url, self.table.rollout_id, err)
            return False
        if target == self.table:
            self.settled = True
            return False
        if abs(sum(a.share for a in target.arms) - 1.0) > 1e-6 or not target.arms:
            return self._refuse(("rollout", target.rollout_id), target, f"arm shares {target.arms} do not sum to 1")
        for version in sorted(target.adapters - set(self.slots.resident())):
            try:
                manifest = self.registry.get("adapter", version)
            except Exception as err:  # noqa: BLE001 - a missing or malformed manifest
                return self._refuse(version, str(err), f"adapter {version} has no readable manifest: {err}", target)
            if self._refused.get(version) == manifest:
                self.settled = True
                return False  # refused before, unchanged since
            try:
                folder = self.registry.fetch("adapter", version)  # checksums verified
                self.slots.load(folder, manifest, keep=target.adapters | self.table.adapters)
                metrics.ADAPTER_LOADS.labels("ok").inc()
            except SlotsBusy as err:
                return self._make_room(target, err)
            except Exception as err:  # noqa: BLE001
                if not transient(err):  # AdapterRejected, RegistryError (a checksum), a failed smoke test
                    return self._refuse(version, manifest, str(err), target)
                log.warning("rollout %s waits: adapter %s not loaded this time: %s", target.rollout_id, version, err)
                return False
        previous, self.table = self.table, target  # one reference: a request reads the old table or the new
        self.settled = True
        self.last_switch = {"from": previous.rollout_id, "to": target.rollout_id,
                            "switch_s": round(time.monotonic() - noticed, 4), "at": time.time()}
        metrics.ROLLOUT_SWITCHES.inc()
        log.info("rollout %s replaces %s: arms %s", target.rollout_id, previous.rollout_id,
                 [(a.name, a.adapter, a.share) for a in target.arms])
        return True

    def _make_room(self, target: RoutingTable, err: SlotsBusy) -> bool:
        """The target's adapters and the current table's do not fit the slots together (a rollout that replaces
        several adapters at once, or max_adapters 1): switch first to the current table with the arms whose adapters
        the target drops served by the base model, so their slots free once their passes end; the next poll loads
        the target. Without this the follower waited forever. True when the table changed."""
        keep = self.table.adapters & target.adapters
        if len(target.adapters) > self.slots.max_slots or self.table.adapters <= keep:
            log.warning("rollout %s waits: %s", target.rollout_id, err)  # nothing this can free
            return False
        interim = RoutingTable(f"{self.table.rollout_id}+making-room", tuple(
            arm if arm.adapter in keep or arm.adapter == BASE else ArmSpec(arm.name, BASE, arm.share)
            for arm in self.table.arms))
        log.warning("rollout %s needs the slots of %s: their arms get the base model until it is loaded",
                    target.rollout_id, sorted(self.table.adapters - keep))
        self.table = interim
        return True

    def _refuse(self, key, marker, message: str, target=None) -> bool:
        if self._refused.get(key) != marker:
            metrics.ADAPTER_LOADS.labels("refused").inc()
            log.error("rollout %s not served, %s keeps serving: %s", getattr(target, "rollout_id", "?"),
                      self.table.rollout_id, message)
        self._refused[key] = marker
        self.settled = True  # a refused rollout is a decision: what served before keeps serving
        return False

    def refused(self) -> list:
        return sorted(str(k) for k in self._refused)
