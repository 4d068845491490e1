"""Which backend scores: Triton on CUDA; on CPU whichever of torch eager / onnxruntime the recorded CPU
benchmark measured faster; overridable.

Precedence: an explicit backend (the RewardScorer argument or ScorerConfig.backend, anything but
"auto") > $ALIGNLOOP_SCORER_BACKEND (lets an operator switch without a code change) > the automatic rule.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from alignloop.kernels.config import BACKEND_ENV, BACKENDS, ScorerConfig
from alignloop.kernels.reference import grouped_topk_reference
from alignloop.rewards.head import RewardHead

CPU_CHOICE_SCHEMA = "alignloop.cpu_choice/1"
CPU_DEFAULT = "torch"  # without a recorded benchmark: no export step, nothing extra to go wrong


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    backend: str  # "torch", "triton" or "onnxruntime"
    reason: str  # one line for logs and /readyz: why this backend


def read_cpu_choice(path: Path) -> Tuple[Optional[str], str]:
    """The backend a recorded CPU benchmark chose, or None (with the reason) when there is no usable record."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, f"no recorded CPU benchmark at {path}"
    except (OSError, ValueError) as err:
        return None, f"unreadable CPU benchmark record {path}: {err}"
    backend = record.get("backend") if isinstance(record, dict) else None
    if record.get("schema") != CPU_CHOICE_SCHEMA or backend not in ("torch", "onnxruntime"):
        return None, f"CPU benchmark record {path} has no valid choice (schema {record.get('schema')!r}, backend {backend!r})"
    return backend, f"recorded CPU benchmark {path}: {record.get('basis', 'onnxruntime vs torch')}"


def choose_backend(device: torch.device, head: Optional[RewardHead], requested: str = "auto",
                   config: Optional[ScorerConfig] = None) -> BackendChoice:
    config = config or ScorerConfig()
    device = torch.device(device)
    # 1. Explicit request, then the environment.
    source = "requested"
    if requested == "auto":
        requested, source = config.backend, "config"
    if requested == "auto" and os.environ.get(BACKEND_ENV, "auto") != "auto":
        requested, source = os.environ[BACKEND_ENV], f"${BACKEND_ENV}"
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend ({source}) must be 'auto' or one of {', '.join(BACKENDS)}, got {requested!r}")
        if requested == "triton":
            _check_triton_usable(device, head)
        return BackendChoice(requested, f"{source}: {requested}")

    # 2. The automatic rule.
    if device.type == "cuda":
        if head is None:
            return BackendChoice("torch", "CUDA, no head: the CLIP score is one dot product, nothing to fuse")
        if len(head.hidden) != 2:
            return BackendChoice("torch", f"CUDA, but the fused kernel needs 2 hidden layers (hidden={head.hidden})")
        return BackendChoice("triton", "CUDA: fused Triton head")
    backend, why = read_cpu_choice(config.resolved_cpu_choice_path())
    if backend is None:
        return BackendChoice(CPU_DEFAULT, f"CPU, {why}: torch eager by default")
    return BackendChoice(backend, f"CPU, {why}")


def _check_triton_usable(device: torch.device, head: Optional[RewardHead]) -> None:
    from alignloop.kernels.triton_head import check_fusable, interpreting

    if head is None:
        raise ValueError("backend 'triton' needs a reward head (head=None scores by CLIP similarity, "
                         "which has no MLP to fuse); use 'torch' or 'auto'")
    check_fusable(head)
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"backend 'triton' needs a CUDA device, got {device} "
                         "(on CPU it runs only under TRITON_INTERPRET=1, for tests)")


def grouped_topk(rewards: torch.Tensor, n: int, k: int):
    """Per group of n consecutive rewards, the top k: (values [G, k], indices [G, k] int64, within the
    group), descending, ties to the lower index. Triton on CUDA tensors, PyTorch elsewhere."""
    if isinstance(rewards, torch.Tensor) and rewards.is_cuda:
        from alignloop.kernels.triton_topk import grouped_topk_triton

        return grouped_topk_triton(rewards, n, k)
    return grouped_topk_reference(rewards, n, k)
