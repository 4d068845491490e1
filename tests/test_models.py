"""Loading the bundled models, errors for missing ones, device/dtype selection, a generation smoke test."""

import json
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from alignloop import models
from alignloop.world import all_prompts


def test_bundled_generator_loads_as_a_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = models.load_generator("shapes-sd-tiny", device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    # Loadable the plain diffusers way too, from the folder.
    again = StableDiffusionPipeline.from_pretrained(str(models.bundled_generator_dir()), safety_checker=None)
    assert again.unet.config.cross_attention_dim == again.text_encoder.config.hidden_size


def test_bundled_clip_loads_with_open_clip():
    clip = models.load_clip("shapes-clip-tiny", device="cpu")
    assert clip.image_size == 32
    emb = clip.encode_texts(["two red circles on a gray background"])
    assert emb.shape == (1, clip.embed_dim) and torch.isfinite(emb).all()
    # And with open_clip alone, from the folder.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{models.bundled_clip_dir()}")
    assert model.visual.image_size in (32, (32, 32))


def test_generator_tokenizer_matches_open_clip_ids():
    pipe = models.load_generator(device="cpu")
    reference = open_clip.get_tokenizer(f"local-dir:{models.bundled_clip_dir()}")
    for prompt in all_prompts()[::5]:
        ours = pipe.tokenizer(prompt.text, padding="max_length", max_length=models.TEXT_CONTEXT).input_ids
        theirs = reference([prompt.text])[0].tolist()
        assert [t for t in ours if t != 49407] == [t for t in theirs if t not in (0, 49407)]


def test_missing_generator_error_names_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    with pytest.raises(models.ModelNotFoundError) as err:
        models.load_generator(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(models.ModelNotFoundError, match="offline.*runwayml/stable-diffusion-v1-5|runwayml/stable-diffusion-v1-5.*offline"):
        models.load_generator("runwayml/stable-diffusion-v1-5")
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(models.ModelNotFoundError, match="model_index.json"):
        models.load_generator(str(tmp_path / "not-a-pipeline"))


def test_missing_clip_checkpoint_error_names_what_was_tried(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="vit-l-14.safetensors"):
        models.load_clip("ViT-L-14", checkpoint=str(tmp_path / "vit-l-14.safetensors"))
    with pytest.raises(models.ModelNotFoundError, match="needs a local checkpoint"):
        models.load_clip("ViT-L-14")
    with pytest.raises(models.ModelNotFoundError, match="unknown"):
        models.load_clip("NotAModel-99")


def test_open_clip_architecture_with_local_checkpoint_loads(tmp_path):
    # The production path (architecture name + local checkpoint), exercised with a small architecture.
    model = open_clip.create_model("RN50")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "rn50.safetensors"))
    clip = models.load_clip("RN50", checkpoint=str(tmp_path / "rn50.safetensors"), device="cpu")
    assert clip.embed_dim == 1024 and clip.image_size == 224


def test_device_and_dtype_selection():
    assert models.resolve_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert models.resolve_device_dtype("cuda") == (torch.device("cuda"), torch.float16)
    assert models.resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.default_device().type == expected


def test_generate_cli_writes_reproducible_pngs(tmp_path):
    from PIL import Image

    cmd = [sys.executable, "-m", "alignloop", "generate", "two red circles on a gray background", "-n", "3",
           "--steps", "5", "--seed", "7"]
    first = subprocess.run(cmd + ["--out", str(tmp_path / "a")], capture_output=True, text=True, check=True)
    subprocess.run(cmd + ["--out", str(tmp_path / "b")], capture_output=True, text=True, check=True)
    files = json.loads(first.stdout.strip().splitlines()[-1])["files"]
    assert len(files) == 3
    for path in files:
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(path.replace("/a/", "/b/")))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[1])))


def test_generate_cli_rejects_bad_input_with_a_message(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "alignloop", "generate", *a, "--out", str(tmp_path)],  # noqa: E731
                                    capture_output=True, text=True)
    result = run("   ")
    assert result.returncode == 2 and "PROMPT must be 1..500 characters" in result.stderr
    result = run("a red circle", "-n", "0")
    assert result.returncode == 2 and "-n must be in 1..64, got 0" in result.stderr
    result = run("a red circle", "--generator", str(tmp_path / "missing"))
    assert result.returncode == 2 and str(tmp_path / "missing") in result.stderr and "Traceback" not in result.stderr
