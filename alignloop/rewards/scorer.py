"""The reward scorer on the serving path: CLIP embeddings -> reward head (or CLIP score), one prompt at a time.

    scorer = RewardScorer(load_clip(), head=load_head(path))   # head=None: CLIP score, until a head is trained
    rewards = scorer.score(images, "three red circles on a gray background")   # [B] float32 on CPU
    values, indices = grouped_topk(rewards, n=8, k=2)                           # best k of each n

The backend (torch eager, fused Triton head, onnxruntime) is chosen by alignloop.kernels.dispatch; every
backend computes what alignloop.rewards.head.RewardHead defines. The trainer trains `RewardHead` and saves
it with `save_head`; the scorer only runs it. The `clip` and `learned` rewards (alignloop.rewards.get_reward)
are this scorer behind the common reward signature.
"""

import collections
import copy
import hashlib
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from alignloop.kernels import ScorerConfig, choose_backend, grouped_topk
from alignloop.kernels.onnx_scorer import OrtSession, ScorerGraph, cached_scorer_onnx, clip_score
from alignloop.models import ClipBundle
from alignloop.rewards.head import RewardHead
from alignloop.rewards.images import Images, to_clip_input
from alignloop.settings import home

__all__ = ["RewardScorer", "RewardHead", "clip_hash", "grouped_topk", "load_head_for"]

_CLIP_HASHES = weakref.WeakKeyDictionary()  # CLIP module -> its hash, computed once per loaded model


