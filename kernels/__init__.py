"""alignloop.kernels: the fast backends of the reward scorer's head and ranking, Triton (fused, CUDA) and
ONNX Runtime, beside the PyTorch references, and the dispatch between them. See kernels/README.md.
The head itself (its definition and file format) lives in alignloop.rewards.

Importing this package stays light (the CLI imports it to register `bench scorer`): the names below are
loaded on first use (PEP 562), and Triton and onnxruntime only by the backends that use them.
"""

from alignloop import lazy_exports

_EXPORTS = {
    "HeadConfig": "config", "ScorerConfig": "config", "TritonBlocks": "config",
    "BackendChoice": "dispatch", "choose_backend": "dispatch", "grouped_topk": "dispatch",
    "grouped_topk_reference": "reference",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
