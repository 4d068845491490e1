"""Adapters: the saved format, and every kind of bad adapter refused before it takes traffic, the live one
untouched and still serving. With the bundled tiny pipeline and adapters made by peft on its UNet (non-zero
random LoRA weights, so each adapter visibly changes the images)."""

import copy
import json

import pytest
import torch

from alignloop.adapters import (DEFAULT_TARGET_MODULES, WEIGHTS, AdapterRejected, adapter_config_record, base_model_identity, lora_config,
                                save_adapter, validate_adapter)
from alignloop.registry import Registry

PROMPT = "three red circles on a gray background"
SEEDS = [11, 12]


# -- helpers (test_serving_adapters imports them) ---------------------------------------------------------------

def make_adapter(base_unet, folder, seed: int, rank: int = 4, targets=("to_q", "to_k", "to_v", "to_out.0"),
                 scale: float = 0.08):
    """An adapter saved by save_adapter: peft LoRA on a copy of the base UNet, lora_A and lora_B random."""
    unet = copy.deepcopy(base_unet)
    unet.add_adapter(lora_config(rank, alpha=rank, target_modules=targets), adapter_name="made")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(unet, folder, "made")
    return folder, adapter_config_record(unet.peft_config["made"])


def publish(registry: Registry, folder, config, base, state="candidate", files=None):
    """Straight into the registry (not alignloop.rollout.publish_adapter, whose own checks would stop some of the
    bad files these tests need to reach a worker)."""
    return registry.publish("adapter", files or {WEIGHTS: folder / WEIGHTS}, base=base, config=config, state=state,
                            who="test", why="test adapter")


def draw(pipe, seeds=SEEDS, steps=3):
    with torch.inference_mode():
        return pipe(prompt=[PROMPT] * len(seeds), num_inference_steps=steps, guidance_scale=5.0,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="pt").images


def reference_images(folder, seeds=SEEDS, steps=3):
    """What adapter `folder` draws alone: a fresh pipeline, the adapter loaded by diffusers' own loader."""
    from alignloop.models import load_generator

    pipe = load_generator(device="cpu")
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=WEIGHTS, adapter_name="ref")
    return draw(pipe, seeds, steps)


def close(a, b) -> bool:
    """Equal images: within one 8-bit level (batched kernels may differ in the last float bits)."""
    return float((a - b).abs().max()) <= 1.5 / 255


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from alignloop.models import load_generator

    return load_generator(device="cpu")


@pytest.fixture(scope="module")
def base_unet(pipe):
    return copy.deepcopy(pipe.unet)  # before any adapter is loaded into `pipe`


@pytest.fixture(scope="module")
def identity(pipe):
    return base_model_identity(pipe)


# -- format --------------------------------------------------------------------------------------------------------