def clip_hash(clip: ClipBundle) -> str:
    """A short hash of the CLIP's weights (names, shapes and values, as float32): what a reward head's
    embeddings depend on. Recorded with every trained head and keying the trainer's embedding cache, so a
    head is never run, nor a cached embedding reused, on another CLIP's embeddings."""
    cached = _CLIP_HASHES.get(clip.model)
    if cached is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(clip.model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        cached = _CLIP_HASHES[clip.model] = digest.hexdigest()[:16]
    return cached


def load_head_for(path, clip: ClipBundle) -> RewardHead:
    """The head saved at `path` (checked by load_head: keys, shapes, finite weights), refused when its file
    records that it was trained on another CLIP's embeddings than `clip`'s."""
    from alignloop.rewards.head import load_head, read_head_metadata

    head = load_head(path)
    trained_on = read_head_metadata(path).get("clip_hash")
    if trained_on and trained_on != clip_hash(clip):
        raise ValueError(f"the reward head {path} was trained on embeddings of another CLIP "
                         f"({read_head_metadata(path).get('clip')!r}, hash {trained_on}), not of {clip.name!r} "
                         f"(hash {clip_hash(clip)}): load the CLIP it names, or train a head on this one")
    return head


def clip_normalization(clip: ClipBundle) -> tuple:
    """(mean, std) of the one Normalize in open_clip's preprocessing, which the scorer's graph runs itself."""
    normalize = [t for t in clip.preprocess.transforms if type(t).__name__ == "Normalize"]
    if len(normalize) != 1:
        raise ValueError(f"expected one Normalize in {clip.name}'s preprocessing, found {len(normalize)}")
    return tuple(normalize[0].mean), tuple(normalize[0].std)


class RewardScorer:
    """Scores images against a prompt. Safe to call from several threads (the text cache is locked)."""

    def __init__(self, clip: ClipBundle, head: Optional[RewardHead] = None, backend: str = "auto",
                 config: Optional[ScorerConfig] = None):
        # 1. Check inputs
        if head is not None and head.embed_dim != clip.embed_dim:
            raise ValueError(f"head.embed_dim must equal the CLIP's embed_dim ({clip.embed_dim} for "
                             f"{clip.name}), got {head.embed_dim}")
        self.clip = clip
        self.config = config or ScorerConfig()
        # A private copy in the CLIP's device and dtype, frozen: later training steps on the caller's
        # head must not change what a live scorer returns mid-request.
        self.head = None if head is None else copy.deepcopy(head).to(clip.device, clip.dtype).eval().requires_grad_(False)

        # 2. Pixels: open_clip's preprocessing minus its Normalize, which runs inside the graph.
        self._mean, self._std = clip_normalization(clip)
        self._to_pixels = [t for t in clip.preprocess.transforms if type(t).__name__ != "Normalize"]
        self._graph = ScorerGraph(clip.model, self._mean, self._std, self.head).to(clip.device, clip.dtype).eval()

        # 3. Backend
        self.choice = choose_backend(clip.device, self.head, backend, self.config)
        self.backend = self.choice.backend
        self._ort = None
        if self.backend == "onnxruntime":
            model = cached_scorer_onnx(home() / "onnx", clip.model, self._mean, self._std, clip.image_size,
                                       clip.embed_dim, self.head)
            self._ort = OrtSession(model, threads=self.config.ort_threads)

        self._text_cache = collections.OrderedDict()  # prompt -> text embedding [1, D]
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------
    def score(self, images: Images, prompt: str) -> torch.Tensor:
        """Rewards [B] float32 on CPU: in (0, 1) with a head, cosine similarity in [-1, 1] without."""
        # 1. Check inputs and make pixels [B, 3, S, S] in [0, 1]
        pixels = self.pixels(images)
        if pixels.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32)
        # 2. Text embedding, cached per prompt
        text_emb = self.text_embedding(prompt)
        # 3. Score
        with torch.inference_mode():
            if self.backend == "onnxruntime":
                rewards = self._ort(pixels=pixels, text_embedding=text_emb)
            elif self.backend == "triton":
                from alignloop.kernels.triton_head import fused_reward_head

                image_emb = self._graph.visual(self._normalized(pixels))
                rewards = fused_reward_head(image_emb, text_emb, self.head, self.config.triton)
            else:
                rewards = self._graph(pixels.to(self.clip.device, self.clip.dtype), text_emb)
        return rewards.float().cpu()

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """The prompt's CLIP text embedding [1, D] (device and dtype of the CLIP), from a small LRU cache."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        with self._lock:
            cached = self._text_cache.get(prompt)
            if cached is not None:
                self._text_cache.move_to_end(prompt)
                return cached
        embedding = self.clip.encode_texts([prompt])  # outside the lock: the text tower is the slow part
        with self._lock:
            self._text_cache[prompt] = embedding
            self._text_cache.move_to_end(prompt)
            while len(self._text_cache) > self.config.text_cache_size:
                self._text_cache.popitem(last=False)
        return embedding

    def pixels(self, images: Images) -> torch.Tensor:
        """Images as a CPU float32 tensor [B, 3, S, S] in [0, 1], S the CLIP's input size. Takes a float
        tensor [B, 3, H, W] in [0, 1], a uint8 numpy array [B, H, W, 3] or a list of PIL images."""
        size = self.clip.image_size
        if isinstance(images, np.ndarray):
            images = to_clip_input(images)  # checked there: uint8 [B, H, W, 3]
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be a tensor [B, 3, H, W], got shape {tuple(images.shape)}")
            if not images.is_floating_point():
                raise TypeError(f"images must be a float tensor with values in [0, 1], got {images.dtype}")
            pixels = images.detach().to("cpu", torch.float32)
            if pixels.numel() and (pixels.min() < 0 or pixels.max() > 1):
                raise ValueError(f"images must have values in [0, 1], got min {pixels.min().item():.4g} "
                                 f"and max {pixels.max().item():.4g}")
            if pixels.shape[-2:] != (size, size):
                # What the PIL path does: shorter side to S (bicubic, antialiased), then a centre crop.
                from torchvision.transforms import InterpolationMode
                from torchvision.transforms import functional as TF

                pixels = TF.resize(pixels, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
                pixels = TF.center_crop(pixels, [size, size]).clamp_(0, 1)
            return pixels.contiguous()
        images = list(images)
        if not images:
            return torch.empty(0, 3, size, size)
        tensors = []
        for i, image in enumerate(images):
            if not hasattr(image, "convert"):
                raise TypeError(f"images[{i}] must be a PIL image (or pass one tensor [B,3,H,W]), got {type(image).__name__}")
            for transform in self._to_pixels:
                image = transform(image)
            tensors.append(image)
        return torch.stack(tensors).float()

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.clip.device, self.clip.dtype)
        return (pixels - self._graph.mean) / self._graph.std

    def clip_input(self, images: Images) -> torch.Tensor:
        """What the CLIP image tower takes: `pixels(images)` normalized, in the CLIP's device and dtype."""
        return self._normalized(self.pixels(images))

    def image_embeddings(self, images: Images) -> torch.Tensor:
        """Unnormalized CLIP image embeddings [B, D] (device and dtype of the CLIP): what the head takes."""
        with torch.inference_mode():
            return self._graph.visual(self.clip_input(images))

    @staticmethod
    def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return clip_score(image_emb, text_emb)
