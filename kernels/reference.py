"""The reward head and grouped top-k in plain PyTorch: the definition of correct for every other backend.

Head (Lee et al. 2023, App. D): the CLIP image and text embeddings, each L2-normalized, concatenated,
through an MLP with ReLU between layers (two hidden layers of 1024 by default), to one scalar through a
sigmoid. The trainer trains this module; the Triton kernel and the ONNX graph must agree with it.
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from alignloop.kernels.config import HeadConfig

NORM_EPS = 1e-12  # F.normalize's default: x / max(|x|, eps); the kernel uses the same


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


def check_topk_args(rewards: torch.Tensor, n: int, k: int) -> int:
    """Validates grouped top-k arguments and returns the number of groups G."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [groups * n], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per group) must be an integer >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in 1..n (n={n}), got {k!r}")
    if rewards.numel() % n:
        raise ValueError(f"rewards has {rewards.numel()} elements, which is not divisible by n={n} "
                         "(the batch must be whole groups of n consecutive samples)")
    return rewards.numel() // n


def grouped_topk_reference(rewards: torch.Tensor, n: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per group of n consecutive rewards, the k largest: (values [G, k], indices [G, k] int64).

    Indices are within the group (0..n-1). Values come in descending order; equal values keep their
    original order, so a tie goes to the lower index (a stable sort; torch.topk promises no tie order).
    NaN rewards are not supported (a sigmoid never makes one).
    """
    groups = check_topk_args(rewards, n, k)
    values, indices = torch.sort(rewards.reshape(groups, n), dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]
