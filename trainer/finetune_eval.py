"""Evaluation of a generator with or without an adapter: alignment, fidelity, diversity, and a seeded grid.

    report = evaluate_adapter(pipe, clip, "unseen", per_prompt=4, steps=20, guidance=5.0, seed=0)
    report["overall"], report["aspects"], report["categories"]    # the oracle's pass rates
    report["fidelity_fd"]     # Fréchet distance of CLIP image embeddings, generated vs renders of the same prompts
    report["diversity"]       # mean pairwise cosine distance of the embeddings of one prompt's images

The seeds are `world eval`'s (alignloop.world.evaluate.image_seed), so the base and every adapter draw the same
starting noise for the same (prompt, j): differences are the adapter's. The fidelity proxy is FID computed on
the tiny CLIP's image embeddings instead of Inception features (none here): lower is closer to the world's own
images; reward hacking (degenerate layouts, one look for every prompt) raises it. Diversity catches collapse:
a prompt leaves position, size and open attributes free, so its images should differ.
"""

import random
from typing import Optional

import numpy as np
import torch
from PIL import Image

from alignloop.world.evaluate import draw_split_images, summarize
from alignloop.world.oracle import judge
from alignloop.world.render import render_batch


@torch.no_grad()
def clip_embeddings(clip, images: np.ndarray) -> np.ndarray:
    """L2-normalized CLIP image embeddings [N, D] (float64) of uint8 images."""
    rows = []
    for start in range(0, len(images), 256):
        emb = clip.encode_images([Image.fromarray(im) for im in images[start:start + 256]]).float()
        rows.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
    return np.concatenate(rows).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between Gaussian fits of two sets of embeddings [N, D]."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)  # complex when the covariances are singular (few images): its real part
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def diversity(embeddings: np.ndarray, per_prompt: int) -> float:
    """Mean pairwise cosine distance among each prompt's images (rows grouped per prompt, in order)."""
    groups = embeddings.reshape(-1, per_prompt, embeddings.shape[1])
    sims = np.einsum("gid,gjd->gij", groups, groups)
    off_diagonal = ~np.eye(per_prompt, dtype=bool)
    return float((1 - sims[:, off_diagonal]).mean())


def evaluate_adapter(pipe, clip, split_name: str = "unseen", per_prompt: int = 4, steps: int = 20,
                     guidance: float = 5.0, seed: int = 0, max_prompts: Optional[int] = None,
                     progress: bool = True, eta: float = 0.0) -> dict:
    """The pipeline as it is now (its active adapter, if any): oracle pass rates, fidelity and diversity."""
    if per_prompt < 2:
        raise ValueError(f"per_prompt must be >= 2 to measure diversity, got {per_prompt}")
    prompts, _, images = draw_split_images(pipe, split_name, per_prompt, steps, guidance, seed, max_prompts,
                                           progress=progress, eta=eta)
    verdicts = [judge(im, p) for im, p in zip(images, prompts)]
    report = image_metrics(clip, split_name, prompts, images, verdicts, per_prompt, seed)
    report.update(split=split_name, prompts=len(prompts) // per_prompt, per_prompt=per_prompt, steps=steps,
                  guidance=guidance, seed=seed, eta=eta)
    report["passed"] = [int(v.passed) for v in verdicts]  # per image, in the seeded order: two pipelines pair up
    return report


def image_metrics(clip, split_name: str, prompts, images: np.ndarray, verdicts, per_prompt: int, seed: int) -> dict:
    """world.evaluate.summarize of the verdicts, plus the fidelity proxy and diversity of images drawn
    `per_prompt` a prompt (rows grouped per prompt, in order)."""
    report = summarize(prompts, verdicts)
    renders, _ = render_batch(prompts, random.Random(seed), avoid_unseen=split_name != "unseen")
    generated = clip_embeddings(clip, images)
    report.update(fidelity_fd=round(frechet_distance(generated, clip_embeddings(clip, renders)), 5),
                  diversity=round(diversity(generated, per_prompt), 5))
    return report


def image_grid(rows: list, path, scale: int = 3) -> None:
    """A PNG of image rows (each a uint8 array [M, H, W, 3]) with a 2 px gap, upscaled for viewing."""
    height, width = rows[0].shape[1:3]
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * (width + 2), len(rows) * (height + 2)), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(Image.fromarray(image), (j * (width + 2), i * (height + 2)))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)
