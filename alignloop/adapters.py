"""LoRA adapters for the generator's UNet: the one format the trainer writes and serving checks and loads.

    config = lora_config(rank=8, alpha=8)                       # peft LoraConfig for the UNet
    unet.add_adapter(config, adapter_name="tuned")              # ... train ...
    save_adapter(unet, folder, "tuned")                         # folder/pytorch_lora_weights.safetensors
    registry.publish("adapter", {WEIGHTS: folder / WEIGHTS}, base=base_model_identity(pipe),
                     config=adapter_config_record(unet.peft_config["tuned"]), ...)
    report = validate_adapter(registry.fetch("adapter", v), base_model_identity(pipe), pipe.unet, max_rank=16)
    pipe.unet.load_lora_adapter(report.state_dict, prefix="unet", metadata=report.metadata, adapter_name="slot00")

Format: diffusers' LoRA file as `StableDiffusionPipeline.save_lora_weights` writes it: peft keys under the
`unet.` prefix (`unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight`) and the LoRA config (rank, alpha,
target modules) in the safetensors header under `lora_adapter_metadata`. Without that header diffusers guesses
the config from the weights and takes alpha = rank, which silently rescales an adapter trained otherwise.

Why `validate_adapter` reads and checks everything itself before any diffusers call: a failed
`load_lora_adapter(..., hotswap=True)` deletes the adapter it was swapping into in its error handler, and a
plain load of a file with unknown keys only logs a warning. So the file is parsed, every key mapped to a module
of this base UNet with the right shapes, the rank, the target modules, the weights' finiteness and the base
model's hash checked, and what is then loaded is the state dict that was checked (never the file again).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from alignloop.errors import UserFacingError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads DEFAULT_TARGET_MODULES at start-up
    import torch

WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
MANIFEST = "manifest.json"  # alignloop.registry.MANIFEST
PREFIX = "unet."  # diffusers' key prefix for the UNet's LoRA layers
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# What the trainer's LoRA changes: the attention, feed-forward and projection layers of every transformer block
# and the ResNet convolutions (the tiny UNet has attention at two of its three levels only, so attention alone
# reaches little of it). Every adapter of one deployment should share these: peft hot-swaps only into the same
# modules or a subset.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "conv1", "conv2")
# The LoRA config fields a saved adapter records; the others keep peft's defaults (what hot-swap compares).
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora")
_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


class AdapterRejected(UserFacingError):
    """An adapter that must not take traffic; the message names what is wrong with it."""


def lora_config(rank: int = 8, alpha: Optional[float] = None, target_modules=DEFAULT_TARGET_MODULES,
                dropout: float = 0.0):
    """The project's LoRA config for the UNet. alpha defaults to the rank (scale 1); Gaussian init of A, zero B,
    so a fresh adapter starts as the base model."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules),
                      lora_dropout=dropout, init_lora_weights="gaussian")


def adapter_config_record(config) -> dict:
    """The JSON fields of a peft LoraConfig that a saved adapter and its manifest record."""
    record = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    record["target_modules"] = sorted(record["target_modules"]) if not isinstance(record["target_modules"], str) \
        else record["target_modules"]
    return record


# -- base model identity ---------------------------------------------------------------------------------------

def base_model_identity(pipe_or_spec) -> dict:
    """{"generator": where it came from, "unet_sha256": hash of the base UNet's weight files as stored}.

    The hash reads the files (names and bytes), so it is the same on every device and dtype the model is loaded
    in; an adapter records it at publish and a worker refuses an adapter made for another base."""
    if isinstance(pipe_or_spec, (str, Path)):
        from alignloop.models import resolve_generator

        spec, location = str(pipe_or_spec), resolve_generator(str(pipe_or_spec))
    else:
        location = pipe_or_spec.config.get("_name_or_path") or getattr(pipe_or_spec, "name_or_path", "")
        spec = location
    folder = Path(location)
    if not folder.is_dir():  # a hub id: its cached snapshot
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(location, local_files_only=True, allow_patterns=["unet/*"]))
    return {"generator": spec, "unet_sha256": _unet_hash(str(folder.resolve()))}


