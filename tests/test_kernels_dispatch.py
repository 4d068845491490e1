"""Backend choice and overrides, the benchmark's CPU decision, and RewardScorer as serving calls it."""

import json

import pytest
import torch
from PIL import Image

from alignloop.kernels import ScorerConfig, choose_backend
from alignloop.kernels.bench import cpu_choice
from alignloop.kernels.config import BACKEND_ENV, CPU_CHOICE_ENV
from alignloop.kernels.dispatch import CPU_CHOICE_SCHEMA
from alignloop.rewards import RewardHead

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def record(tmp_path, monkeypatch):
    """Points dispatch at a temporary CPU benchmark record; returns a writer."""
    path = tmp_path / "cpu_choice.json"
    monkeypatch.setenv(CPU_CHOICE_ENV, str(path))
    monkeypatch.delenv(BACKEND_ENV, raising=False)

    def write(backend):
        path.write_text(json.dumps({"schema": CPU_CHOICE_SCHEMA, "backend": backend, "basis": "test"}))
        return path
    return write


def test_cpu_without_record_defaults_to_torch(record):
    choice = choose_backend(CPU, RewardHead(16, (16, 16)))
    assert choice.backend == "torch" and "no recorded CPU benchmark" in choice.reason


@pytest.mark.parametrize("recorded", ["onnxruntime", "torch"])
def test_cpu_follows_the_recorded_benchmark(record, recorded):
    record(recorded)
    assert choose_backend(CPU, None).backend == recorded


def test_cpu_ignores_a_bad_record(record, tmp_path):
    record("tensorflow")
    choice = choose_backend(CPU, None)
    assert choice.backend == "torch" and "no valid choice" in choice.reason
    (tmp_path / "cpu_choice.json").write_text("{not json")
    assert choose_backend(CPU, None).backend == "torch"


def test_cuda_picks_triton_for_a_two_layer_head(record):
    # Only the device type is inspected, so this runs without a GPU.
    assert choose_backend(CUDA, RewardHead(16, (16, 16))).backend == "triton"
    assert choose_backend(CUDA, None).backend == "torch"
    deep = choose_backend(CUDA, RewardHead(16, (16, 16, 16)))
    assert deep.backend == "torch" and "2 hidden layers" in deep.reason


def test_overrides_config_then_env(record, monkeypatch):
    record("onnxruntime")
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert choose_backend(CPU, None).backend == "torch"  # env beats the recorded choice
    assert choose_backend(CPU, None, config=ScorerConfig(backend="onnxruntime")).backend == "onnxruntime"
    assert choose_backend(CUDA, RewardHead(16, (16, 16)), requested="onnxruntime").backend == "onnxruntime"
    monkeypatch.setenv(BACKEND_ENV, "jax")
    with pytest.raises(ValueError, match=r"backend \(\$ALIGNLOOP_SCORER_BACKEND\) must be 'auto' or one of torch, triton, onnxruntime, got 'jax'"):
        choose_backend(CPU, None)


def test_override_errors(record, monkeypatch):
    with pytest.raises(ValueError, match="backend must be 'auto' or one of torch, triton, onnxruntime, got 'fast'"):
        ScorerConfig(backend="fast")
    with pytest.raises(ValueError, match="backend 'triton' needs a reward head"):
        choose_backend(CUDA, None, requested="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' needs a CUDA device, got cpu"):
        choose_backend(CPU, RewardHead(16, (16, 16)), requested="triton")


def test_benchmark_decision_rule():
    def figures(ratio):
        return {str(b): {"torch_over_onnxruntime": ratio} for b in (16, 64, 256)}
    fast = cpu_choice({"scorer_head": figures(1.6), "scorer_clip_score": figures(1.2)}, (16, 64, 256))
    assert fast["backend"] == "onnxruntime" and fast["schema"] == CPU_CHOICE_SCHEMA
    # A 2% edge does not pay for the export at start-up.
    assert cpu_choice({"scorer_head": figures(1.02), "scorer_clip_score": figures(1.02)}, (16, 64, 256))["backend"] == "torch"


def test_bench_registers_on_the_cli():
    from alignloop.cli import build_parser
    args = build_parser().parse_args(["bench", "scorer", "--quick", "--json"])
    assert args.quick and args.json and callable(args.func)


