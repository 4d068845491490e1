"""The reward head: its definition and its file format. Every scoring backend (alignloop.kernels: torch,
fused Triton, onnxruntime) computes what `RewardHead` defines; the trainer trains it and saves it with
`save_head`; the scorer and the `learned` reward load it with `load_head`.

Head (Lee et al. 2023, App. D): the CLIP image and text embeddings, each L2-normalized, concatenated,
through an MLP with ReLU between layers (two hidden layers of 1024 by default), to one scalar through a
sigmoid. Its shape limits (alignloop.kernels.config.HeadConfig) are the fused kernel's, so that a head
trained on CPU always has a fused GPU path.
"""

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from alignloop.kernels.config import HeadConfig

NORM_EPS = 1e-12  # F.normalize's default: x / max(|x|, eps); the kernel uses the same
FORMAT = "alignloop.reward_head/1"  # bump when the key layout or metadata changes
_CONFIG_KEY = "head_config"


class RewardHead(nn.Module):
    """reward = sigmoid(MLP([img / |img|, txt / |txt|])); embeddings [B, D] (text may be [1, D])."""

    def __init__(self, embed_dim: int = 768, hidden: Sequence[int] = (1024, 1024)):
        super().__init__()
        self.config = HeadConfig(embed_dim=embed_dim, hidden=tuple(hidden))  # validates the shape
        widths = [2 * embed_dim, *self.config.hidden]
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 1))
        self.mlp = nn.Sequential(*layers)  # keys mlp.0, mlp.2, ...: the safetensors layout

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def hidden(self) -> tuple:
        return self.config.hidden

    def linears(self) -> list:
        """The nn.Linear layers in order; the first takes [image half | text half] of the input."""
        return [m for m in self.mlp if isinstance(m, nn.Linear)]

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores [B]; for losses that want them (the trainer)."""
        check_embeddings(image_emb, text_emb, self.embed_dim)
        image = F.normalize(image_emb, dim=-1, eps=NORM_EPS)
        text = F.normalize(text_emb, dim=-1, eps=NORM_EPS).expand(image.shape[0], -1)
        return self.mlp(torch.cat([image, text], dim=-1)).squeeze(-1)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Rewards in (0, 1), shape [B], in the parameters' dtype."""
        return torch.sigmoid(self.logits(image_emb, text_emb))


def check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, embed_dim: int) -> None:
    """Shape and dtype checks shared by every backend; messages name the argument and the value."""
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, {embed_dim}], got shape {tuple(t.shape)}")
        if t.shape[1] != embed_dim:
            raise ValueError(f"{name} must have {embed_dim} columns (the head's embed_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32, float16 or bfloat16), got {t.dtype}")
    if text_emb.shape[0] not in (1, image_emb.shape[0]):
        raise ValueError(f"text_emb must have 1 row (shared by the batch) or as many as image_emb "
                         f"({image_emb.shape[0]}), got {text_emb.shape[0]}")


# -------------------------------------------------------------------------------------------------
# The file format: safetensors, the head's shape in the metadata, so a file alone rebuilds the head
# -------------------------------------------------------------------------------------------------

def save_head(head: RewardHead, path, metadata: Optional[dict] = None) -> Path:
    """Writes the head's weights (float32, whatever the head's dtype) and config to `path`; returns it.
    `metadata` (str -> str) is stored beside them, e.g. the CLIP it was trained on."""
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
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:  # truncated, or not safetensors at all
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def load_head(path, device="cpu", dtype=torch.float32) -> RewardHead:
    """Rebuilds the head saved at `path` (eval mode) on `device` in `dtype`. A file that is not a head, has
    a missing or extra key, a wrong shape or a non-finite weight is an error, never a silent init."""
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
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # missing / unexpected keys, or a tensor of the wrong shape
        raise ValueError(f"{path} does not match the head shape its metadata declares "
                         f"({config.to_json()}): {err}") from None
    bad = [key for key, value in tensors.items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"{path} has non-finite weights in {', '.join(sorted(bad))}")
    return head.to(device=device, dtype=dtype).eval()
