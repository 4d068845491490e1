"""Training of the bundled tiny models on the shapes world, on CPU, with project code only.

Two jobs, each resumable from its last checkpoint in --work-dir and seeded:
- the generator: an AutoencoderKL (phase 1), then a UNet2DConditionModel and a CLIP text encoder trained
  together with the epsilon-prediction loss, 10% empty prompts for classifier-free guidance, and an EMA of
  both (phase 2); exported as a diffusers StableDiffusionPipeline folder;
- the CLIP: a tiny open_clip model trained contrastively on world renders and on generator samples captioned
  by what the oracle found in them (so the scorer knows the generator's own look, and is not told that a
  wrong sample matches its prompt); exported as an open_clip folder.
Both are pretrained on every prompt of the world, held-out pairs included: the held-out split is unseen by
the feedback loop, not by the base models (as in Lee et al., whose unseen objects SD and CLIP had seen).
"""

import dataclasses
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from alignloop import models
from alignloop.durable import write_durably
from alignloop.errors import UserFacingError
from alignloop.world.config import ClipTrainConfig, GeneratorTrainConfig
from alignloop.world.evaluate import generate_images
from alignloop.world.grammar import COLORS, COUNT_WORDS, SHAPES, Prompt, sample_prompts
from alignloop.world.oracle import judge
from alignloop.world import renders_signature, world_signature
from alignloop.world.render import IMAGE_SIZE, render_batch

