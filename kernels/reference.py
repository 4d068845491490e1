"""Grouped top-k in plain PyTorch: the definition of correct for the Triton top-k.

The reward head's reference is its definition, `alignloop.rewards.head.RewardHead` (the module the
trainer trains); the Triton kernel and the ONNX graph here must agree with it.
"""

from typing import Tuple

import torch


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
