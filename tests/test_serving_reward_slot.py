"""A worker follows the registry's live reward model: checked before it serves, swapped whole, bad ones refused."""

import pytest
import torch

from alignloop.models import load_clip
from alignloop.registry import Registry
from alignloop.rewards import RewardHead, RewardScorer, clip_hash, save_head
from alignloop.serving.reward_slot import RegistryFollower, RewardSlot


@pytest.fixture(scope="module")
def clip():
    return load_clip(device="cpu")


def _publish(registry, tmp_path, head, name, **metadata):
    path = save_head(head, tmp_path / f"{name}.safetensors", metadata)
    return registry.publish("reward", {"head.safetensors": path}, state="live", who="test", why=name)


def test_the_live_head_replaces_clip_score_and_bad_heads_are_refused(clip, tmp_path):
    registry = Registry(tmp_path / "registry")
    slot = RewardSlot(RewardScorer(clip))
    follower = RegistryFollower(slot, str(tmp_path / "registry"), backend="torch", poll_s=60)
    images = torch.rand(3, 3, 32, 32)

    # 1. Nothing live: CLIP score keeps serving.
    assert follower.reconcile() is None and slot.current()[1] == "clip"

    # 2. A sound head goes live: the next request is scored by it, in (0, 1).
    torch.manual_seed(0)
    good = RewardHead(clip.embed_dim, (32, 16))
    first = _publish(registry, tmp_path, good, "good", clip_hash=clip_hash(clip))
    assert follower.reconcile() == f"reward:{first.version}"
    scorer, name = slot.current()
    assert name == f"reward:{first.version}"
    rewards = scorer.score(images, "two red circles")
    assert ((rewards > 0) & (rewards < 1)).all()
    assert follower.reconcile() is None  # already current

    # 3. A head for another CLIP, and a corrupt one: refused, the good one keeps serving, no retry per poll.
    _publish(registry, tmp_path, RewardHead(clip.embed_dim, (32, 16)), "other-clip", clip_hash="0123456789abcdef")
    assert follower.reconcile() is None and slot.current()[1] == name
    broken = _publish(registry, tmp_path, good, "broken", clip_hash=clip_hash(clip))
    (registry.fetch("reward", broken.version) / "head.safetensors").write_bytes(b"not a head")
    assert follower.reconcile() is None and slot.current() == (scorer, name)
    assert follower._refused.keys() == {"v000002", broken.version}
    assert torch.equal(slot.current()[0].score(images, "two red circles"), rewards)


def test_a_store_blip_is_retried_at_the_next_poll_not_refused(clip, tmp_path, monkeypatch):
    """An OSError fetching the live head (an object store timing out) leaves the current scorer serving and the head
    not refused: the next poll swaps it in (a refusal would have lasted until its manifest changed)."""
    registry = Registry(tmp_path / "registry")
    slot = RewardSlot(RewardScorer(clip))
    follower = RegistryFollower(slot, str(tmp_path / "registry"), backend="torch", poll_s=60)
    head = _publish(registry, tmp_path, RewardHead(clip.embed_dim, (32, 16)), "good", clip_hash=clip_hash(clip))
    fetch = follower.registry.fetch
    blips = iter([OSError("s3: read timed out")])

    def flaky_fetch(*args, **kwargs):
        for err in blips:
            raise err
        return fetch(*args, **kwargs)

    monkeypatch.setattr(follower.registry, "fetch", flaky_fetch)
    assert follower.reconcile() is None and slot.current()[1] == "clip" and not follower._refused
    assert follower.reconcile() == f"reward:{head.version}"


def test_a_request_keeps_the_scorer_it_started_with(clip):
    slot = RewardSlot(RewardScorer(clip))
    scorer, name = slot.current()
    slot.swap("another scorer", "reward:v000009")
    assert (scorer, name) != slot.current() and slot.current()[1] == "reward:v000009"
    assert name == "clip" and scorer.head is None  # what a request read before the swap is unchanged
