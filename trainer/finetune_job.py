"""`alignloop train rwr|ppo|refl|kto --snapshot DIR`: a LoRA from the users' votes, published as a candidate.

    1. Read the snapshot's votes (alignloop feedback snapshot), less those on prompts naming the world's held-out
       pairs (dropped and counted: they never enter the loop). Each voted image is redrawn, latents and all, from
       what its generation event recorded (prompt, the image's own seed, steps, guidance, adapter) through the one generation
       path, and compared with the image the user saw: a redraw that differs (another device, another model)
       is dropped and counted, never trained on as if it were the voted image.
    2. Train the method (alignloop.trainer.rwr / ppo / refl / kto) from the base generator. RWR's reward is the
       vote where there is one; PPO and ReFL optimize the registry's live reward model (or --reward-version).
    3. Evaluate the adapter (oracle pass rate, fidelity, diversity on world prompts) and publish it to the
       registry as a candidate with its manifest: parent, base model hash, snapshot and offsets, config,
       metrics, world signature. Nothing is published when anything fails. The report is also written to
       <out>/report.json (how the nightly job reads a run it launched under torchrun).

Under torchrun (`torchrun --nproc_per_node N -m alignloop train ...`) every rank redraws the votes and trains its
shard of each batch (alignloop.trainer.distributed); rank 0 alone evaluates, saves and publishes, and only rank 0
prints the report.
"""

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from alignloop.errors import UserFacingError
from alignloop.trainer.config import METHOD_CONFIGS

METHODS = tuple(METHOD_CONFIGS)  # rwr, ppo, refl, kto
REDRAW_TOLERANCE = 2.0 / 255  # mean absolute pixel difference between a redraw and the voted PNG
REPORT = "report.json"  # in the run folder: the command's report, written by rank 0 when it is done


def redraw_voted(pipe, rows: list, folder: Path, registry, progress: bool = True):
    """(Samples, votes +1/-1, report) for the vote rows whose images redraw to what the users saw. Votes on
    prompts naming held-out pairs are dropped first and counted (report["held_out_pair_votes"])."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from alignloop.trainer.finetune_data import Samples, sample_latents
    from alignloop.trainer.reward_model import drop_held_out_pair_votes
    from alignloop.world.grammar import parse_prompt

    kept, report = [], defaultdict(int)
    voted = len(rows)
    # Dropped, not refused: snapshots are cumulative, so one such vote would fail every later nightly run
    rows, report["held_out_pair_votes"] = drop_held_out_pair_votes(rows)
    if not rows:
        raise UserFacingError(f"all {voted} votes are on prompts naming held-out pairs of the world, which never "
                              "enter the feedback loop: nothing to fine-tune on; collect votes on other prompts")
    groups = defaultdict(list)
    for row in rows:
        if row.get("candidate_seed") is None or row.get("steps") is None:
            report["without_seed"] += 1  # written before generation/2 recorded per-image seeds: not reproducible
        else:
            groups[(row.get("adapter_version") or "base", int(row["steps"]), float(row["guidance"]))].append(row)
    latents, images = [], []
    for (adapter, steps, guidance), members in groups.items():
        with adapter_active(pipe, adapter, registry):
            for start in tqdm(range(0, len(members), 32), desc=f"redraw {adapter}", disable=not progress):
                chunk = members[start:start + 32]
                z, x = sample_latents(pipe, [r["prompt"] for r in chunk], [int(r["candidate_seed"]) for r in chunk],
                                      steps, guidance)
                for row, zi, xi in zip(chunk, z, x):
                    path = folder / (row.get("image_path") or f"images/{row['image_id']}.png")
                    if not path.is_file():
                        report["missing_image"] += 1
                        continue
                    seen = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
                    if seen.shape != xi.shape or np.abs(seen - xi).mean() / 255 > REDRAW_TOLERANCE:
                        report["redraw_differs"] += 1
                        continue
                    kept.append(row)
                    latents.append(zi)
                    images.append(xi)
    if not kept:
        raise UserFacingError(f"none of the {voted} voted images could be redrawn as the users saw them "
                              f"({dict(report)}); fine-tuning needs votes on images this generator drew")
    samples = Samples([parse_prompt(r["prompt"]) or r["prompt"] for r in kept],
                      np.array([int(r["candidate_seed"]) for r in kept]), torch.stack(latents).numpy(), np.stack(images),
                      np.zeros(len(kept), dtype=bool))
    votes = np.array([1 if r["label"] else -1 for r in kept], dtype=np.int8)
    report.update(voted=voted, redrawn=len(kept))
    return samples, votes, dict(report)


class adapter_active:
    """Context: the pipeline's UNet draws with a registry adapter version ("base": none), then returns to base."""

    def __init__(self, pipe, version: str, registry):
        self.pipe, self.version, self.registry = pipe, version, registry

    def __enter__(self):
        if self.version == "base":
            return self
        from alignloop.adapters import base_model_identity, validate_adapter

        folder = self.registry.fetch("adapter", self.version)
        report = validate_adapter(folder, base_model_identity(self.pipe), self.pipe.unet, max_rank=1024)
        self.pipe.unet.load_lora_adapter(report.state_dict, prefix="unet", metadata=report.metadata,
                                         adapter_name="data_source")
        self.pipe.unet.set_adapters(["data_source"])
        return self

    def __exit__(self, *exc):
        if self.version != "base":
            self.pipe.unet.delete_adapters("data_source")


