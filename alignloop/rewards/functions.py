"""Every reward behind one signature, chosen by name (STYLE.md 8):

    reward = get_reward("learned")                      # the registry's live head; or path=, head=, version=
    scores, info = reward(images, prompts, meta)        # scores: float32 tensor [B] on CPU; info: a dict

`images` is a uint8 numpy array [B, H, W, 3], a float tensor [B, 3, H, W] in [0, 1] or a list of B PIL
images; `prompts` a list of B strings (image i was drawn for prompts[i]); `meta` optional per-call context
that a reward may read (none of the four here needs it). Higher scores are better.

    clip             cosine similarity of the CLIP image and text embeddings, in [-1, 1] (the baseline)
    learned          a trained reward head (Lee et al.) on the same CLIP embeddings, in (0, 1)
    oracle           the shapes world's judge: 1.0 if the image passes, else 0.0 (the ceiling of any reward)
    color_diversity  a distribution-level reward: images whose dominant color is rare in the batch score higher

The factories load their models once; the returned function is cheap to call many times.
"""

import collections
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from alignloop.rewards.images import Images, check_images, select, to_clip_input, to_uint8

RewardFn = Callable[..., tuple]  # fn(images, prompts, meta=None) -> (scores float32 [B], info dict)
REWARD_KIND = "reward"  # the registry kind of reward heads


def get_reward(name: str, **kwargs) -> RewardFn:
    """The reward called `name` (one of REWARDS), built with `kwargs` (see each factory)."""
    if name not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(sorted(REWARDS))}, got {name!r}")
    return REWARDS[name](**kwargs)


def check_call(images: Images, prompts: Sequence[str]) -> list:
    """The prompts as a list, after checking that there is one non-empty string per image."""
    count = check_images(images)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of {count} strings (one per image), got {type(prompts).__name__}")
    if len(prompts) != count:
        raise ValueError(f"prompts must have one entry per image: {count} images, got {len(prompts)} prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}] must be a non-empty string, got {prompt!r}")
    return list(prompts)


# -------------------------------------------------------------------------------------------------
# clip and learned: the RewardScorer of the serving path, one call per distinct prompt
# -------------------------------------------------------------------------------------------------

def _load_clip(clip, device):
    from alignloop.models import load_clip

    return load_clip(clip, device=device) if isinstance(clip, str) else clip


def score_by_prompt(scorer, images: Images, prompts: list) -> torch.Tensor:
    """scorer.score over the images of each distinct prompt, back in input order: float32 [B]."""
    images = to_clip_input(images)
    scores = torch.zeros(len(prompts), dtype=torch.float32)
    groups = collections.defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    for prompt, indices in groups.items():
        scores[indices] = scorer.score(select(images, indices), prompt).float()
    return scores


def clip_reward(clip="shapes-clip-tiny", backend: str = "auto", device=None) -> RewardFn:
    """CLIP score: cosine similarity of image and prompt embeddings, [-1, 1]. `clip`: a ClipBundle or a
    spec for alignloop.models.load_clip (the bundled tiny CLIP by default)."""
    from alignloop.rewards.scorer import RewardScorer

    scorer = RewardScorer(_load_clip(clip, device), head=None, backend=backend)

    def reward(images, prompts, meta=None):
        prompts = check_call(images, prompts)
        return score_by_prompt(scorer, images, prompts), {"reward": "clip", "clip": scorer.clip.name,
                                                          "backend": scorer.backend}

    return reward


def learned_reward(head=None, path=None, version: Optional[str] = None, registry: Optional[str] = None,
                   clip="shapes-clip-tiny", backend: str = "auto", device=None) -> RewardFn:
    """A trained reward head, from one source: `head` (a RewardHead in memory), `path` (a head's
    .safetensors file, or a folder holding head.safetensors), or the registry at `registry` (None: the
    default one): its version `version`, or its live reward model. `info["version"]` names the registry
    version (None for a head that does not come from the registry). The head must have been trained on
    embeddings of this `clip`: a head file that records another CLIP's hash is an error."""
    from alignloop.rewards.scorer import RewardScorer, load_head_for

    # 1. Check inputs: one source
    given = [name for name, value in (("head", head), ("path", path)) if value is not None]
    if len(given) > 1 or (given and version is not None):
        raise ValueError(f"learned_reward takes one source (head, path, or a registry version), got "
                         f"{', '.join(given + (['version'] if version is not None else []))}")
    # 2. Load the head and note where it came from
    clip = _load_clip(clip, device)
    source = {"version": None, "path": None}
    if head is None:
        if path is None:
            path, manifest = head_from_registry(registry, version)
            source["version"] = manifest.version
        path = Path(path)
        if path.is_dir():
            path = path / "head.safetensors"
        head = load_head_for(path, clip)
        source["path"] = str(path)
    scorer = RewardScorer(clip, head=head, backend=backend)

    def reward(images, prompts, meta=None):
        prompts = check_call(images, prompts)
        return score_by_prompt(scorer, images, prompts), {"reward": "learned", **source, "clip": clip.name,
                                                          "backend": scorer.backend}

    return reward


