"""The one generation path: serving, `world eval`, `alignloop generate` and the trainer all draw images here.

    images = generate(pipe, prompts, seeds, steps=20, guidance=5.0)                 # float [B,3,H,W] in [0,1], CPU
    images = generate(pipe, prompts, seeds, 20, 5.0, output_type="uint8")          # uint8 [B,H,W,3]

Why one path: a seed must give the same image whether it is drawn by a served request, `world eval`, the
`generate` command or a PPO rollout (trainer/rollout.py follows the same seeding), alone or batched with other
prompts, on CPU or CUDA. So every image gets its own CPU `torch.Generator` seeded with its own seed: the pipeline
draws image i's starting noise (and, with eta > 0, its per-step noise) from generator i only, on the CPU, then
moves it to the pipeline's device. (A batched convolution can differ in the last bits between batch sizes;
images agree to well within one 8-bit level.)

The adapter in effect is the caller's business: `generate` draws with whatever LoRA adapters the pipeline has
active when it is called (diffusers' `set_adapters` / `disable_lora`), and changes none of them. Callers that
record an image say which adapter drew it.
"""

from typing import Optional, Sequence

import numpy as np
import torch

OUTPUT_TYPES = ("pt", "np", "uint8", "latent")


def cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             output_type: str = "pt", negative_prompt_embeds: Optional[torch.Tensor] = None, eta: float = 0.0,
             size: Optional[int] = None):
    """Images for `prompts`, image i drawn from `seeds[i]` alone.

    output_type:
      "pt"     float32 tensor [B, 3, H, W] in [0, 1], on the CPU (what the scorer and the serving batcher take)
      "np"     float32 array [B, H, W, 3] in [0, 1]
      "uint8"  uint8 array [B, H, W, 3] (what the oracle and PNG files take)
      "latent" the final latents [B, C, h, w] float32 on the CPU, scaled as the UNet sees them
    negative_prompt_embeds: [1 or B, L, D]; None uses the pipeline's own (the empty prompt's) embedding.
    eta: DDIM's noise scale (0 is deterministic DDIM; the pipeline's scheduler must take `eta`, as DDIM does).
    size: height = width in pixels; None is the pipeline's own resolution.
    """
    # 1. Check inputs
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"prompts and seeds must be non-empty and of the same length (one seed per image), "
                         f"got {len(prompts)} prompts and {len(seeds)} seeds")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if negative_prompt_embeds is not None:
        if negative_prompt_embeds.dim() != 3 or negative_prompt_embeds.shape[0] not in (1, len(prompts)):
            raise ValueError(f"negative_prompt_embeds must be [1 or {len(prompts)}, L, D], "
                             f"got {tuple(negative_prompt_embeds.shape)}")
        negative_prompt_embeds = negative_prompt_embeds.expand(len(prompts), -1, -1)

    # 2. Denoise and decode with one CPU generator per image (the pipeline draws image i's noise from generator i)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
                   negative_prompt_embeds=negative_prompt_embeds, eta=eta, generator=cpu_generators(seeds),
                   height=size, width=size, output_type="np" if output_type == "uint8" else output_type)
    images = out.images

    # 3. Convert to the asked form
    if output_type == "uint8":
        return (images * 255).round().astype(np.uint8)
    if output_type in ("pt", "latent"):
        return images.float().cpu()
    return images.astype(np.float32)