def train_method(name: str, config, samples, votes, learned, learned_scores, clip, head, out_dir: Path,
                 progress: bool):
    """One method's LoRA run from the base into `out_dir` (resumed when it holds this config's checkpoint)."""
    from alignloop.trainer.finetune_data import seen_prompts

    if name.startswith("rwr"):
        from alignloop.trainer.rwr import sample_weights, train_rwr

        return train_rwr(config, samples, sample_weights(votes, learned_scores, config), out_dir, progress)
    if name == "kto":
        from alignloop.trainer.kto import train_kto

        return train_kto(config, samples, votes, out_dir, progress)
    if name == "ppo":
        from alignloop.trainer.ppo import default_rewards, train_ppo

        return train_ppo(config, seen_prompts(), default_rewards(learned, config), out_dir, progress)
    if name == "refl":
        from alignloop.trainer.refl import DifferentiableReward, train_refl

        return train_refl(config, seen_prompts(), DifferentiableReward(clip, head), out_dir, progress)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def evaluate_splits(pipe, clip, config, eval_prompts: int, progress: bool) -> dict:
    """Pass rate, fidelity and diversity on unseen and seen world prompts (4 seeded images each, the sampler of
    `config`): the same prompts and seeds for every pipeline, so an adapter and its parent compare one to one."""
    from alignloop.trainer.finetune_eval import evaluate_adapter

    metrics = {}
    for split_name in ("unseen", "seen"):
        result = evaluate_adapter(pipe, clip, split_name, per_prompt=4, max_prompts=eval_prompts,
                                  steps=config.sample_steps, guidance=config.guidance, progress=progress)
        metrics[f"{split_name}_pass"] = result["overall"]
        metrics[f"{split_name}_fidelity_fd"] = result["fidelity_fd"]
        metrics[f"{split_name}_diversity"] = result["diversity"]
        if split_name == "seen":  # per image: the nightly gate pairs a candidate's verdicts with its parent's
            metrics.update(seen_passed=result["passed"], seen_per_prompt=result["per_prompt"])
    return metrics


def publish_trained(store, adapter_dir: Path, method: str, config, metrics: dict, data: dict, why: str,
                    parent: Optional[str] = None):
    """Publish the adapter a run saved in `adapter_dir` as a candidate: its weights, adapter.json and a manifest
    with the base model, the method's config, the metrics and the data (with the world's signature)."""
    from alignloop.rollout import publish_adapter

    record = json.loads((adapter_dir / "adapter.json").read_text())
    return publish_adapter(store, {n: adapter_dir / n for n in ("pytorch_lora_weights.safetensors", "adapter.json")},
                           base=record["base"], config={"method": method, **config.to_dict()}, metrics=metrics,
                           data={**data, "world": record["world"]}, parent=parent, who=f"train {method}", why=why)


