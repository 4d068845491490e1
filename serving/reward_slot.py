"""The reward model a serving worker ranks with, and how it follows the registry's live one.

    slot = RewardSlot(RewardScorer(clip), "clip")        # CLIP score until a reward head is live
    follower = RegistryFollower(slot, registry_url, poll_s=30).start()   # heads for the slot's CLIP
    scorer, name = slot.current()                       # what the sampler scores one request with

BentoML workers are separate processes, so none of them is told about a new reward model: each polls the
registry (the trainer publishes there) and converges by itself. A new live head is loaded beside the current
one and checked (weights and shape by `load_head`, the CLIP it was trained on, a smoke score that is finite
and in [0, 1]) before one reference assignment makes it current. A request reads the slot once, so it is
scored by one model from start to end and its event names that model; a request already scoring keeps
the old scorer, which stays alive until it is done. A head that fails its checks is logged and counted, the
current model keeps serving, and that version is not retried until the registry's manifest for it changes.
"""

import logging
from typing import Optional

import torch

from alignloop.serving import metrics
from alignloop.serving.polling import Poller, transient

log = logging.getLogger("alignloop.serving")
CLIP_SCORE = "clip"  # the name of the reward when no head is live


def reward_name(version: str) -> str:
    """How events, responses and metrics name a registry reward model version."""
    return f"reward:{version}"


class RewardSlot:
    """(scorer, name) of the reward model in use; swapped whole, read without a lock."""

    def __init__(self, scorer, name: str = CLIP_SCORE):
        self._current = (scorer, name)

    def current(self) -> tuple:
        return self._current  # one reference read: a request never sees half a swap

    def swap(self, scorer, name: str) -> None:
        previous = self._current[1]
        self._current = (scorer, name)
        metrics.REWARD_MODEL_SWAPS.labels("ok").inc()
        log.info("reward model %s replaces %s", name, previous)


class RegistryFollower(Poller):
    """Keeps a RewardSlot on the registry's live reward model (poll every `poll_s` seconds)."""

    thread_name = "reward-follower"

    def __init__(self, slot: RewardSlot, registry_url: Optional[str] = None, backend: str = "auto",
                 poll_s: float = 30.0):
        from alignloop.registry import Registry

        self.slot = slot
        self.clip = slot.current()[0].clip  # heads must match the CLIP this worker embeds with
        self.registry = Registry(registry_url)
        self.backend = backend
        self.poll_s = poll_s
        self._refused = {}  # version -> manifest it was refused with, so a bad head is not reloaded every poll

    def reconcile(self) -> Optional[str]:
        """One check: loads and swaps in the live head if it is new and sound. Returns the name now current when
        it changed, else None. Never raises for a bad head or an unreachable registry: the current one serves."""
        try:
            live = self.registry.live("reward")
        except Exception as err:  # noqa: BLE001 - an unreachable registry is retried at the next poll
            log.warning("reward registry %s not readable, keeping %s: %s", self.registry.url, self.slot.current()[1], err)
            return None
        if live is None or reward_name(live.version) == self.slot.current()[1] or self._refused.get(live.version) == live:
            return None
        try:
            scorer = self._load_checked(live.version)
        except Exception as err:  # noqa: BLE001 - any failure leaves the current model serving
            if transient(err):  # a store blip or no memory now: tried again at the next poll
                log.warning("reward %s not loaded this time, %s keeps serving: %s", live.version,
                            self.slot.current()[1], err)
                return None
            self._refused[live.version] = live
            metrics.REWARD_MODEL_SWAPS.labels("refused").inc()
            log.error("reward %s not swapped in, %s keeps serving: %s", live.version, self.slot.current()[1], err)
            return None
        self.slot.swap(scorer, reward_name(live.version))
        return reward_name(live.version)

    def _load_checked(self, version: str):
        from alignloop.rewards import RewardScorer, load_head_for

        path = self.registry.fetch("reward", version) / "head.safetensors"  # checksums verified
        head = load_head_for(path, self.clip)  # keys, shapes, finite weights, the CLIP it was trained on
        scorer = RewardScorer(self.clip, head=head, backend=self.backend)
        size = self.clip.image_size
        smoke = scorer.score(torch.full((2, 3, size, size), 0.5), "a smoke test")
        if smoke.shape != (2,) or not torch.isfinite(smoke).all() or not ((smoke >= 0) & (smoke <= 1)).all():
            raise ValueError(f"reward {version} scored a smoke image {smoke.tolist()}, not two values in [0, 1]")
        return scorer
