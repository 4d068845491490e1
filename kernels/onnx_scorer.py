"""The whole scorer as one ONNX graph, run by onnxruntime.

Graph inputs: `pixels` [B, 3, S, S] float32 in [0, 1] (already resized and cropped to the CLIP's input
size) and `text_embedding` [1, D] float32 (the prompt's CLIP text embedding, which the caller caches per
prompt: one prompt scores n images, so the text tower would otherwise run n times for the same answer).
Output: `rewards` [B] float32. Inside: CLIP's mean/std normalization, the open_clip image tower, then the
reward head, or, with no head, the CLIP score (cosine similarity of the two embeddings).

onnxruntime-gpu imports and runs on a machine without CUDA, silently falling back to the CPU provider,
so the session asks for CUDA only when torch sees a GPU and `providers` reports what it actually got.
"""

import copy
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignloop.durable import write_durably
from alignloop.rewards.head import NORM_EPS, RewardHead

PIXELS, TEXT, REWARDS = "pixels", "text_embedding", "rewards"  # graph input / output names
IMAGE_EMB = "image_embedding"  # the head-only graph's image input


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B] of image embeddings [B, D] with text embeddings [1 or B, D]: the reward
    until a trained head exists."""
    image = F.normalize(image_emb.float(), dim=-1, eps=NORM_EPS)
    text = F.normalize(text_emb.float(), dim=-1, eps=NORM_EPS)
    return (image * text).sum(dim=-1)


class ScorerGraph(nn.Module):
    """pixels [B,3,S,S] in [0,1] + text embedding [1,D] -> rewards [B] float32. The module that is exported;
    the torch backend runs the same steps, so the two can be compared one to one."""

    def __init__(self, clip_model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 head: Optional[RewardHead] = None):
        super().__init__()
        self.visual = clip_model.visual  # only the image tower: the text side arrives as an embedding
        self.head = head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        # open_clip's encode_image(x) is visual(x) (normalize=False); normalization happens below.
        image_emb = self.visual((pixels - self.mean) / self.std)
        if self.head is None:
            return clip_score(image_emb, text_embedding)
        return self.head(image_emb, text_embedding).float()


def _export(module: nn.Module, args: tuple, input_names: list, batch_inputs: Sequence[str]) -> bytes:
    """Exports with the torch.export-based exporter (dynamo=True), batch dimension dynamic; returns the
    serialized ModelProto (kept in memory: the bundled CLIP and ViT-L-14's image tower both fit in 2 GB)."""
    batch = torch.export.Dim.DYNAMIC
    dynamic_shapes = {name: ({0: batch} if name in batch_inputs else None) for name in input_names}
    program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=[REWARDS],
                                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def _fp32_cpu_copy(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """ONNX graphs here are fp32: exported from a CPU fp32 copy, the caller's module left as it is."""
    if module is None:
        return None
    return copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()


def export_scorer_onnx(clip_model: nn.Module, mean, std, image_size: int, embed_dim: int,
                       head: Optional[RewardHead] = None, path: Optional[str] = None) -> bytes:
    """The whole scorer (image tower + head, or CLIP score) as ONNX bytes; also written to `path` if given."""
    graph = ScorerGraph(_fp32_cpu_copy(clip_model), mean, std, _fp32_cpu_copy(head)).eval()
    example = (torch.rand(2, 3, image_size, image_size), torch.randn(1, embed_dim))
    with torch.no_grad():
        data = _export(graph, example, [PIXELS, TEXT], batch_inputs=[PIXELS])
    if path:
        with open(path, "wb") as f:
            f.write(data)
    return data


GRAPH_VERSION = 1  # bump with any change to ScorerGraph or _export: cached graphs of older code are not reused


def _fingerprint(modules: Sequence[Optional[nn.Module]], values: list) -> str:
    """sha256 of the modules (structure and every tensor's bytes), plain values, and the exporting code."""
    import onnx
    import onnxscript

    digest = hashlib.sha256(json.dumps([GRAPH_VERSION, torch.__version__, onnx.__version__, onnxscript.__version__,
                                        values, [repr(m) for m in modules]]).encode())
    for module in modules:
        for name, tensor in ({} if module is None else module.state_dict()).items():
            tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(json.dumps([name, str(tensor.dtype), tensor.numel()]).encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def cached_scorer_onnx(cache_dir: Path, clip_model: nn.Module, mean, std, image_size: int, embed_dim: int,
                       head: Optional[RewardHead] = None, keep: int = 8) -> bytes:
    """export_scorer_onnx, kept on disk under a hash of everything the graph depends on, so that the next
    serving worker (or the next start) loads the graph in milliseconds instead of exporting it again
    (seconds for the tiny CLIP, far more for a large one). The `keep` most recently used graphs stay."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _fingerprint([clip_model, head], [list(mean), list(std), image_size, embed_dim])
    path = cache_dir / f"scorer-{key}.onnx"
    try:
        data = path.read_bytes()
        os.utime(path)  # most recently used
        return data
    except FileNotFoundError:  # not cached yet, or evicted by another worker a moment ago
        pass
    data = export_scorer_onnx(clip_model, mean, std, image_size, embed_dim, head)
    write_durably(path, data)  # whole file or none: workers may export the same graph side by side
    _evict(cache_dir, keep, spare=path)
    return data


def _evict(cache_dir: Path, keep: int, spare: Path) -> None:
    """Deletes all but the `keep` most recently used graphs, never `spare`; other workers may delete too."""
    used = []
    for graph in cache_dir.glob("scorer-*.onnx"):
        try:
            used.append((graph.stat().st_mtime, graph))
        except FileNotFoundError:
            continue
    older = [graph for _, graph in sorted(used, reverse=True) if graph != spare]
    for graph in older[keep - 1:]:
        graph.unlink(missing_ok=True)


class _HeadGraph(nn.Module):
    def __init__(self, head: RewardHead):
        super().__init__()
        self.head = head

    def forward(self, image_embedding, text_embedding):
        return self.head(image_embedding, text_embedding).float()


def export_head_onnx(head: RewardHead) -> bytes:
    """The head alone (inputs `image_embedding` [B, D], `text_embedding` [1, D]), for parity and benchmarks."""
    graph = _HeadGraph(_fp32_cpu_copy(head)).eval()
    example = (torch.randn(2, head.embed_dim), torch.randn(1, head.embed_dim))
    with torch.no_grad():
        return _export(graph, example, [IMAGE_EMB, TEXT], batch_inputs=[IMAGE_EMB])


class OrtSession:
    """An onnxruntime InferenceSession over one of the graphs above; call with named float32 arrays or tensors."""

    def __init__(self, model: bytes, threads: int = 0, use_cuda: Optional[bool] = None):
        import onnxruntime as ort

        if use_cuda is None:  # onnxruntime-gpu lists CUDA even where there is no GPU: ask torch
            use_cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        self.providers = self.session.get_providers()  # what it really runs on, not what was asked
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def on_cuda(self) -> bool:
        return self.providers[0] == "CUDAExecutionProvider"

    def __call__(self, **inputs) -> torch.Tensor:
        feed = {}
        for name in self.input_names:
            value = inputs[name]
            if isinstance(value, torch.Tensor):
                value = value.detach().to("cpu", torch.float32).numpy()
            feed[name] = np.ascontiguousarray(value, dtype=np.float32)
        (rewards,) = self.session.run([REWARDS], feed)
        return torch.from_numpy(rewards)