def test_saved_adapter_keeps_rank_alpha_and_targets_and_reloads_in_diffusers(base_unet, tmp_path):
    from safetensors import safe_open

    folder, _ = make_adapter(base_unet, tmp_path / "a", seed=1, rank=4)
    unet = copy.deepcopy(base_unet)
    unet.add_adapter(lora_config(4, alpha=8), adapter_name="made")
    save_adapter(unet, tmp_path / "b", "made")
    with safe_open(str(tmp_path / "b" / WEIGHTS), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert header["unet.r"] == 4 and header["unet.lora_alpha"] == 8
    assert sorted(header["unet.target_modules"]) == sorted(DEFAULT_TARGET_MODULES)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone
    (tmp_path / "file").write_text("x")  # diffusers' writer would only log here; save_adapter refuses
    with pytest.raises(ValueError, match="is a file; save_adapter writes a folder"):
        save_adapter(unet, tmp_path / "file", "made")
    # diffusers reloads alpha 8 (not alpha = rank)
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from alignloop.models import load_generator

    fresh = load_generator(device="cpu")
    fresh.load_lora_weights(str(tmp_path / "b"), weight_name=WEIGHTS, adapter_name="x")
    assert fresh.unet.peft_config["x"].lora_alpha == 8


def test_base_model_identity_hashes_the_stored_weights(pipe, identity):
    assert base_model_identity("shapes-sd-tiny")["unet_sha256"] == identity["unet_sha256"]
    assert len(identity["unet_sha256"]) == 64


def test_a_sound_adapter_validates(base_unet, pipe, identity, tmp_path):
    folder, config = make_adapter(base_unet, tmp_path / "a", seed=1)
    registry = Registry(tmp_path / "reg")
    manifest = publish(registry, folder, config, identity)
    report = validate_adapter(registry.fetch("adapter", manifest.version), identity, pipe.unet, max_rank=16)
    assert (report.version, report.rank, report.alpha) == (manifest.version, 4, 4)
    assert len(report.modules) == 56 and report.metadata["unet.r"] == 4


# -- bad adapters: refused with a message naming the problem; the live one keeps serving ------------------------------

def _corrupt(ctx):
    (ctx.tmp / "bad").mkdir()
    (ctx.tmp / "bad" / WEIGHTS).write_bytes(b"\x00" * 64 + b"not a safetensors file")
    return publish(ctx.registry, ctx.tmp / "bad", ctx.config, ctx.identity), "corrupt or not a safetensors"


def _wrong_keys(ctx):
    from safetensors.torch import load_file, save_file

    from alignloop.adapters import _read_header

    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    tensors = load_file(folder / WEIGHTS)
    key = next(iter(tensors))
    tensors[key.replace("down_blocks.1", "down_blocks.7")] = tensors.pop(key)
    save_file(tensors, folder / WEIGHTS, metadata=_read_header(folder / WEIGHTS))
    return publish(ctx.registry, folder, config, ctx.identity), "map to no Linear or Conv2d module"


def _other_targets(ctx):
    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5, targets=("to_q", "proj_in", "proj_out"))
    return publish(ctx.registry, folder, config, ctx.identity), "targets other modules than the first adapter"


def _rank_over(ctx):
    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5, rank=32)
    return publish(ctx.registry, folder, config, ctx.identity), "rank 32 is over this service's maximum of 16"


def _nan(ctx):
    from safetensors.torch import load_file, save_file

    from alignloop.adapters import _read_header

    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    tensors = load_file(folder / WEIGHTS)
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    tensors[sorted(tensors)[4]][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS, metadata=_read_header(folder / WEIGHTS))
    return publish(ctx.registry, folder, config, ctx.identity), "NaN or Inf"


def _other_base(ctx):
    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    other = {"generator": "someone-elses-sd", "unet_sha256": "ab" * 32}
    return publish(ctx.registry, folder, config, other), "trained on another base model"


def _no_manifest(ctx):
    folder, _ = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    return folder, "no manifest.json"


def _malformed_manifest(ctx):
    folder, _ = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    (folder / "manifest.json").write_text('{"version": "v000009", "kind": "adapter", "files": ')
    return folder, "manifest.json is malformed"