def finetune_from_snapshot(method: str, snapshot: Path, config, out: Optional[Path] = None,
                           registry: Optional[str] = None, publish: bool = True,
                           reward_version: Optional[str] = None, eval_prompts: int = 32, progress: bool = True,
                           log=print) -> Optional[dict]:
    """The whole command; returns its report (what the CLI prints as JSON), or None on torchrun's ranks > 0."""
    import torch

    from alignloop.durable import write_durably
    from alignloop.models import load_clip, load_generator
    from alignloop.registry import Registry
    from alignloop.settings import home
    from alignloop.trainer.distributed import init
    from alignloop.trainer.reward_model import read_snapshot

    if method not in METHODS:
        raise UserFacingError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    started = time.monotonic()
    world = init(config.device)  # under torchrun: this rank's device; the process group joined
    if not world.is_main:
        log = lambda *a: None  # noqa: E731  (one report, rank 0's)
    store = Registry(registry)
    out = world.broadcast(Path(out) if out else home() / "train" / method / time.strftime("%Y%m%d-%H%M%S"))

    # 1. Votes, redrawn (by every rank: each needs them all)
    rows, folder, snapshot_manifest = read_snapshot(snapshot)
    pipe = load_generator(config.generator, device=world.device, dtype=torch.float32)
    samples, votes, redraw = redraw_voted(pipe, rows, folder, store, progress)
    log(f"votes: {redraw['voted']} read, {redraw['held_out_pair_votes']} dropped for naming held-out pairs, "
        f"{redraw['redrawn']} redrawn as seen ({(votes > 0).sum()} up)")

    # 2. Train
    clip = load_clip(device=world.device)
    learned, head, reward_source = None, None, None
    if method in ("ppo", "refl") or (method == "rwr" and (votes == 0).any()):
        from alignloop.rewards import get_reward
        from alignloop.rewards.functions import head_from_registry
        from alignloop.rewards.scorer import load_head_for
        from alignloop.trainer.config import NEEDS_LIVE_REWARD
        from alignloop.trainer.reward_model import REWARD_KIND

        if method in NEEDS_LIVE_REWARD and reward_version is None and store.live(REWARD_KIND) is None:
            # What serving ranks by while no head is live (the reward gate keeps a head that loses to it)
            learned, reward_source = get_reward("clip", clip=clip), "clip"
            log("no reward model is live: optimizing the CLIP score, what serving ranks by")
        else:
            path, manifest = head_from_registry(registry, reward_version)
            head, reward_source = load_head_for(path, clip), manifest.version
            learned = get_reward("learned", head=head, clip=clip)
    run = train_method(method, config, samples, votes, learned, None, clip, head, out, progress)

    # 3. Evaluate, save, publish: rank 0 (the other ranks wait in finish() and are done)
    if not world.is_main:
        run.finish()
        return None
    run.unet.eval()
    metrics = evaluate_splits(run.pipe, clip, config, eval_prompts, progress)
    data = {"snapshot": str(folder), "snapshot_version": folder.name, "offsets": snapshot_manifest.get("offsets"),
            "votes": int(len(votes)), "redraw": redraw, "reward_model": reward_source}
    adapter_dir = run.finish({"data": data, "metrics": metrics})
    report = {"method": method, "out": str(out), "adapter": str(adapter_dir), "metrics": metrics, "data": data,
              "seconds": round(time.monotonic() - started, 1)}
    if publish:
        manifest = publish_trained(store, adapter_dir, method, config, metrics, data,
                                   why=f"trained from snapshot {folder.name}: unseen pass {metrics['unseen_pass']}")
        report["published"] = manifest.version
        log(f"published adapter {manifest.version} as candidate")
    write_durably(out / REPORT, (json.dumps(report, indent=1) + "\n").encode())
    return report
