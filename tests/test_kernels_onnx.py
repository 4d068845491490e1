"""ONNX Runtime against torch: the head alone and the whole scorer with the bundled tiny CLIP."""

import copy
import os

import pytest
import torch

from alignloop.kernels import onnx_scorer
from alignloop.kernels.onnx_scorer import (OrtSession, ScorerGraph, cached_scorer_onnx, export_head_onnx,
                                           export_scorer_onnx)
from alignloop.models import load_clip
from alignloop.rewards import RewardHead

ATOL = 1e-4


def spread_head(embed_dim, hidden, seed=0):
    """A random head whose rewards spread over (0, 1) (last layer scaled to logits of std about 2)."""
    torch.manual_seed(seed)
    head = RewardHead(embed_dim, hidden).eval()
    with torch.no_grad():
        probe = head.logits(torch.randn(256, embed_dim), torch.randn(1, embed_dim))
        scale = 2.0 / probe.std()
        last = head.linears()[-1]
        last.weight.mul_(scale)
        last.bias.sub_(probe.mean()).mul_(scale)
    return head


@pytest.fixture(scope="module")
def clip():
    return load_clip(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def normalize(clip):
    (norm,) = [t for t in clip.preprocess.transforms if type(t).__name__ == "Normalize"]
    return norm.mean, norm.std


def test_head_onnxruntime_matches_torch():
    head = spread_head(768, (1024, 1024))
    session = OrtSession(export_head_onnx(head))
    if not torch.cuda.is_available():
        assert session.providers == ["CPUExecutionProvider"]
    text = torch.randn(1, 768)
    for batch in (1, 7, 64):  # one graph, any batch
        image = torch.randn(batch, 768)
        with torch.no_grad():
            expected = head(image, text)
        got = session(image_embedding=image, text_embedding=text)
        assert got.shape == (batch,) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("with_head", [True, False], ids=["head", "clip_score"])
def test_whole_scorer_onnxruntime_matches_torch(clip, normalize, with_head, tmp_path):
    # One export per variant (exports are the slow part of this suite); the CLIP-score one also goes
    # through a file, as a deployment would.
    head = spread_head(clip.embed_dim, (64, 32)) if with_head else None
    graph = ScorerGraph(clip.model, *normalize, head).eval()
    path = None if with_head else tmp_path / "scorer.onnx"
    data = export_scorer_onnx(clip.model, *normalize, clip.image_size, clip.embed_dim, head,
                              path=str(path) if path else None)
    if path:
        import onnx
        assert path.read_bytes() == data
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == ["pixels", "text_embedding"]
        assert [o.name for o in model.graph.output] == ["rewards"]
    session = OrtSession(data)
    text = clip.encode_texts(["two blue squares on a white background"])
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 5, 16):  # one graph, any batch
        pixels = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=gen)
        with torch.no_grad():
            expected = graph(pixels, text)
        got = session(pixels=pixels, text_embedding=text)
        assert got.shape == (batch,)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # ScorerGraph is the CLIP's own image tower plus the head (or cosine similarity), nothing else.
    with torch.no_grad():
        image_emb = clip.encode_images((pixels - graph.mean) / graph.std)
        direct = head(image_emb, text) if with_head else torch.nn.functional.cosine_similarity(image_emb, text)
    torch.testing.assert_close(got, direct.float(), atol=ATOL, rtol=0)


def test_scorer_graph_is_exported_once_per_weights_and_read_back_after(clip, normalize, tmp_path, monkeypatch):
    exports = []
    export = onnx_scorer.export_scorer_onnx
    monkeypatch.setattr(onnx_scorer, "export_scorer_onnx", lambda *args: exports.append(args) or export(*args))
    head = spread_head(clip.embed_dim, (64, 32))
    args = (clip.model, *normalize, clip.image_size, clip.embed_dim)
    first = cached_scorer_onnx(tmp_path, *args, head)
    (cached,) = tmp_path.glob("scorer-*.onnx")
    os.utime(cached, (0, 0))
    assert cached_scorer_onnx(tmp_path, *args, copy.deepcopy(head)) == first  # same weights: read back
    assert len(exports) == 1 and cached.stat().st_mtime > 0  # and marked as just used
    retrained = copy.deepcopy(head)
    with torch.no_grad():
        retrained.linears()[-1].bias.add_(0.5)
    second = cached_scorer_onnx(tmp_path, *args, retrained)
    assert len(exports) == 2 and second != first and len(list(tmp_path.glob("scorer-*"))) == 2
    text = clip.encode_texts(["a red circle"])
    pixels = torch.rand(3, 3, clip.image_size, clip.image_size)
    with torch.no_grad():
        expected = ScorerGraph(clip.model, *normalize, retrained).eval()(pixels, text)
    torch.testing.assert_close(OrtSession(second)(pixels=pixels, text_embedding=text), expected, atol=ATOL, rtol=0)


def test_cache_keeps_the_most_recently_used_graphs_and_the_new_one(tmp_path):
    for age, name in enumerate("abcd"):  # a used most recently, d least
        (tmp_path / f"scorer-{name}.onnx").write_bytes(b"graph")
        os.utime(tmp_path / f"scorer-{name}.onnx", (1000 - age, 1000 - age))
    onnx_scorer._evict(tmp_path, keep=2, spare=tmp_path / "scorer-d.onnx")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["scorer-a.onnx", "scorer-d.onnx"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        cached_scorer_onnx(tmp_path, None, (0,), (1,), 32, 64, keep=0)