def _half_written(ctx):
    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    manifest = publish(ctx.registry, folder, config, ctx.identity)
    version_dir = ctx.registry.fetch("adapter", manifest.version)
    data = (version_dir / WEIGHTS).read_bytes()
    (version_dir / WEIGHTS).write_bytes(data[: len(data) // 2])  # a copy that stopped half way
    return version_dir, "corrupt or half-written"


def _half_written_missing_file(ctx):
    folder, config = make_adapter(ctx.base_unet, ctx.tmp / "bad", seed=5)
    manifest = publish(ctx.registry, folder, config, ctx.identity)
    version_dir = ctx.registry.fetch("adapter", manifest.version)
    copy_dir = ctx.tmp / "copy"
    copy_dir.mkdir()
    (copy_dir / "manifest.json").write_bytes((version_dir / "manifest.json").read_bytes())  # the file never came
    return copy_dir, f"{WEIGHTS} is missing from .*: a half-written version folder"


BAD = {"corrupt file": _corrupt, "wrong keys": _wrong_keys, "other target modules": _other_targets,
       "rank over the limit": _rank_over, "NaN/Inf weights": _nan, "other base model": _other_base,
       "missing manifest": _no_manifest, "malformed manifest": _malformed_manifest,
       "half-written folder": _half_written, "half-written folder, a file missing": _half_written_missing_file}


@pytest.fixture(scope="module")
def live(pipe, base_unet, identity, tmp_path_factory):
    """A worker's slots (a real batcher on the bundled pipeline) with one live adapter loaded and its reference."""
    from alignloop.serving.adapter_slots import AdapterSlots
    from alignloop.serving.batching import DiffusionBatcher

    tmp = tmp_path_factory.mktemp("live")
    registry = Registry(tmp / "reg")
    folder, config = make_adapter(base_unet, tmp / "live", seed=1)
    manifest = publish(registry, folder, config, identity)
    batcher = DiffusionBatcher(pipe, max_batch_images=8, wait_ms=0)
    slots = AdapterSlots(pipe, batcher, max_slots=3, max_rank=16)
    batcher.activate = slots.activate
    slots.load(registry.fetch("adapter", manifest.version), keep={manifest.version})
    yield {"slots": slots, "batcher": batcher, "registry": registry, "version": manifest.version, "config": config,
           "reference": reference_images(folder)}
    batcher.close()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_refused_and_the_live_one_keeps_serving(case, live, base_unet, identity, tmp_path):
    class Ctx:
        pass

    ctx = Ctx()
    ctx.tmp, ctx.registry, ctx.config, ctx.identity, ctx.base_unet = tmp_path, live["registry"], live["config"], \
        identity, base_unet
    made, message = BAD[case](ctx)
    folder = made if not hasattr(made, "version") else ctx.registry._dir("adapter", made.version)
    slots, batcher = live["slots"], live["batcher"]
    loads_before = slots.loads

    with pytest.raises(AdapterRejected, match=message) as err:
        slots.load(folder, keep={live["version"]})
    assert "Traceback" not in str(err.value)
    assert slots.loads == loads_before and list(slots.resident()) == [live["version"]]
    # The live adapter still draws exactly what it drew alone.
    images = batcher.submit(PROMPT, SEEDS, 3, 5.0, adapter=live["version"]).result(timeout=120).images
    assert close(images, live["reference"])


def test_base_and_adapter_passes_draw_their_own_weights(live, pipe):
    base_ref = reference_images(None)
    batcher = live["batcher"]
    futures = [batcher.submit(PROMPT, SEEDS, 3, 5.0, adapter=a) for a in ("base", live["version"], "base")]
    results = [f.result(timeout=120).images for f in futures]
    assert close(results[0], base_ref) and close(results[2], base_ref)
    assert close(results[1], live["reference"]) and not close(results[1], base_ref)


def test_slots_stay_bounded_and_evict_what_no_arm_uses(live, base_unet, identity, tmp_path):
    slots, registry = live["slots"], live["registry"]
    versions = []
    for seed in range(20, 24):
        folder, config = make_adapter(base_unet, tmp_path / f"a{seed}", seed=seed)
        versions.append(publish(registry, folder, config, identity).version)
        slots.load(registry.fetch("adapter", versions[-1]), keep={live["version"], versions[-1]})
    resident = slots.resident()
    assert len(resident) == 3 and live["version"] in resident and versions[-1] in resident
    names = sorted(resident.values())
    assert all(not a.startswith(b) for a in names for b in names if a != b)  # never a prefix of another
    assert len(live["slots"].pipe.unet.peft_config) == 3
    # Every slot's adapter is still right after the reuse (hot-swaps into slots).
    images = live["batcher"].submit(PROMPT, SEEDS, 3, 5.0, adapter=live["version"]).result(timeout=120).images
    assert close(images, live["reference"])
    expected = reference_images(tmp_path / "a23")
    images = live["batcher"].submit(PROMPT, SEEDS, 3, 5.0, adapter=versions[-1]).result(timeout=120).images
    assert close(images, expected)
