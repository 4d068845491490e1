"""Model loading: the generator (a Stable Diffusion pipeline) and the CLIP model the scorer uses.

`--generator` takes the bundled name, a local diffusers folder, or a hub id (only when online);
`--clip` takes the bundled name, a local open_clip folder, or an open_clip architecture name with a local
checkpoint (ViT-L-14 in production). Nothing is downloaded unless the user named a hub id.
Also here: the tiny architectures of the bundled models, so that training and loading agree.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from alignloop.settings import ASSETS_DIR

BUNDLED_GENERATOR = "shapes-sd-tiny"
BUNDLED_CLIP = "shapes-clip-tiny"
TEXT_CONTEXT = 16  # tokens; world prompts are at most 10 with BOS/EOS


class ModelNotFoundError(Exception):
    """A model could not be found; the message names every place that was tried."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (what SD is served in), fp32 on CPU (fp16 matmuls are slow or missing there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_device_dtype(device=None, dtype=None):
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
    return device, dtype or default_dtype(device)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "ALIGNLOOP_OFFLINE"))


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------

def bundled_generator_dir() -> Path:
    return ASSETS_DIR / BUNDLED_GENERATOR


def resolve_generator(spec: str) -> str:
    """Where a generator spec points: a local diffusers folder, or a hub id. Raises ModelNotFoundError."""
    tried = []
    if spec in (BUNDLED_GENERATOR, "bundled"):
        path = bundled_generator_dir()
        if (path / "model_index.json").is_file():
            return str(path)
        raise ModelNotFoundError(f"the bundled generator is missing: no model_index.json in {path}; "
                                 "train it with `alignloop world train-generator`")
    path = Path(spec).expanduser()
    if path.exists():
        if (path / "model_index.json").is_file():
            return str(path)
        raise ModelNotFoundError(f"{path} exists but is not a diffusers pipeline folder (no model_index.json)")
    tried.append(f"local folder {path.resolve()} (does not exist)")
    if _looks_like_hub_id(spec):
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(spec, "model_index.json")
        if isinstance(cached, str) or not _offline():
            return spec
        tried.append(f"hub id {spec!r} (offline: HF_HUB_OFFLINE is set and it is not in the local hub cache)")
    else:
        tried.append(f"hub id {spec!r} (not of the form org/name)")
    raise ModelNotFoundError(f"generator {spec!r} not found; tried: " + "; ".join(tried))


def load_generator(spec: str = BUNDLED_GENERATOR, device=None, dtype=None, progress: bool = False):
    """A diffusers StableDiffusionPipeline on `device` in `dtype`, the safety checker off (tiny world)."""
    from diffusers import StableDiffusionPipeline

    device, dtype = resolve_device_dtype(device, dtype)
    location = resolve_generator(spec)
    if not progress:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            location, dtype=dtype, safety_checker=None, requires_safety_checker=False,
            local_files_only=_offline() or Path(location).exists())
    except OSError as err:  # hub id unreachable, or a partial folder
        raise ModelNotFoundError(f"generator {spec!r} could not be loaded from {location}: {err}") from err
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


# ---------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ClipBundle:
    """An open_clip model with its image preprocessing and tokenizer."""

    model: Any  # open_clip.CLIP: encode_image(x [B,3,H,W]) / encode_text(tokens [B,L])
    preprocess: Callable  # PIL image -> normalized tensor [3,H,W]
    tokenizer: Callable  # list[str] -> LongTensor [B, context_length]
    name: str
    image_size: int
    embed_dim: int
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Unnormalized image embeddings [B, D] of PIL images or a preprocessed tensor [B,3,H,W]."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(im) for im in images])
        return self.model.encode_image(images.to(self.device, self.dtype))

    @torch.no_grad()
    def encode_texts(self, texts) -> torch.Tensor:
        """Unnormalized text embeddings [B, D]."""
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def bundled_clip_dir() -> Path:
    return ASSETS_DIR / BUNDLED_CLIP


def load_clip(spec: str = BUNDLED_CLIP, checkpoint: Optional[str] = None, device=None, dtype=None) -> ClipBundle:
    """The bundled tiny CLIP, a local open_clip folder (open_clip_config.json + weights), or an open_clip
    architecture name with a local checkpoint file (e.g. ViT-L-14 + /models/vit-l-14.safetensors)."""
    import open_clip

    device, dtype = resolve_device_dtype(device, dtype)
    if spec in (BUNDLED_CLIP, "bundled"):
        folder = bundled_clip_dir()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelNotFoundError(f"the bundled CLIP is missing: no open_clip_config.json in {folder}; "
                                     "train it with `alignloop world train-clip`")
        name, pretrained = f"local-dir:{folder}", None
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelNotFoundError(f"{folder} is not an open_clip folder (no open_clip_config.json)")
        name, pretrained = f"local-dir:{folder}", None
    else:
        if spec not in open_clip.list_models():
            raise ModelNotFoundError(f"CLIP {spec!r} not found; tried: local folder {Path(spec).resolve()} "
                                     f"(does not exist); open_clip architecture {spec!r} (unknown)")
        if checkpoint is None or not Path(checkpoint).expanduser().is_file():
            raise ModelNotFoundError(
                f"CLIP architecture {spec!r} needs a local checkpoint; tried: "
                f"{Path(checkpoint).expanduser().resolve() if checkpoint else 'no --clip-checkpoint given'}")
        name, pretrained = spec, str(Path(checkpoint).expanduser())
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model = model.to(dtype).eval()
    tokenizer = open_clip.get_tokenizer(name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return ClipBundle(model, preprocess, tokenizer, spec, int(image_size),
                      int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else model.embed_dim,
                      device, dtype)


# ---------------------------------------------------------------------------------------------------------
# The bundled tiny architectures (shapes world)
# ---------------------------------------------------------------------------------------------------------

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": TEXT_CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def build_tiny_clip():
    """A randomly initialized tiny open_clip model (the bundled CLIP's architecture)."""
    from open_clip.model import CLIP

    cfg = TINY_CLIP_CONFIG
    return CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg["quick_gelu"])


def save_tiny_clip(model, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CLIP_CONFIG,
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711],
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous().float() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))


def build_clip_tokenizer(folder: Path, max_length: int = TEXT_CONTEXT):
    """A transformers CLIPTokenizer whose vocabulary and merges come from open_clip's bundled BPE file,
    so generator and CLIP tokenize alike (ids match open_clip's SimpleTokenizer)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_tiny_generator_components(config=None):
    """Randomly initialized parts of the bundled generator: (vae, unet, text_encoder, scheduler).

    The sizes come from a `GeneratorTrainConfig` (its defaults are the bundled model's): 32x32x3 images <->
    16x16x4 latents, a UNet with one level per entry of `unet_channels` and cross-attention where
    `unet_attention` says, sized so that 16 images at 20 DDIM steps with classifier-free guidance take at
    most 3 s on 2 CPU cores.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignloop.world.config import GeneratorTrainConfig

    config = config or GeneratorTrainConfig()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
                        block_out_channels=tuple(config.vae_channels), layers_per_block=1, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_CONTEXT, projection_dim=64, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    attention = [bool(a) for a in config.unet_attention]
    if len(attention) != len(config.unet_channels):
        raise ValueError(f"unet_attention needs one entry per UNet level: {config.unet_attention} for "
                         f"channels {config.unet_channels}")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=config.unet_layers_per_block,
        block_out_channels=tuple(config.unet_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    return vae, unet, text_encoder, scheduler