CHECKPOINT = "checkpoint.pt"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1] (the diffusers convention)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _save_atomic(state: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_durably(path, buffer.getvalue())


def _lr_lambda(warmup: int, total: int):
    def fn(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return fn


class TrainingMismatch(UserFacingError, ValueError):
    """Saved training state that must not be mixed into this run."""


def _load_checkpoint(path: Path, config, world: str):
    """The checkpoint at path, or None; refuses one written with another config or for another world
    (resuming it would mix runs)."""
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt["config"] != dataclasses.asdict(config):
        raise TrainingMismatch(f"{path} was written with another config; use a fresh --work-dir or the same "
                               f"settings. saved={ckpt['config']}")
    if ckpt.get("world") != world:
        raise TrainingMismatch(f"{path} was written for another shapes world (saved {ckpt.get('world')}, now "
                               f"{world}: its grammar, renderer, oracle or held-out split changed); use a fresh "
                               f"--work-dir")
    return ckpt


def _rng_state(rng: random.Random) -> dict:
    return {"python": rng.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(rng: random.Random, state: dict) -> None:
    rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def pretraining_renders(rng: random.Random, n: int):
    """(prompts, images, scenes) of n renders for the base models, which see every prompt and combination."""
    prompts = sample_prompts(rng, n, "all")
    images, scenes = render_batch(prompts, rng, avoid_unseen=False)
    return prompts, images, scenes


def vae_reconstruction_pass_rate(vae, rng: random.Random, images: int = 256) -> float:
    """Oracle pass rate of the autoencoder's reconstructions of renders: the ceiling of any generator
    built on it."""
    prompts, renders, _ = pretraining_renders(rng, images)
    device = next(vae.parameters()).device
    with torch.no_grad():
        recon = vae.decode(vae.encode(to_tensor(renders).to(device)).latent_dist.mode()).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return float(np.mean([judge(image, p).passed for image, p in zip(recon, prompts)]))


def train_generator(out_dir: Path, work_dir: Path, config: GeneratorTrainConfig, progress: bool = True,
                    device: str = "cpu") -> Path:
    """Trains and exports the tiny Stable Diffusion pipeline to out_dir; resumes from work_dir.

    The bundled model is trained on CPU; `device` lets a GPU run the same recipe (config sweeps)."""
    from diffusers import StableDiffusionPipeline

    work_dir.mkdir(parents=True, exist_ok=True)
    world = world_signature()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    vae, unet, text_encoder, scheduler = models.build_tiny_generator_components(config)
    vae, unet, text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)
    tokenizer = models.build_clip_tokenizer(work_dir / "tokenizer")
    # The UNet and the text encoder are trained together, so they are averaged and exported together.
    averaged = {"unet": unet, "text_encoder": text_encoder}
    ema = {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
           for name, module in averaged.items()}
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    # Decaying the rate matters for the autoencoder: sharp corners come in the low-rate tail.
    vae_sched = torch.optim.lr_scheduler.LambdaLR(vae_opt, _lr_lambda(config.warmup_steps, config.vae_steps))
    unet_opt = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), lr=config.unet_lr,
                                 weight_decay=1e-2)
    unet_sched = torch.optim.lr_scheduler.LambdaLR(unet_opt, _lr_lambda(config.warmup_steps, config.unet_steps))
    state = {"vae_step": 0, "unet_step": 0, "scaling_factor": None, "vae_reconstruction_pass": None, "log": []}

    ckpt_path = work_dir / CHECKPOINT
    ckpt = _load_checkpoint(ckpt_path, config, world)
    if ckpt is not None:
        vae.load_state_dict(ckpt["vae"]), unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"]), vae_opt.load_state_dict(ckpt["vae_opt"])
        vae_sched.load_state_dict(ckpt["vae_sched"])
        unet_opt.load_state_dict(ckpt["unet_opt"]), unet_sched.load_state_dict(ckpt["unet_sched"])
        ema = {name: {k: v.to(device) for k, v in weights.items()} for name, weights in ckpt["ema"].items()}
        state = ckpt["state"]
        _set_rng_state(rng, ckpt["rng"])
        print(f"resumed from {ckpt_path}: vae step {state['vae_step']}, unet step {state['unet_step']}")

    def checkpoint():
        _save_atomic({"config": dataclasses.asdict(config), "world": world, "vae": vae.state_dict(),
                      "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                      "vae_opt": vae_opt.state_dict(), "vae_sched": vae_sched.state_dict(),
                      "unet_opt": unet_opt.state_dict(), "unet_sched": unet_sched.state_dict(), "ema": ema,
                      "state": state, "rng": _rng_state(rng)}, ckpt_path)

    def batch():
        return pretraining_renders(rng, config.vae_batch_size)[1]

    #### PHASE 1: AUTOENCODER ####
    vae.train()
    bar = tqdm(range(state["vae_step"], config.vae_steps), desc="vae", disable=not progress,
               initial=state["vae_step"], total=config.vae_steps)
    for step in bar:
        x = to_tensor(batch()).to(device)  # [B,3,32,32]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean()
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        vae_opt.step()
        vae_sched.step()
        state["vae_step"] = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if state["vae_step"] % config.checkpoint_every == 0:
            state["log"].append({"phase": "vae", "step": step + 1, "loss": loss.item()})
            checkpoint()
    vae.eval().requires_grad_(False)
    if state["scaling_factor"] is None:
        with torch.no_grad():
            latents = torch.cat([vae.encode(to_tensor(batch()).to(device)).latent_dist.mean for _ in range(8)])
        state["scaling_factor"] = float(1.0 / latents.std())  # unit-variance latents, as SD's 0.18215 does
        state["vae_reconstruction_pass"] = vae_reconstruction_pass_rate(vae, rng)
        print(f"autoencoder reconstructions pass the oracle at {state['vae_reconstruction_pass']:.3f}")
        checkpoint()
    vae.register_to_config(scaling_factor=state["scaling_factor"])

    #### PHASE 2: UNET + TEXT ENCODER ####
    unet.train(), text_encoder.train()
    bar = tqdm(range(state["unet_step"], config.unet_steps), desc="unet", disable=not progress,
               initial=state["unet_step"], total=config.unet_steps)
    for step in bar:
        prompts, images, _ = pretraining_renders(rng, config.batch_size)
        texts = ["" if rng.random() < config.uncond_prob else p.text for p in prompts]
        with torch.no_grad():
            latents = vae.encode(to_tensor(images).to(device)).latent_dist.sample() * state["scaling_factor"]  # [B,4,16,16]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)  # [B,16]
        hidden = text_encoder(ids)[0]  # [B,16,64]
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        unet_opt.step()
        unet_sched.step()
        # Samples from averaged weights are markedly cleaner. The decay ramps up from 0.1 so that the
        # random initialization does not linger in the average (at a flat 0.999, 1.8 % of it survives 4,000 steps).
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in averaged.items():
                for k, v in module.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[name][k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:  # integer buffers (position ids) are copied
                        ema[name][k].copy_(v)
        state["unet_step"] = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{unet_sched.get_last_lr()[0]:.1e}")
        if state["unet_step"] % config.checkpoint_every == 0:
            state["log"].append({"phase": "unet", "step": step + 1, "loss": loss.item()})
            checkpoint()
    checkpoint()

    #### EXPORT ####
    for name, module in averaged.items():
        module.load_state_dict(ema[name])
    vae, unet, text_encoder = vae.cpu(), unet.cpu(), text_encoder.cpu()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out_dir))
    (out_dir / "training.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "world": world, "renders_digest": renders_signature(),
         "vae_reconstruction_pass": state["vae_reconstruction_pass"],
         "log": state["log"]}, indent=1))
    return out_dir


