"""Full-size figures on a GPU: a Stable-Diffusion-1.5-sized pipeline and a ViT-L-14 reward scorer, random weights.

No hub is reachable, so the models are built from their published architectures with random weights: the
SD 1.5 UNet (320/640/1280/1280, cross-attention 768), its AutoencoderKL (128/256/512/512), a CLIP ViT-L/14
text encoder (12 x 768), and open_clip's ViT-L-14 with a reward head of Lee et al.'s size (768 -> 1024 ->
1024) loaded through `alignloop.models.load_clip` from a saved checkpoint. Speed does not depend on the
weights' values. One request = n images at 512x512, `--steps` DDIM steps with classifier-free guidance,
then scoring all n against the prompt; timed per stage, medians of `--repeats`, fp16.

    python scripts/bench_sd15_gpu.py --json --out sd15.json
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_sd15(device, dtype, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignloop.models import build_clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.x defaults
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(tokenizer_dir, 77),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=16, help="images per request (default 16)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import open_clip

    from alignloop.machine import describe_machine
    from alignloop.models import load_clip
    from alignloop.rewards import RewardHead, RewardScorer

    device, dtype = torch.device("cuda"), torch.float16
    prompt = "three red circles on a white background"
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_sd15(device, dtype, Path(tmp) / "tokenizer")
        checkpoint = Path(tmp) / "vit-l-14.pt"
        torch.save(open_clip.create_model("ViT-L-14", pretrained=None).state_dict(), checkpoint)
        clip = load_clip("ViT-L-14", checkpoint=str(checkpoint), device=device, dtype=dtype)
    head = RewardHead(clip.embed_dim, (1024, 1024))

    def generate():
        return pipe(prompt, num_images_per_prompt=args.n, num_inference_steps=args.steps, guidance_scale=7.5,
                    generator=torch.Generator(device).manual_seed(0), output_type="pt").images  # [n,3,512,512]

    generate()  # warm-up: cuDNN autotuning, allocator
    generate_s, images = timed(generate, args.repeats)
    result = {"n": args.n, "steps": args.steps, "resolution": 512, "dtype": "fp16", "generate_s": round(generate_s, 4),
              "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "scoring": {},
              "machine": describe_machine()}
    for backend in ("triton", "torch"):
        scorer = RewardScorer(clip, head, backend=backend)
        scorer.score(images, prompt)  # warm-up: compile, text cache
        score_s, _ = timed(lambda: scorer.score(images, prompt), args.repeats)
        pixels = images.float().cpu()
        prep_s, _ = timed(lambda: scorer.pixels(pixels), args.repeats)
        result["scoring"][backend] = {"score_s": round(score_s, 4), "preprocess_s": round(prep_s, 4),
                                      "share_of_request": round(score_s / (generate_s + score_s), 4)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if not args.json:
        print(f"SD-1.5-sized pipeline, n={args.n}, {args.steps} steps, 512x512 fp16: {generate_s:.3f} s")
        for backend, r in result["scoring"].items():
            print(f"  scoring ({backend}): {r['score_s'] * 1e3:.1f} ms = {r['share_of_request']:.2%} of the request "
                  f"(of which CPU preprocessing {r['preprocess_s'] * 1e3:.1f} ms)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