# -------------------------------------------------------------------------------------------------
# RewardScorer
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip():
    from alignloop.models import load_clip
    return load_clip(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def head(clip):
    torch.manual_seed(0)
    return RewardHead(clip.embed_dim, (32, 32)).eval()


def pil_images(count, size=(40, 48)):
    return [Image.new("RGB", size, (40 * i % 256, 200, 90)) for i in range(count)]


def test_scorer_backends_agree_and_auto_follows_the_record(clip, head, record):
    from alignloop.rewards import RewardScorer
    from alignloop.kernels.triton_head import interpreting

    record("onnxruntime")
    auto = RewardScorer(clip, head)  # the one onnxruntime export of this module: exports are slow
    assert auto.backend == "onnxruntime" and "recorded CPU benchmark" in auto.choice.reason
    pixels = torch.rand(6, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(3))
    scores = {"onnxruntime": auto.score(pixels, "a red circle"),
              "torch": RewardScorer(clip, head, backend="torch").score(pixels, "a red circle")}
    atol = {"onnxruntime": 1e-4, "triton": 1e-4}
    if interpreting():
        scores["triton"] = RewardScorer(clip, head, backend="triton").score(pixels, "a red circle")
    elif torch.cuda.is_available():  # the fused kernel runs where the CLIP runs; cuDNN convolutions use TF32
        from alignloop.models import load_clip
        cuda_clip = load_clip(device="cuda", dtype=torch.float32)
        scores["triton"] = RewardScorer(cuda_clip, head, backend="triton").score(pixels, "a red circle")
        atol["triton"] = 2e-3
    for name, value in scores.items():
        assert value.shape == (6,) and value.dtype == torch.float32 and value.device.type == "cpu"
        torch.testing.assert_close(value, scores["torch"], atol=atol.get(name, 0), rtol=0, msg=name)


def test_scorer_without_head_is_clip_score(clip, record):
    from alignloop.rewards import RewardScorer
    from alignloop.kernels.onnx_scorer import clip_score
    scorer = RewardScorer(clip, backend="torch")
    assert scorer.head is None
    images = pil_images(3)
    scores = scorer.score(images, "three green squares")
    expected = clip_score(scorer.image_embeddings(images), clip.encode_texts(["three green squares"]))
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert bool(((scores >= -1) & (scores <= 1)).all())


def test_scorer_pil_and_tensor_inputs_agree(clip, head, record):
    from alignloop.rewards import RewardScorer
    import numpy as np
    scorer = RewardScorer(clip, head, backend="torch")
    images = pil_images(4, size=(clip.image_size, clip.image_size))
    as_tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    torch.testing.assert_close(scorer.score(images, "p"), scorer.score(as_tensor, "p"), atol=1e-6, rtol=0)
    # Other sizes are resized and centre-cropped, like the PIL path.
    assert scorer.score(torch.rand(2, 3, 64, 80), "p").shape == (2,)
    assert scorer.score([], "p").shape == (0,)


def test_scorer_caches_text_embeddings_lru(clip, head, monkeypatch, record):
    from alignloop.rewards import RewardScorer
    scorer = RewardScorer(clip, head, backend="torch", config=ScorerConfig(text_cache_size=2))
    calls = []
    encode = clip.encode_texts
    monkeypatch.setattr(clip, "encode_texts", lambda texts: calls.append(list(texts)) or encode(texts))
    for prompt in ["a", "a", "b", "a", "c", "b"]:
        scorer.text_embedding(prompt)
    assert calls == [["a"], ["b"], ["c"], ["b"]]  # "b" was the least recently used when "c" came


def test_scorer_errors(clip, head, record):
    from alignloop.rewards import RewardScorer
    scorer = RewardScorer(clip, head, backend="torch")
    with pytest.raises(ValueError, match=r"images must be a tensor \[B, 3, H, W\], got shape \(2, 32, 32\)"):
        scorer.score(torch.rand(2, 32, 32), "p")
    with pytest.raises(ValueError, match=r"images must have values in \[0, 1\], got min 0 and max 255"):
        scorer.score(torch.tensor([0.0, 255.0]).repeat(2, 3, 16, 1), "p")
    with pytest.raises(ValueError, match=r"prompt must be a non-empty string, got '  '"):
        scorer.score(torch.rand(1, 3, 32, 32), "  ")
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL image"):
        scorer.score([pil_images(1)[0], "not an image"], "p")
    with pytest.raises(ValueError, match=r"head.embed_dim must equal the CLIP's embed_dim \(64"):
        RewardScorer(clip, RewardHead(32, (16, 16)))


def test_benchmark_records_the_machine_its_cpu_choice_quotes():
    from alignloop.kernels.bench import machine_info
    info = machine_info()
    assert {"cpu", "cpu_count", "torch_threads", "load_average_1m", "torch", "triton", "onnxruntime"} <= set(info)
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1 and info["cuda"] == torch.cuda.is_available()


def test_describing_the_machine_does_not_import_torch_for_a_benchmark_that_has_none():
    import subprocess
    import sys
    code = ("import json, sys; from alignloop.machine import describe_machine; info = describe_machine(); "
            "print(json.dumps([info['cpu_count'], 'torch' in sys.modules, 'torch' in info]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cpu_count, torch_imported, torch_reported = json.loads(out)
    assert cpu_count >= 1 and not torch_imported and not torch_reported