def restamp_generator(folder: Path, why: str) -> dict:
    """Stamp a trained generator with this world's signature when only the oracle changed.

    Generator training reads prompts and renders, never the oracle's verdicts, so a generator trained before
    an oracle change is the model the same recipe would train now. The stamp records the old signature and
    why it was replaced, and the autoencoder's reconstruction pass rate is measured again with this oracle.
    Refuses a generator whose prompts or renders differ (use train-generator then)."""
    from alignloop.models import load_generator

    record_path = Path(folder) / "training.json"
    if not record_path.is_file():
        raise TrainingMismatch(f"{folder} has no training.json: only a generator trained by `alignloop world "
                               "train-generator` can be restamped")
    record = json.loads(record_path.read_text())
    world = world_signature()
    if record.get("world") == world:
        return record
    renders = renders_signature()
    # Records from before the digest was kept cannot be checked; the change that restamps them says why.
    if record.get("renders_digest") not in (None, renders):
        raise TrainingMismatch(f"{folder} was trained on other prompts or renders; retrain it "
                               "(alignloop world train-generator)")
    vae = load_generator(str(folder), device="cpu").vae
    record["restamped"] = record.get("restamped", []) + [
        {"from": record.get("world"), "to": world, "why": why,
         "vae_reconstruction_pass_before": record.get("vae_reconstruction_pass")}]
    record["world"] = world
    record["renders_digest"] = renders
    record["vae_reconstruction_pass"] = vae_reconstruction_pass_rate(vae, random.Random(0))
    write_durably(record_path, json.dumps(record, indent=1).encode())
    return record


def consistent_captions(count: int, shape: str, color, background) -> list:
    """Every world prompt that is true of a scene with these attributes."""
    out = [Prompt("count", count, shape).text]
    if color and background:
        out.append(Prompt("combination", count, shape, color=color, background=background).text)
    if count == 1 and color:
        out.append(Prompt("color", 1, shape, color=color).text)
    if count == 1 and background:
        out.append(Prompt("background", 1, shape, background=background).text)
    return out


def generated_pool(generator_dir: Path, size: int, rng: random.Random, steps: int = 20, guidance: float = 5.0,
                   progress: bool = True):
    """Generator samples of world prompts with captions of what the oracle found in them.

    Returns (images uint8 [N,32,32,3], list of caption lists); samples whose content is not a well-formed
    scene (no objects, more than the grammar counts, mixed shapes) are dropped.
    """
    pipe = models.load_generator(str(generator_dir), device="cpu")
    images, captions = [], []
    prompts = sample_prompts(rng, size, "all")
    for i in tqdm(range(0, size, 32), desc="generator samples", disable=not progress):
        chunk = prompts[i:i + 32]
        seeds = [rng.randrange(2**31) for _ in chunk]
        for image in generate_images(pipe, [p.text for p in chunk], seeds, steps, guidance, size=IMAGE_SIZE):
            found = _describe(image)
            if found:
                images.append(image)
                captions.append(found)
    return np.stack(images), captions


def _describe(image: np.ndarray):
    """Captions true of a generated image according to the oracle, or None if it is not a clean scene."""
    probe = judge(image, Prompt("count", 1, "circle"))  # any prompt: we read what was found
    if probe.found_color not in COLORS or not 1 <= probe.found_count <= max(COUNT_WORDS):  # None, or "brown" objects
        return None
    shapes = {s for s in SHAPES
              if judge(image, Prompt("count", probe.found_count, s)).passed}
    if len(shapes) != 1:
        return None
    return consistent_captions(probe.found_count, shapes.pop(), probe.found_color, probe.found_background)


