"""Saving and loading a reward head's weights (safetensors), its shape carried in the file's metadata,
so a file alone rebuilds the head: the trainer saves, the scorer loads."""

from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alignloop.kernels.config import HeadConfig
from alignloop.kernels.reference import RewardHead

FORMAT = "alignloop.reward_head/1"  # bump when the key layout or metadata changes
_CONFIG_KEY = "head_config"


def save_head(head: RewardHead, path, metadata: Optional[dict] = None) -> Path:
    """Writes the head's weights (float32, whatever the head's dtype) and config to `path`; returns it.
    `metadata` (str -> str) is stored beside them, e.g. the training data offsets."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": FORMAT, _CONFIG_KEY: head.config.to_json()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_head_metadata(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward head weights not found: {path.resolve()}")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_head(path, device="cpu", dtype=torch.float32) -> RewardHead:
    """Rebuilds the head saved at `path` (eval mode) on `device` in `dtype`."""
    meta = read_head_metadata(path)
    if meta.get("format") != FORMAT or _CONFIG_KEY not in meta:
        raise ValueError(f"{path} is not a reward head saved by alignloop (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    config = HeadConfig.from_json(meta[_CONFIG_KEY])
    head = RewardHead(config.embed_dim, config.hidden)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    head.load_state_dict(tensors, strict=True)  # a missing or extra key is an error, not a silent init
    return head.to(device=device, dtype=dtype).eval()