def head_from_registry(registry: Optional[str] = None, version: Optional[str] = None) -> tuple:
    """(path of head.safetensors, manifest) of a reward model version in the registry, or of the live one."""
    from alignloop.registry import Registry

    store = Registry(url=registry)
    manifest = store.get(REWARD_KIND, version) if version is not None else store.live(REWARD_KIND)
    if manifest is None:
        raise LookupError(f"the registry at {registry or 'the default location'} has no live reward model: "
                          "train one with `alignloop train reward --snapshot DIR`, or pass path= or version=")
    return Path(store.fetch(REWARD_KIND, manifest.version)) / "head.safetensors", manifest


# -------------------------------------------------------------------------------------------------
# oracle: the shapes world's judge
# -------------------------------------------------------------------------------------------------

def oracle_reward() -> RewardFn:
    """1.0 where the oracle passes the image for its prompt, else 0.0. info["verdicts"]: per image, the
    verdict of each aspect the prompt names (count, color, shape, background), "passed", and "found_count" (the
    objects of the judged color it counted, a clump as the objects it seems to hold). Shapes world
    only: a prompt outside its grammar is an error naming it."""
    from alignloop.world import judge, parse_prompt

    def reward(images, prompts, meta=None):
        prompts = check_call(images, prompts)
        parsed = [parse_prompt(p) for p in prompts]
        outside = [i for i, p in enumerate(parsed) if p is None]
        if outside:
            i = outside[0]
            raise ValueError(f"the oracle reward judges only prompts of the shapes world: prompts[{i}] = "
                             f"{prompts[i]!r} is not one ({len(outside)} of {len(prompts)} are not)")
        verdicts = [judge(image, prompt) for image, prompt in zip(to_uint8(images), parsed)]
        scores = torch.tensor([float(v.passed) for v in verdicts], dtype=torch.float32)
        return scores, {"reward": "oracle", "verdicts": [{**v.aspects(), "passed": v.passed,
                                                             "found_count": v.found_count} for v in verdicts]}

    return reward


# -------------------------------------------------------------------------------------------------
# color_diversity: a distribution-level reward (Zhang et al. 2024, eq. 12, per image)
# -------------------------------------------------------------------------------------------------

def dominant_colors(images: Images) -> list:
    """Per image, the object color (of the shapes world's palette) covering the most pixels of the objects the
    oracle reads (`alignloop.world.oracle.read_scene`), or None when it finds no object of an object color."""
    from alignloop.world.oracle import read_scene
    from alignloop.world.render import OBJECT_RGB

    out = []
    for image in to_uint8(images):
        pixels = collections.Counter()
        for name, mask in read_scene(image)[2]:
            if name in OBJECT_RGB:
                pixels[name] += int(mask.sum())
        out.append(pixels.most_common(1)[0][0] if pixels else None)
    return out


def color_diversity_reward() -> RewardFn:
    """How much each image adds to the color diversity of its batch, for prompts that leave color open.

    Exactly: the images counted are those whose prompt is a shapes-world prompt naming no color ("three
    squares"); every other image scores 0.0 and is left out. For each counted image, a = its dominant
    color (`dominant_colors`); p(a) = the share of the counted images with a dominant color whose
    dominant color is a; K = 7, the number of colors. A counted image scores 1/K - p(a): positive when
    its color is under-represented in the batch (rarer than uniform), negative when over-represented.
    A counted image with no dominant color (nothing drawn) scores 1/K - 1, the lowest possible score.

    Why this form: the mean of 1/K - p(a) over the images with a dominant color is 1/K - sum_a p(a)^2 =
    -||p - u||^2, u the uniform distribution: the negated square of Zhang et al.'s statistical parity
    (eq. 12), so raising every image's score raises the batch's parity reward. info["parity"] is
    ||p - u|| itself (0 for a uniform batch), info["distribution"] is p, info["colors"] the per-image a.
    """
    from alignloop.world import COLORS, parse_prompt

    def reward(images, prompts, meta=None):
        prompts = check_call(images, prompts)
        # 1. Which images count: prompts of the world that leave the color open
        parsed = [parse_prompt(p) for p in prompts]
        counted = [p is not None and p.color is None for p in parsed]
        # 2. Dominant colors and their distribution over the counted images
        colors = dominant_colors(images)
        present = [c for c, used in zip(colors, counted) if used and c is not None]
        share = {c: present.count(c) / len(present) for c in COLORS} if present else {c: 0.0 for c in COLORS}
        # 3. Per-image scores
        scores = torch.zeros(len(prompts), dtype=torch.float32)
        for i, (color, used) in enumerate(zip(colors, counted)):
            if used:
                scores[i] = 1 / len(COLORS) - (share[color] if color is not None else 1.0)
        parity = float(np.sqrt(sum((share[c] - 1 / len(COLORS)) ** 2 for c in COLORS))) if present else None
        return scores, {"reward": "color_diversity", "colors": colors, "counted": counted,
                        "distribution": share, "parity": parity}

    return reward


REWARDS = {"clip": clip_reward, "learned": learned_reward, "oracle": oracle_reward,
           "color_diversity": color_diversity_reward}