def _load_or_draw_pool(generator_dir: Path, work_dir: Path, config: ClipTrainConfig, world: str, progress: bool):
    """The generator samples the CLIP trains on, drawn once and kept in work_dir under a hash of the generator's
    training record, the pool size and the world; refuses a generator trained for another world."""
    record_path = generator_dir / "training.json"
    if record_path.exists():
        record = record_path.read_bytes()
        trained_for = json.loads(record).get("world")
    else:  # a generator from elsewhere: no record of its world
        record, trained_for = str(generator_dir.resolve()).encode(), None
    if trained_for not in (None, world):
        raise TrainingMismatch(f"generator {generator_dir} was trained for another shapes world ({trained_for}, now "
                               f"{world}); retrain it first (alignloop world train-generator)")
    key = hashlib.sha256(record + json.dumps([config.generated_pool, config.seed, world]).encode()).hexdigest()[:12]
    pool_path = work_dir / f"generated_pool-{key}.npz"
    if not pool_path.exists():
        # Its own rng: the training stream is the same whether the pool was drawn now or on an earlier run.
        images, captions = generated_pool(generator_dir, config.generated_pool, random.Random(config.seed + 1),
                                          progress=progress)
        buffer = io.BytesIO()
        np.savez(buffer, images=images, captions=np.array(json.dumps(captions)))
        write_durably(pool_path, buffer.getvalue())
    data = np.load(pool_path)
    return data["images"], json.loads(str(data["captions"]))


def train_clip(out_dir: Path, work_dir: Path, config: ClipTrainConfig, generator_dir: Path = None,
               progress: bool = True) -> Path:
    """Trains and exports the tiny open_clip model to out_dir; resumes from work_dir."""
    import open_clip

    work_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    model = models.build_tiny_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=models.TEXT_CONTEXT)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, config.steps))
    state = {"step": 0, "log": []}
    world = world_signature()

    ckpt_path = work_dir / CHECKPOINT
    ckpt = _load_checkpoint(ckpt_path, config, world)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"]), sched.load_state_dict(ckpt["sched"])
        state = ckpt["state"]
        _set_rng_state(rng, ckpt["rng"])
        print(f"resumed from {ckpt_path}: step {state['step']}")

    pool = None if generator_dir is None else _load_or_draw_pool(Path(generator_dir), work_dir, config, world, progress)

    def checkpoint():
        _save_atomic({"config": dataclasses.asdict(config), "world": world, "model": model.state_dict(),
                      "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state, "rng": _rng_state(rng)},
                     ckpt_path)

    n_generated = int(config.batch_size * config.generated_share) if pool is not None else 0
    model.train()
    bar = tqdm(range(state["step"], config.steps), desc="clip", disable=not progress, initial=state["step"],
               total=config.steps)
    for step in bar:
        _, images, scenes = pretraining_renders(rng, config.batch_size - n_generated)
        captions = [rng.choice(consistent_captions(len(s.boxes), s.shape, s.color, s.background)) for s in scenes]
        if n_generated:
            picks = [rng.randrange(len(pool[1])) for _ in range(n_generated)]
            images = np.concatenate([images, pool[0][picks]])
            captions += [rng.choice(pool[1][i]) for i in picks]
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std  # [B,3,32,32]
        image_features = F.normalize(model.encode_image(x), dim=-1)  # [B,64]
        text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)  # [B,64]
        logits = model.logit_scale.exp() * image_features @ text_features.T  # [B,B]
        # The same caption can occur twice in a batch: all its images are positives (soft targets).
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        state["step"] = step + 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if state["step"] % config.checkpoint_every == 0:
            state["log"].append({"step": step + 1, "loss": loss.item()})
            checkpoint()
    checkpoint()
    models.save_tiny_clip(model.eval(), out_dir)
    (out_dir / "training.json").write_text(json.dumps({"config": dataclasses.asdict(config), "world": world,
                                                       "log": state["log"]}, indent=1))
    return out_dir
