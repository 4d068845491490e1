"""Typed configuration for the reward scorer: the head's shape, the backend choice, the Triton block sizes.

The limits below are the ones the fused kernel is written and tested for (issue 5); the PyTorch
reference enforces the same ones so that a head trained on CPU always has a fused GPU path.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

MAX_EMBED_DIM = 1024  # widest CLIP embedding the kernel takes (ViT-L-14: 768, ViT-H-14: 1024)
MAX_HIDDEN = 2048  # widest hidden layer the kernel takes
HIDDEN_MULTIPLE = 16  # hidden widths are multiples of 16: the smallest tile tl.dot accepts on a GPU
BACKENDS = ("torch", "triton", "onnxruntime")  # what `backend` may name besides "auto"
BACKEND_ENV = "ALIGNLOOP_SCORER_BACKEND"  # overrides backend="auto" without touching code
CPU_CHOICE_ENV = "ALIGNLOOP_CPU_CHOICE"  # overrides where the recorded CPU benchmark is read from
DEFAULT_CPU_CHOICE_PATH = Path(__file__).resolve().parent / "cpu_choice.json"  # written by `bench scorer`


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The reward head's shape; saved as JSON metadata with every head's weights."""

    embed_dim: int = 768  # D: width of the CLIP image and text embeddings (64 bundled tiny CLIP, 768 ViT-L-14); 1..1024
    hidden: tuple = (1024, 1024)  # MLP hidden widths (Lee et al. App. D: two layers of 1024, ReLU); each 16..2048, multiple of 16

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        self.validate()

    def validate(self) -> None:
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) \
                or not 1 <= self.embed_dim <= MAX_EMBED_DIM:
            raise ValueError(f"embed_dim must be an integer in 1..{MAX_EMBED_DIM}, got {self.embed_dim!r}")
        if len(self.hidden) == 0:
            raise ValueError("hidden must name at least one hidden layer width, got ()")
        for i, width in enumerate(self.hidden):
            if isinstance(width, bool) or not isinstance(width, int) or width < HIDDEN_MULTIPLE \
                    or width > MAX_HIDDEN or width % HIDDEN_MULTIPLE:
                raise ValueError(f"hidden[{i}] must be a multiple of {HIDDEN_MULTIPLE} in "
                                 f"{HIDDEN_MULTIPLE}..{MAX_HIDDEN}, got {width!r}")

    def to_json(self) -> str:
        return json.dumps({"embed_dim": self.embed_dim, "hidden": list(self.hidden)})

    @classmethod
    def from_json(cls, text: str) -> "HeadConfig":
        data = json.loads(text)
        return cls(embed_dim=int(data["embed_dim"]), hidden=tuple(int(h) for h in data["hidden"]))


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes of the fused head kernel (powers of two). Sized for registers on a real GPU, not only
    for the interpreter, which checks no register or shared-memory limits. Not autotuned: autotuning
    needs a driver, and these have not yet been tuned on a GPU (see kernels/README.md)."""

    block_b: int = 64  # most batch rows per program; smaller batches use the next power of two >= 16
    block_h1: int = 32  # first-hidden-layer columns per program: sets how many programs share the weights
    block_k: int = 64  # embedding columns per step of the first layer's loop over D (768 is not a power of 2)
    block_n: int = 64  # second-hidden-layer columns per step of its loop over H2
    num_warps: int = 4  # warps per program


@dataclasses.dataclass
class ScorerConfig:
    """How a RewardScorer runs; the serving config can carry one of these."""

    backend: str = "auto"  # "auto" (Triton on CUDA, the recorded faster one on CPU), "torch", "triton" or "onnxruntime"
    text_cache_size: int = 64  # prompts whose text embedding stays cached (LRU); one prompt scores n images
    cpu_choice_path: Optional[str] = None  # recorded CPU benchmark read by "auto"; None: $ALIGNLOOP_CPU_CHOICE or kernels/cpu_choice.json
    ort_threads: int = 0  # onnxruntime intra-op threads; 0: torch.get_num_threads(), so the two compare fairly
    triton: TritonBlocks = dataclasses.field(default_factory=TritonBlocks)  # fused-kernel tiles

    def __post_init__(self):
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.text_cache_size, int) or self.text_cache_size < 1:
            raise ValueError(f"text_cache_size must be an integer >= 1, got {self.text_cache_size!r}")
        if not isinstance(self.ort_threads, int) or self.ort_threads < 0:
            raise ValueError(f"ort_threads must be an integer >= 0, got {self.ort_threads!r}")

    def resolved_cpu_choice_path(self) -> Path:
        if self.cpu_choice_path:
            return Path(self.cpu_choice_path)
        return Path(os.environ.get(CPU_CHOICE_ENV) or DEFAULT_CPU_CHOICE_PATH)