@lru_cache(maxsize=8)
def _unet_hash(folder: str) -> str:
    files = sorted(p for p in (Path(folder) / "unet").iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    if not any(p.suffix != ".json" for p in files):
        raise FileNotFoundError(f"no UNet weight files under {folder}/unet")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# -- saving ----------------------------------------------------------------------------------------------------

def save_adapter(unet, folder, adapter_name: str, metadata: Optional[dict] = None) -> Path:
    """Write `unet`'s adapter `adapter_name` as folder/pytorch_lora_weights.safetensors, with its LoRA config in
    the header; atomically (a temporary folder, then a rename), since diffusers' writer is neither atomic nor
    loud when the target is a file. `metadata` adds string fields to the header (e.g. the base model hash)."""
    import os
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from alignloop.durable import fsync_dir, fsync_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_adapter writes a folder")
    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no adapter {adapter_name!r}; it has {sorted(getattr(unet, 'peft_config', {}))}")
    state = {k: v.detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    record = adapter_config_record(unet.peft_config[adapter_name])

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=record)
        if metadata:  # extra header fields beside diffusers' own
            from safetensors.torch import load_file, save_file

            header = _read_header(tmp / WEIGHTS)
            save_file(load_file(tmp / WEIGHTS), tmp / WEIGHTS,
                      metadata={**header, **{str(k): str(v) for k, v in metadata.items()}})
        if not (tmp / WEIGHTS).is_file():
            raise RuntimeError(f"diffusers wrote no {WEIGHTS} into {tmp}")
        fsync_file(tmp / WEIGHTS)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHTS


# -- validation ------------------------------------------------------------------------------------------------

@dataclass
class AdapterReport:
    """A checked adapter: exactly what to load (`state_dict`, with the `unet.` prefix, and `metadata`)."""

    version: str
    rank: int
    alpha: float
    target_modules: list
    modules: frozenset  # UNet module names the adapter changes
    state_dict: dict = field(repr=False)
    metadata: dict = field(default_factory=dict)  # LoraConfig kwargs under the `unet.` prefix: what the loader takes
    manifest: Optional[object] = field(default=None, repr=False)


def validate_adapter(folder, base_identity: dict, unet, max_rank: int, reference_modules=None,
                     manifest=None) -> AdapterReport:
    """Check an adapter version folder against this base UNet before anything is loaded; raises AdapterRejected
    naming the problem. `reference_modules`: the modules of the first adapter loaded into this UNet (peft's
    hot-swap takes the same modules or a subset); None accepts any. `manifest`: the registry's manifest (else
    the folder's manifest.json is read)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    what = f"adapter {folder.name}"

    # 1. The version folder is complete: a valid manifest, every file it lists present with its checksum.
    if not folder.is_dir():
        raise AdapterRejected(f"{what}: {folder} is not a folder")
    manifest = manifest if manifest is not None else _read_manifest(folder, what)
    what = f"adapter {manifest.version}"
    if WEIGHTS not in manifest.files:
        raise AdapterRejected(f"{what}: the manifest lists no {WEIGHTS} (files: {sorted(manifest.files)})")
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise AdapterRejected(f"{what}: {name} is missing from {folder}: a half-written version folder")
        with open(path, "rb") as f:
            digest = hashlib.sha256()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise AdapterRejected(f"{what}: {name} does not match the manifest's sha256 (a corrupt or half-written "
                                  f"file: {digest.hexdigest()[:12]}... instead of {expected[:12]}...)")

    # 2. Made for this base model.
    theirs = (manifest.base or {}).get("unet_sha256")
    if not theirs:
        raise AdapterRejected(f"{what}: the manifest's base has no unet_sha256, so it cannot be matched to a base "
                              f"model (base: {manifest.base})")
    if theirs != base_identity["unet_sha256"]:
        raise AdapterRejected(f"{what} was trained on another base model: its base UNet hash {theirs[:12]}... is "
                              f"not this worker's {base_identity['unet_sha256'][:12]}... "
                              f"({base_identity.get('generator')})")

    # 3. A readable safetensors file with diffusers' LoRA header.
    try:
        header = _read_header(folder / WEIGHTS)
        state_dict = load_file(folder / WEIGHTS, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterRejected(f"{what}: {WEIGHTS} is corrupt or not a safetensors file ({err})") from None
    config = lora_config_from_header(header, what)
    rank, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if manifest.config:
        recorded = {k: manifest.config.get(k) for k in ("r", "lora_alpha") if k in manifest.config}
        if any(recorded[k] != config[k] for k in recorded):
            raise AdapterRejected(f"{what}: the manifest's config {recorded} disagrees with the file's LoRA header "
                                  f"(r={rank}, lora_alpha={alpha})")

    # 4. Rank within this worker's maximum.
    if rank > max_rank:
        raise AdapterRejected(f"{what}: rank {rank} is over this service's maximum of {max_rank} (max_adapter_rank)")

    # 5. Keys: every key a LoRA factor of a Linear / Conv2d module of this UNet, matched by the target modules,
    #    with the shapes that module and the rank imply; both factors present.
    modules = dict(unet.named_modules())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _KEY.match(key)
        name = match["module"] if match else None
        base = _base_layer(modules.get(name)) if name else None
        if base is None:
            unknown.append(key)
            continue
        factors.setdefault(name, {})[match["side"]] = tensor
    if unknown:
        raise AdapterRejected(f"{what}: {len(unknown)} key(s) map to no Linear or Conv2d module of this base UNet, "
                              f"e.g. {unknown[:3]}")
    if not factors:
        raise AdapterRejected(f"{what}: {WEIGHTS} holds no LoRA weights")
    for name, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterRejected(f"{what}: module {name} has lora_{''.join(pair)} but not both lora_A and lora_B")
        if not _targeted(name, targets):
            raise AdapterRejected(f"{what}: module {name} has weights but is not among the header's target modules "
                                  f"{targets}")
        _check_shapes(what, name, _base_layer(modules[name]), pair["A"], pair["B"], rank)

    # 6. Other target modules than the adapters already loaded: peft hot-swaps only into the same or a subset.
    names = frozenset(factors)
    if reference_modules is not None and not names <= set(reference_modules):
        extra = sorted(names - set(reference_modules))
        raise AdapterRejected(f"{what} targets other modules than the first adapter loaded here ({len(extra)} more, "
                              f"e.g. {extra[:3]}); hot-swap takes the same modules or a subset")

    # 7. Every weight finite.
    for key, tensor in state_dict.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterRejected(f"{what}: {key} has {bad} NaN or Inf value(s)")

    metadata = {PREFIX + k: v for k, v in config.items()}
    return AdapterReport(manifest.version, rank, alpha, targets, names, state_dict, metadata, manifest)


def _read_manifest(folder: Path, what: str):
    from pydantic import ValidationError

    from alignloop.registry import Manifest

    path = folder / MANIFEST
    if not path.is_file():
        raise AdapterRejected(f"{what}: no {MANIFEST} in {folder}: a half-written version folder (a version is "
                              "complete only once its manifest is written)")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()[:3])
        raise AdapterRejected(f"{what}: {MANIFEST} is malformed: {problems}") from None
    if manifest.kind != "adapter":
        raise AdapterRejected(f"{what}: {MANIFEST} describes a {manifest.kind}, not an adapter")
    return manifest


def _read_header(path: Path) -> dict:
    """The safetensors header's __metadata__ (string -> string)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def lora_config_from_header(header: dict, what: str) -> dict:
    """The UNet's LoraConfig kwargs (r, lora_alpha, target_modules, ...) from diffusers' header field, checked;
    raises AdapterRejected naming what is missing."""
    raw = header.get(METADATA_KEY)
    if not raw:
        raise AdapterRejected(f"{what}: {WEIGHTS} has no LoRA metadata ({METADATA_KEY}: rank, alpha, target "
                              "modules); without it diffusers would load it with alpha = rank. Save it with "
                              "alignloop.adapters.save_adapter")
    try:
        packed = json.loads(raw)
    except (ValueError, TypeError, RecursionError):  # not text (a number in an uploaded header), or nested deep
        raise AdapterRejected(f"{what}: the LoRA metadata in {WEIGHTS} is not JSON text") from None
    config = {k[len(PREFIX):]: v for k, v in packed.items() if k.startswith(PREFIX)} if isinstance(packed, dict) else {}
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and math.isfinite(alpha)
            and isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterRejected(f"{what}: the LoRA metadata must give unet.r (int >= 1), unet.lora_alpha (a number) "
                              f"and unet.target_modules (a list of names); got r={rank!r}, lora_alpha={alpha!r}, "
                              f"target_modules={targets!r}")
    if config.get("use_dora"):
        raise AdapterRejected(f"{what}: DoRA adapters are not served (hot-swap takes plain LoRA)")
    unknown = sorted(set(config) - set(_CONFIG_FIELDS))
    if unknown:
        raise AdapterRejected(f"{what}: the LoRA metadata has fields this service does not serve: {unknown}")
    return config


def _base_layer(module):
    """The plain Linear / Conv2d a LoRA factor attaches to (under peft's wrapper when adapters are loaded)."""
    import torch

    if module is None:
        return None
    base = getattr(module, "base_layer", module)
    return base if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) else None


def _targeted(name: str, targets: list) -> bool:
    """peft's rule for a list of target names: the module's name is one of them or ends with '.<target>'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_shapes(what, name, base, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
    import torch

    if isinstance(base, torch.nn.Linear):
        want_a, want_b = (rank, base.in_features), (base.out_features, rank)
    else:
        want_a = (rank, base.in_channels // base.groups, *base.kernel_size)
        want_b = (base.out_channels, rank, 1, 1)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise AdapterRejected(f"{what}: module {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                              f"this base UNet at rank {rank} needs {want_a} and {want_b}")
