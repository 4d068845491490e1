"""Measures a generator or a CLIP model against the oracle on a split of the shapes world."""

import random
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from alignloop.generation import generate
from alignloop.world.grammar import CATEGORIES, all_prompts, split
from alignloop.world.oracle import judge
from alignloop.world.render import render_batch


def image_seed(base_seed: int, prompt_index: int, j: int) -> int:
    """The seed of the j-th image of a prompt: fixed per (base, prompt, j), whatever the batching."""
    return (base_seed * 1_000_003 + prompt_index * 1_000 + j) % (2**31)


def generate_images(pipe, texts, seeds, steps: int, guidance: float, size: int = None) -> np.ndarray:
    """uint8 [B,H,W,3], H = W = size or the pipeline's own resolution: `alignloop.generation.generate`, whose
    per-image CPU generators make every image reproducible from its seed alone, whatever it was batched with and
    on whichever device. Kept for the callers that want uint8 arrays by this name."""
    return generate(pipe, list(texts), list(seeds), steps, guidance, output_type="uint8", size=size)


def time_generation(pipe, images: int = 16, steps: int = 20, guidance: float = 5.0, repeats: int = 5) -> dict:
    """Seconds to draw `images` images of world prompts in one call: median of `repeats` after a warm-up."""
    texts = [p.text for p in random.Random(0).sample(split("seen"), images)]
    seconds = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        generate_images(pipe, texts, range(repeat * images, (repeat + 1) * images), steps, guidance)
        seconds.append(time.perf_counter() - started)
    return {"images": images, "steps": steps, "guidance": guidance, "repeats": repeats,
            "seconds_median": round(statistics.median(seconds[1:]), 3), "seconds": [round(s, 3) for s in seconds[1:]]}


def summarize(prompts, verdicts) -> dict:
    """Overall pass rate, rates per aspect (over prompts naming it) and per category."""
    aspects, categories = defaultdict(list), defaultdict(list)
    for prompt, verdict in zip(prompts, verdicts):
        categories[prompt.category].append(verdict.passed)
        for aspect, ok in verdict.aspects().items():
            aspects[aspect].append(ok)
    rate = lambda xs: round(float(np.mean(xs)), 4)  # noqa: E731
    return {
        "overall": rate([v.passed for v in verdicts]),
        "aspects": {a: rate(xs) for a, xs in sorted(aspects.items())},
        "categories": {c: rate(categories[c]) for c in CATEGORIES if categories[c]},
        "images": len(verdicts),
    }


def draw_split_images(pipe, split_name: str, per_prompt: int, steps: int, guidance: float, seed: int,
                      max_prompts: int = None, batch_size: int = 32, progress: bool = True, eta: float = 0.0):
    """(prompts, seeds, images uint8 [N, H, W, 3]): `per_prompt` images of each prompt of a split (a seeded sample of
    `max_prompts` of them when given), image j of a prompt drawn from image_seed(seed, prompt index, j). eta: DDIM's
    noise (0, deterministic, is what serving draws; PPO's policy is the eta > 0 sampler it was trained with)."""
    prompts = list(split(split_name))
    if max_prompts:
        prompts = random.Random(seed).sample(prompts, min(max_prompts, len(prompts)))
    index = {p: i for i, p in enumerate(all_prompts())}
    jobs = [(p, image_seed(seed, index[p], j)) for p in prompts for j in range(per_prompt)]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"eval {split_name}", disable=not progress):
        chunk = jobs[start:start + batch_size]
        images.append(generate(pipe, [p.text for p, _ in chunk], [s for _, s in chunk], steps, guidance,
                               output_type="uint8", eta=eta))
    return [p for p, _ in jobs], [s for _, s in jobs], np.concatenate(images)


def evaluate_generator(pipe, split_name: str = "unseen", per_prompt: int = 4, steps: int = 20,
                       guidance: float = 5.0, seed: int = 0, max_prompts: int = None, batch_size: int = 32,
                       progress: bool = True) -> dict:
    prompts, seeds, images = draw_split_images(pipe, split_name, per_prompt, steps, guidance, seed, max_prompts,
                                               batch_size, progress)
    result = summarize(prompts, [judge(image, p) for image, p in zip(images, prompts)])
    result.update(split=split_name, prompts=len(prompts) // per_prompt, per_prompt=per_prompt, steps=steps,
                  guidance=guidance, seed=seed, seeds=seeds,
                  seed_rule="seed = (base * 1000003 + index_in_all_prompts * 1000 + j) mod 2**31")
    return result


@torch.no_grad()
def evaluate_clip_retrieval(clip, split_name: str = "all", renders: int = 1000, distractors: int = 9,
                            seed: int = 0) -> dict:
    """Share of renders for which the CLIP ranks the true prompt first among it and `distractors` random
    prompts that the oracle says are false for that render (so every question has one right answer)."""
    rng = random.Random(seed)
    pool = list(split(split_name))
    everything = list(all_prompts())
    prompts = [rng.choice(pool) for _ in range(renders)]
    images, _ = render_batch(prompts, rng, avoid_unseen=split_name != "unseen")
    correct = []
    for start in range(0, renders, 128):
        batch_images = images[start:start + 128]
        pil_images = [Image.fromarray(im) for im in batch_images]
        image_features = torch.nn.functional.normalize(clip.encode_images(pil_images).float(), dim=-1)
        for row, image, prompt in zip(image_features, batch_images, prompts[start:start + 128]):
            candidates = [prompt]
            while len(candidates) < distractors + 1:
                q = rng.choice(everything)
                if q not in candidates and not judge(image, q).passed:
                    candidates.append(q)
            text_features = torch.nn.functional.normalize(clip.encode_texts([c.text for c in candidates]).float(), dim=-1)
            correct.append(int((text_features @ row).argmax()) == 0)
    return {"split": split_name, "renders": renders, "candidates": distractors + 1,
            "accuracy": round(float(np.mean(correct)), 4), "seed": seed}

