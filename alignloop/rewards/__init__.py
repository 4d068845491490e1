"""alignloop.rewards: the reward model and every reward behind one signature.

    from alignloop.rewards import get_reward
    reward = get_reward("clip")                          # or "learned", "oracle", "color_diversity"
    scores, info = reward(images, prompts, meta)         # float32 [B] on CPU, higher is better

| module | holds |
|---|---|
| `head.py` | `RewardHead` (Lee et al.'s MLP on CLIP embeddings: the definition every kernels/ backend matches), `save_head` / `load_head` |
| `scorer.py` | `RewardScorer`: CLIP + head (or CLIP score) on the serving path, one prompt at a time; `clip_hash` |
| `functions.py` | `get_reward(name, **kwargs)` and the rewards `clip`, `learned`, `oracle`, `color_diversity` |
| `images.py` | the image forms the rewards accept (uint8 [B,H,W,3], float [B,3,H,W], PIL list) |

The trainer (alignloop.trainer.reward_model) trains the head; alignloop.kernels holds its fast backends.
Names load on first use (PEP 562): importing the package does not import torch's kernels or the CLIP.
"""

from alignloop import lazy_exports

_EXPORTS = {
    "RewardHead": "head", "check_embeddings": "head", "NORM_EPS": "head", "save_head": "head",
    "load_head": "head", "read_head_metadata": "head",
    "RewardScorer": "scorer", "clip_hash": "scorer", "load_head_for": "scorer",
    "get_reward": "functions", "REWARDS": "functions", "dominant_colors": "functions",
    "Images": "images", "check_images": "images", "to_uint8": "images",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
