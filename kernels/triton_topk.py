"""Grouped top-k in Triton: per group of n consecutive rewards, the k largest, ties to the lower index.
Tested against reference.grouped_topk_reference.

Why a second small kernel rather than an epilogue of the head kernel: a row's reward only exists once
the last of the head kernel's H1-slice programs for that row's batch block has finished, and a group of
n samples need not sit inside one batch block (n = 24 with blocks of 64 rows straddles). Fusing would
take a second cross-program counter per group and tie the head kernel to n and k. The rewards are
G*n floats, so the cost of the separate launch is the launch itself (microseconds), and the head kernel
stays usable on its own (the trainer scores without ranking).
"""

import torch
import triton
import triton.language as tl

from alignloop.kernels.reference import check_topk_args

MAX_GROUP = 4096  # n per group the kernel holds in registers (serving uses n <= 64)


@triton.jit
def _grouped_topk_kernel(x_ptr, values_ptr, indices_ptr, n, k, N_PAD: tl.constexpr):
    group = tl.program_id(0)  # one program per group: groups are independent and small
    offs = tl.arange(0, N_PAD)
    valid = offs < n
    x = tl.load(x_ptr + group * n + offs, mask=valid, other=0.0).to(tl.float32)
    alive = valid  # not yet picked; a mask rather than overwriting with -inf, so -inf rewards still rank
    for j in range(0, k):
        best = tl.max(tl.where(alive, x, float("-inf")), axis=0)
        # Among the alive entries equal to the best, the lowest index: a tie resolves like a stable sort.
        pick = tl.min(tl.where(alive & (x == best), offs, N_PAD), axis=0)
        tl.store(values_ptr + group * k + j, best)
        tl.store(indices_ptr + group * k + j, pick.to(tl.int64))
        alive = alive & (offs != pick)


def grouped_topk_triton(rewards: torch.Tensor, n: int, k: int):
    """(values [G, k] in rewards' dtype, indices [G, k] int64 within each group), like the reference."""
    groups = check_topk_args(rewards, n, k)
    if n > MAX_GROUP:
        raise ValueError(f"n must be at most {MAX_GROUP} for the Triton top-k, got {n}")
    rewards = rewards.contiguous()
    values = torch.empty((groups, k), dtype=rewards.dtype, device=rewards.device)
    indices = torch.empty((groups, k), dtype=torch.int64, device=rewards.device)
    if groups == 0:
        return values, indices
    _grouped_topk_kernel[(groups,)](rewards, values, indices, n, k,
                                    N_PAD=max(16, triton.next_power_of_2(n)), num_warps=1)
    return values, indices
