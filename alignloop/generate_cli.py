"""`alignloop generate PROMPT -n N --out DIR`: plain generation with a generator, no ranking."""

import json
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate images for a prompt and write them as PNGs",
                       description="Generate N images for PROMPT with the generator and write them to --out. "
                                   "Each image i uses seed SEED+i, so any one image can be reproduced alone.")
    p.add_argument("prompt", help="the text prompt, e.g. 'two red circles on a gray background'")
    p.add_argument("-n", type=int, default=4, help="number of images, 1..64 (default 4)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created if missing)")
    p.add_argument("--generator", default="shapes-sd-tiny", help="bundled name, diffusers folder or hub id")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps, 1..150 (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance, 0..30 (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from alignloop.errors import UserFacingError

    # 1. Check inputs (before loading anything).
    prompt = args.prompt.strip()
    checks = [(1 <= len(prompt) <= 500, f"PROMPT must be 1..500 characters after trimming, got {len(prompt)}"),
              (1 <= args.n <= 64, f"-n must be in 1..64, got {args.n}"),
              (1 <= args.steps <= 150, f"--steps must be in 1..150, got {args.steps}"),
              (0 <= args.guidance <= 30, f"--guidance must be in 0..30, got {args.guidance}")]
    for ok, message in checks:
        if not ok:
            raise UserFacingError(message)

    # 2. Load the generator.
    from PIL import Image

    from alignloop.generation import generate
    from alignloop.models import ModelNotFoundError, load_generator

    try:
        pipe = load_generator(args.generator, device=args.device)
    except ModelNotFoundError as err:
        raise UserFacingError(str(err)) from err

    # 3. Generate, one seed per image (the base pipeline: no adapter is loaded), and write.
    seeds = [args.seed + i for i in range(args.n)]
    images = generate(pipe, [prompt] * args.n, seeds, args.steps, args.guidance, output_type="uint8")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, image in zip(seeds, images):
        path = args.out / f"seed{seed:06d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    print(json.dumps({"prompt": prompt, "adapter": None, "seeds": seeds, "files": paths}))  # adapter: the base model
    return 0
