"""The data every fine-tuning method trains on: base samples of seen prompts with votes, and fresh renders.

    samples = draw_samples(pipe, prompts, per_prompt=8, steps=20, guidance=5.0, seed=0)   # cached to a .npz
    samples.latents      # [N, 4, 16, 16] fp32: the sampler's own final latents (what the images decode from)
    samples.images       # [N, 32, 32, 3] uint8
    votes = rater_votes(samples, flip=0.1, seed=0)                     # +1 up / -1 down / 0 not voted
    prompts, images = seen_renders(rng, n)                             # the pre-training term's data

Held-out pairs never enter the loop's prompts: samples are drawn for seen prompts only (a sample of a prompt that
leaves its color or background open may still show a held-out pair: the generator chooses), and the pre-training
renders are of seen prompts with their open attributes drawn away from held-out pairs (`avoid_unseen`).
`pretraining_renders` of alignloop.world.train draws from every prompt (the base models saw them all) and must not be used here.
"""

import dataclasses
import hashlib
import io
import logging
import random
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from alignloop.durable import write_durably
from alignloop.world.evaluate import image_seed
from alignloop.world.grammar import all_prompts, sample_prompts, split
from alignloop.world.oracle import judge
from alignloop.world.render import render_batch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Samples:
    prompts: list  # N world Prompt objects
    seeds: np.ndarray  # [N] int64 per-image seeds (alignloop.world.evaluate.image_seed)
    latents: np.ndarray  # [N, C, h, w] float32, scaled as the UNet sees them
    images: np.ndarray  # [N, H, W, 3] uint8
    passed: np.ndarray  # [N] bool, the oracle's verdict (for measurement only; training reads votes)

    def __len__(self) -> int:
        return len(self.prompts)


def check_seen(prompts: Sequence) -> None:
    unseen = [p.text for p in prompts if p.unseen]
    if unseen:
        raise ValueError(f"held-out prompts must not enter the feedback loop, got {len(unseen)}: {unseen[:3]}")


@torch.no_grad()
def draw_samples(pipe, prompts: Sequence, per_prompt: int, steps: int, guidance: float, seed: int,
                 batch_size: int = 32, cache_dir: Optional[Path] = None, progress: bool = True,
                 eta: float = 0.0) -> Samples:
    """`per_prompt` base samples of each prompt with their final latents; seeded per image as `world eval` is.
    With `cache_dir`, kept in a file named by what determines them (generator weights, prompts, settings)."""
    check_seen(prompts)
    index = {p: i for i, p in enumerate(all_prompts())}
    jobs = [(p, image_seed(seed, index[p], j)) for p in prompts for j in range(per_prompt)]
    cache, samples = None, None
    if cache_dir is not None:
        settings = (per_prompt, steps, guidance, seed) + ((eta,) if eta else ())  # eta 0 keeps the older files' names
        key = hashlib.sha256(repr((_weights_digest(pipe.unet), [p.text for p in prompts], *settings)).encode()
                             ).hexdigest()[:16]
        cache = Path(cache_dir) / f"samples-{key}.npz"
        try:
            with np.load(cache) as data:
                samples = Samples([p for p, _ in jobs], data["seeds"], data["latents"], data["images"],
                                  np.zeros(len(jobs), dtype=bool))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:  # torn by a crash: drawn again
            log.warning("base-sample cache %s unreadable (%s): drawing the samples again", cache, err)
    if samples is None:
        samples = _draw(pipe, jobs, steps, guidance, eta, batch_size, progress)
        if cache is not None:  # whole or absent, also with two jobs drawing the same samples at once
            buffer = io.BytesIO()
            np.savez(buffer, seeds=samples.seeds, latents=samples.latents, images=samples.images)
            write_durably(cache, buffer.getvalue())
    # Judged here, never read back from the cache: its name says the generator, not the oracle, and a fixed oracle
    # must not keep yesterday's verdicts (about 2 ms an image)
    samples.passed = np.array([judge(im, p).passed for im, p in zip(samples.images, samples.prompts)])
    return samples


def _draw(pipe, jobs: list, steps: int, guidance: float, eta: float, batch_size: int, progress: bool) -> Samples:
    latents, images = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc="base samples", disable=not progress):
        chunk = jobs[start:start + batch_size]
        z, x = sample_latents(pipe, [p.text for p, _ in chunk], [s for _, s in chunk], steps, guidance, eta)
        latents.append(z.float().cpu().numpy())
        images.append(x)
    return Samples([p for p, _ in jobs], np.array([s for _, s in jobs], dtype=np.int64),
                   np.concatenate(latents), np.concatenate(images), np.zeros(len(jobs), dtype=bool))


def sample_latents(pipe, texts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, eta: float = 0.0):
    """(final latents [B, C, h, w], images uint8 [B, H, W, 3]): alignloop.generation's path, latents kept."""
    from alignloop.generation import generate
    from alignloop.rewards.images import to_uint8
    from alignloop.trainer.rollout import decode_images

    latents = generate(pipe, texts, seeds, steps, guidance, output_type="latent", eta=eta)
    return latents, to_uint8(decode_images(pipe, latents))


def rater_votes(samples: Samples, flip: float, seed: int, count: Optional[int] = None) -> np.ndarray:
    """Simulated thumbs on `count` of the samples (all when None): +1 up, -1 down, 0 not voted."""
    from alignloop.world.rater import SimulatedRater

    rater, draw = SimulatedRater(flip=flip), random.Random(seed)
    order = np.random.default_rng(seed).permutation(len(samples))[:count]
    votes = np.zeros(len(samples), dtype=np.int8)
    for i in order:  # the oracle's verdict is already in `passed`: the rater's p_up turns it into a vote
        votes[i] = 1 if draw.random() < rater.p_up(bool(samples.passed[i]), samples.prompts[i].category) else -1
    return votes


def seen_renders(rng: random.Random, n: int):
    """(prompts, images uint8 [n, H, W, 3]) of n renders of seen prompts, held-out pairs avoided."""
    prompts = sample_prompts(rng, n, "seen")
    images, _ = render_batch(prompts, rng, avoid_unseen=True)
    return prompts, images


def seen_prompts() -> list:
    return list(split("seen"))


def _weights_digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
