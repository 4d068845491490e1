"""The bundled models' training jobs: a few steps, resumed from the checkpoint, exported and loadable."""

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch

from alignloop import models
from alignloop.world.config import ClipTrainConfig, GeneratorTrainConfig
from alignloop.world import world_signature
from alignloop.world import train
from alignloop.world.render import render_batch
from alignloop.world.train import TrainingMismatch, train_clip, train_generator


def test_generator_training_resumes_refuses_another_config_and_exports(tmp_path, capsys, monkeypatch):
    config = GeneratorTrainConfig(vae_steps=2, unet_steps=2, checkpoint_every=1, batch_size=8, vae_batch_size=8)
    rendered = []

    def recording_render_batch(prompts, rng, avoid_unseen=True):
        rendered.append((list(prompts), avoid_unseen))
        return render_batch(prompts, rng, avoid_unseen)

    monkeypatch.setattr(train, "render_batch", recording_render_batch)
    train_generator(tmp_path / "out", tmp_path / "work", config, progress=False)
    # Base models are pretrained on every prompt; the held-out pairs are unseen by the feedback loop only.
    assert any(p.unseen for prompts, _ in rendered for p in prompts)
    assert not any(avoid_unseen for _, avoid_unseen in rendered)
    train_generator(tmp_path / "out", tmp_path / "work", config, progress=False)
    assert "resumed from" in capsys.readouterr().out
    with pytest.raises(ValueError, match="another config"):
        train_generator(tmp_path / "out", tmp_path / "work", dataclasses.replace(config, unet_steps=3), progress=False)
    pipe = models.load_generator(str(tmp_path / "out"), device="cpu")
    assert pipe.vae.config.scaling_factor > 0 and pipe.tokenizer.model_max_length == models.TEXT_CONTEXT
    training = json.loads((tmp_path / "out" / "training.json").read_text())
    assert 0.0 <= training["vae_reconstruction_pass"] <= 1.0 and training["world"] == world_signature()
    # Exported: the averaged UNet and text encoder, which were trained together.
    ckpt = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=False)
    ema = ckpt["ema"]
    for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, ema[name][key], rtol=0, atol=0)
    # The average's decay ramps up: after two steps it sits near the trained weights, not the initialization.
    torch.manual_seed(config.seed)
    initial = models.build_tiny_generator_components(config)[1].state_dict()
    trained = ckpt["unet"]
    distance = lambda a, b: sum(float((a[k] - b[k]).norm()) for k in a if a[k].dtype.is_floating_point)  # noqa: E731
    assert distance(ema["unet"], trained) < 0.3 * distance(ema["unet"], initial)


def test_clip_trains_on_its_generator_samples_and_refuses_another_world(tmp_path, monkeypatch):
    config = ClipTrainConfig(steps=1, checkpoint_every=1, batch_size=16, generated_pool=32)
    generator = models.bundled_generator_dir()
    train_clip(tmp_path / "clip", tmp_path / "work", config, generator_dir=generator, progress=False)
    (pool,) = (tmp_path / "work").glob("generated_pool-*.npz")
    assert 0 < len(np.load(pool)["images"]) <= 32 and np.load(pool)["images"].shape[1:] == (32, 32, 3)
    assert json.loads((tmp_path / "clip" / "training.json").read_text())["world"] == world_signature()

    elsewhere = tmp_path / "generator-of-another-world"
    elsewhere.mkdir()
    (elsewhere / "training.json").write_text(json.dumps({"world": "0123456789ab"}))
    with pytest.raises(TrainingMismatch, match=f"generator {elsewhere} was trained for another shapes world"):
        train_clip(tmp_path / "clip2", tmp_path / "work2", config, generator_dir=elsewhere, progress=False)
    render = importlib.import_module("alignloop.world.render")  # the package's `render` is the function
    monkeypatch.setitem(render.LARGEST_SIZE_BY_COUNT, 1, render.MAX_SIZE + 1)  # lone objects may now be larger
    with pytest.raises(TrainingMismatch, match="was written for another shapes world"):
        train_clip(tmp_path / "clip", tmp_path / "work", config, generator_dir=generator, progress=False)


def test_bundled_models_were_trained_on_this_world():
    for folder in (models.bundled_generator_dir(), models.bundled_clip_dir()):
        assert json.loads((folder / "training.json").read_text())["world"] == world_signature(), folder


def test_generator_architecture_follows_the_config():
    config = GeneratorTrainConfig(unet_channels=(48, 64), unet_attention=(0, 1), vae_channels=(16, 32))
    vae, unet, _, _ = models.build_tiny_generator_components(config)
    assert unet.config.block_out_channels == (48, 64) and vae.config.block_out_channels == (16, 32)
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")
    with pytest.raises(ValueError, match="one entry per UNet level"):
        models.build_tiny_generator_components(GeneratorTrainConfig(unet_channels=(32, 64), unet_attention=(1,)))


def test_clip_training_resumes_and_exports_an_open_clip_folder(tmp_path, capsys):
    config = ClipTrainConfig(steps=2, checkpoint_every=1, batch_size=16)
    train_clip(tmp_path / "clip", tmp_path / "work", config, progress=False)
    train_clip(tmp_path / "clip", tmp_path / "work", config, progress=False)
    assert "resumed from" in capsys.readouterr().out
    clip = models.load_clip(str(tmp_path / "clip"), device="cpu")
    assert clip.encode_texts(["a red circle"]).shape == (1, clip.embed_dim)


def test_restamp_keeps_a_generator_whose_renders_are_unchanged_and_refuses_others(tmp_path):
    import shutil

    from alignloop.world import renders_signature
    from alignloop.world.train import restamp_generator

    folder = tmp_path / "generator"
    shutil.copytree(models.bundled_generator_dir(), folder)
    record = json.loads((folder / "training.json").read_text())
    (folder / "training.json").write_text(json.dumps({**record, "world": "0123456789ab"}))
    restamped = restamp_generator(folder, "the oracle changed")
    assert restamped["world"] == world_signature() and restamped["renders_digest"] == renders_signature()
    assert restamped["restamped"][-1]["from"] == "0123456789ab" and restamped["restamped"][-1]["why"] == "the oracle changed"
    assert 0.9 <= restamped["vae_reconstruction_pass"] <= 1.0
    assert json.loads((folder / "training.json").read_text()) == restamped
    # A generator trained on other renders must be retrained, not restamped.
    (folder / "training.json").write_text(json.dumps({**restamped, "world": "0123456789ab", "renders_digest": "ffffffffffff"}))
    with pytest.raises(TrainingMismatch, match="trained on other prompts or renders"):
        restamp_generator(folder, "again")
    with pytest.raises(TrainingMismatch, match="has no training.json"):
        restamp_generator(tmp_path, "not a generator")


def test_oracle_check_command_prints_every_condition(capsys):
    from alignloop.cli import main

    assert main(["world", "oracle-check", "--images", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"blur_0.7/own_prompt_passes", "touching_pair/count_fails", "stretched/shape_fails"} <= set(report["conditions"])
    assert report["images"] == 5 and all(row["images"] == 5 for row in report["conditions"].values())
    assert main(["world", "oracle-check", "--images", "0"]) == 2
    assert "--images must be >= 1, got 0" in capsys.readouterr().err
