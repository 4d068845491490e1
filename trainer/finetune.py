"""What the fine-tuning methods share: a LoRA on the base UNet, its denoising losses, and the training harness.

    run = LoraRun(config, out_dir)              # the base pipeline (frozen) with a fresh LoRA on its UNet
    for step in run.steps():                    # resumes from out_dir/checkpoint.pt; a progress bar
        loss, stats = method_loss(run, ...)     # each method's own loss (rwr.py, kto.py, ppo.py, refl.py)
        run.update(loss, stats)                 # clip, step, metrics.jsonl, checkpoints
    run.finish()                                # out_dir/adapter: LoRA weights with metadata + config

Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel (alignloop.trainer.distributed): each rank draws
the global batch's rows and random numbers as one process would, keeps its shard (`run.shard`), and the gradients
are averaged over the ranks in `update`; rank 0 alone writes. The methods only shard their rows and take batch
statistics with `run.batch_mean`.

The denoising loss comes in two forms, both per sample ([B]) so that a method can weight them:

- `denoising_loss(latents, texts)`: ‖ε − ε_θ(x_t, t, c)‖², the conditional branch alone: how the base model was
  trained, and the right loss for data from the world (the pre-training renders).
- `denoising_loss(latents, texts, guidance=w)`: ‖ε − ε̃_θ(x_t, t, c)‖² with ε̃ = ε_u + w·(ε_c − ε_u), the
  classifier-free-guided prediction that sampled the data, both branches through the LoRA as at sampling time:
  the loss for the model's own samples.
  Samples drawn at guidance w come from the guided model; regressing the conditional branch alone onto them
  teaches it the guided score, and sampling again at w then guides twice: ε_u + w·(ε̃ − ε_u) =
  ε_u + w²·(ε_c − ε_u). In the shapes world that degrades backgrounds, shapes and counts, aspects the votes
  never asked to change (`alignloop bench finetune` keeps the measurement as the row `rwr_conditional`). The
  guided prediction fitted to its own samples has no such fixed point to drift to (the sampler that drew them
  already fits them), so in principle only the rewards move it. Measured, it keeps background and color, but
  the count still drifts down the longer RWR trains (README, Fine-tuning).
"""

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from alignloop.durable import write_durably
from alignloop.errors import UserFacingError

ADAPTER = "tuned"  # the peft adapter name of the LoRA being trained
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class LoraRun:
    """The base pipeline, frozen, with a trainable LoRA on its UNet, and the loop's bookkeeping."""

    def __init__(self, config, out_dir: Path, progress: bool = True):
        from alignloop.adapters import lora_config
        from alignloop.models import load_generator
        from alignloop.trainer.distributed import init

        self.config = config
        self.world = init(config.device)  # a world of one unless launched by torchrun
        check_world_size(config, self.world.size)
        self.out_dir = Path(out_dir)
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress and self.world.is_main
        self.device = self.world.device  # LoRA weights and math in fp32
        torch.manual_seed(config.seed)  # the same on every rank: the same LoRA initialization, the same draws
        self.rng = random.Random(config.seed)
        self.pipe = load_generator(config.generator, device=self.device, dtype=torch.float32)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        self.unet = self.pipe.unet
        if config.init_adapter:
            self._load_initial_adapter(Path(config.init_adapter))
        else:
            self.unet.add_adapter(lora_config(config.rank, config.alpha, config.target_modules), adapter_name=ADAPTER)
        self.lora_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = self.pipe.scheduler
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.step = 0
        self._embeds: dict = {}
        self._metrics = None
        self._bar = None
        self._started = time.monotonic()
        self._resume()

    def _load_initial_adapter(self, folder: Path) -> None:
        """Start from a published adapter (checked as serving checks one) instead of a fresh LoRA."""
        from alignloop.adapters import base_model_identity, validate_adapter

        report = validate_adapter(folder, base_model_identity(self.pipe), self.unet, max_rank=1024)  # compared below
        found = (report.rank, float(report.alpha), sorted(report.target_modules))
        wanted = (self.config.rank, float(self.config.alpha), sorted(self.config.target_modules))
        if found != wanted:
            raise ValueError(f"init_adapter {folder}: rank, alpha and target modules {found} differ from this "
                             f"config's {wanted}; tune it with its own settings, or start a fresh LoRA")
        self.unet.load_lora_adapter(report.state_dict, prefix="unet", metadata=report.metadata, adapter_name=ADAPTER)
        self.unet.set_adapters([ADAPTER])
        for name, param in self.unet.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)

    # -- conditioning -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] (the encoder is frozen: computed once per text)."""
        missing = sorted({t for t in texts if t not in self._embeds})
        if missing:
            tok = self.pipe.tokenizer(missing, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt")
            hidden = self.pipe.text_encoder(tok.input_ids.to(self.device))[0]
            self._embeds.update(zip(missing, hidden))
        return torch.stack([self._embeds[t] for t in texts])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> latents as the base model was trained on them (posterior samples, scaled)."""
        from alignloop.world.train import to_tensor

        vae = self.pipe.vae
        posterior = vae.encode(to_tensor(images).to(self.device)).latent_dist
        noise = self.randn_like(posterior.mean.contiguous())  # posterior.sample()'s draw: contiguous, whatever the
        return (posterior.mean + posterior.std * noise) * vae.config.scaling_factor  # mean's layout

    # -- data parallelism ---------------------------------------------------------------------------------------

    def shard(self, batch):
        """This rank's slice of a global batch (all of it in one process)."""
        return self.world.shard(batch)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """torch.randn_like(x) as one process draws it for the global batch that `x` is this rank's shard of, then
        this rank's slice. In x's layout: the generator fills memory in order, and the VAE's latents are
        channels-last (torch.cat keeps the layout)."""
        full = torch.randn_like(torch.cat([x] * self.world.size) if self.world.size > 1 else x)
        return self.shard(full)

    def randint(self, low: int, high: int, size: int) -> torch.Tensor:
        full = torch.randint(low, high, (size * self.world.size,), device=self.device)
        return self.shard(full)

    def batch_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over the global batch of a per-sample [b] shard, detached (a batch statistic, e.g. KTO's
        reference point): the mean of the ranks' means, their shards being equal."""
        return self.world.average(x.detach().mean())

    # -- losses -------------------------------------------------------------------------------------------------

    def noised(self, latents: torch.Tensor, low: int = 0):
        """(x_t, ε, t) at uniform random training timesteps t in [low, T)."""
        t = self.randint(low, self.scheduler.config.num_train_timesteps, latents.shape[0])
        noise = self.randn_like(latents)
        return self.scheduler.add_noise(latents, noise, t), noise, t

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, texts: Sequence[str],
                guidance: Optional[float] = None) -> torch.Tensor:
        """ε prediction: the conditional branch, or with `guidance` the guided ε_u + w·(ε_c − ε_u) computed as the
        sampler computes it: both branches through the LoRA, in one UNet pass (see the module docstring)."""
        if guidance is None:
            return self.unet(noisy, t, self.embed(texts)).sample
        batch = len(texts)
        eps = self.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                        torch.cat([self.embed([""] * batch), self.embed(texts)])).sample
        uncond, cond = eps.chunk(2)
        return uncond + guidance * (cond - uncond)

    def denoising_loss(self, latents: torch.Tensor, texts: Sequence[str], guidance: Optional[float] = None,
                       low: int = 0) -> torch.Tensor:
        """Per-sample ‖ε − ε_θ(x_t, t, c)‖² (mean over dimensions) [B], t ≥ `low`; guided when `guidance` is given."""
        noisy, noise, t = self.noised(latents, low)
        pred = self.predict(noisy, t, texts, guidance)
        return F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))

    def denoising_errors(self, latents: torch.Tensor, texts: Sequence[str], guidance: Optional[float] = None,
                         low: int = 0) -> tuple:
        """(policy error [B], base error [B]): ‖ε − ε(x_t)‖² under the LoRA and under the frozen base, at the same
        x_t, ε and t ≥ `low` (Diffusion-KTO's implicit reward is their difference)."""
        noisy, noise, t = self.noised(latents, low)
        policy = F.mse_loss(self.predict(noisy, t, texts, guidance), noise, reduction="none").mean(dim=(1, 2, 3))
        with torch.no_grad(), self.base():
            base = F.mse_loss(self.predict(noisy, t, texts, guidance), noise, reduction="none").mean(dim=(1, 2, 3))
        return policy, base

    def pretraining_loss(self) -> torch.Tensor:
        """β's term (unweighted): the base model's own loss on `pretrain_batch_size` fresh renders of seen prompts
        (held-out pairs avoided), with the base's share of empty prompts so that the unconditional branch stays
        anchored too. Zero, and nothing rendered, when the config's pretrain_weight is 0."""
        from alignloop.trainer.finetune_data import seen_renders

        if not self.config.pretrain_weight:
            return torch.zeros((), device=self.device)
        prompts, images = seen_renders(self.rng, self.config.pretrain_batch_size)  # the global batch, every rank
        texts = ["" if self.rng.random() < self.config.uncond_prob else p.text for p in prompts]
        return self.denoising_loss(self.encode_images(self.shard(images)), self.shard(texts)).mean()

    @contextlib.contextmanager
    def base(self):
        """Context in which the UNet is the frozen base (the LoRA switched off)."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    # -- the loop -------------------------------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        self._bar = tqdm(range(self.step, self.config.steps), desc=type(self.config).__name__, initial=self.step,
                         total=self.config.steps, disable=not self.progress)
        if self.world.is_main:
            self._metrics = open(self.out_dir / METRICS, "a")
        for step in self._bar:
            yield step

    def update(self, loss: torch.Tensor, stats: dict) -> None:
        """`loss`: the mean over this rank's shard. Its gradients are averaged over the ranks, so the step is the
        one the mean over the global batch takes; the logged figures are averages over the ranks too."""
        loss_value, *values = self.world.average_floats([loss.item(), *map(float, stats.values())])
        if not np.isfinite(loss_value):  # every rank sees the same average: all stop together
            raise FloatingPointError(f"step {self.step}: loss is {loss_value}; stats {stats}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.world.is_main:
            row = {"step": self.step, "loss": round(loss_value, 6), "grad_norm": round(float(grad_norm), 6),
                   **{k: round(v, 6) for k, v in zip(stats, values)},
                   "seconds": round(time.monotonic() - self._started, 1)}
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
            self._bar.set_postfix(loss=f"{loss_value:.4f}")
        if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
            self._checkpoint()

    def _average_gradients(self) -> None:
        """All-reduce the LoRA gradients as one flat tensor (one message per step, not one per parameter)."""
        if self.world.size == 1:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.lora_params]
        flat = self.world.average(torch.cat([g.reshape(-1) for g in grads]))
        for param, grad in zip(self.lora_params, flat.split([p.numel() for p in self.lora_params])):
            param.grad = grad.view_as(param)

    def finish(self, info: Optional[dict] = None) -> Path:
        """out_dir/adapter: the LoRA in diffusers format with its metadata, and adapter.json (config, base model,
        world signature, the last metrics, `info`). Returns the folder."""
        from alignloop.adapters import base_model_identity, save_adapter
        from alignloop.world import world_signature

        if self._metrics:
            self._metrics.close()
        folder = self.out_dir / "adapter"
        if self.world.is_main:
            save_adapter(self.unet, folder, ADAPTER)
            lines = (self.out_dir / METRICS).read_text().strip().splitlines()
            record = {"method": type(self.config).__name__, "config": self.config.to_dict(),
                      "base": base_model_identity(self.config.generator), "world": world_signature(),
                      "steps": self.step, "last_metrics": json.loads(lines[-1]) if lines else None, **(info or {})}
            write_durably(folder / "adapter.json", (json.dumps(record, indent=1) + "\n").encode())
        self.world.barrier()  # on every rank, the adapter is there once this returns
        return folder

    def _checkpoint(self) -> None:
        import io

        if not self.world.is_main:  # the ranks hold the same weights, optimizer and RNG states
            self.world.barrier()
            return
        state = {"step": self.step, "lora": {k: v.detach().cpu() for k, v in self._lora_state().items()},
                 "optimizer": self.optimizer.state_dict(), "rng": self.rng.getstate(),
                 "torch_rng": torch.get_rng_state(), "config": self.config.to_dict()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_durably(self.out_dir / CHECKPOINT, buffer.getvalue())
        self.world.barrier()

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if _resumable(state["config"]) != _resumable(self.config.to_dict()):
            changed = sorted(k for k, v in _resumable(self.config.to_dict()).items() if state["config"].get(k) != v)
            raise ValueError(f"{path} was written by another config (differs in {', '.join(changed)}); use a new "
                             "--out or delete it to start over")
        names = dict(self.unet.named_parameters())
        with torch.no_grad():
            for k, v in state["lora"].items():
                names[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]

    def _lora_state(self) -> dict:
        return {k: p for k, p in self.unet.named_parameters() if p.requires_grad}


def check_world_size(config, size: int) -> None:
    """Refuses to split a run over `size` processes when its method does not shard or a batch does not divide."""
    if size == 1:
        return
    if not config.data_parallel:
        raise UserFacingError(f"{type(config).__name__} does not run data-parallel ({size} processes asked for); "
                              "run it as one process (--nproc-per-node 1)")
    batches = [("batch_size", config.batch_size)]
    if config.pretrain_weight:
        batches.append(("pretrain_batch_size", config.pretrain_batch_size))
    for name, value in batches:
        if value % size:
            raise UserFacingError(f"{name} {value} does not split into {size} equal shards (one per process): make "
                                  f"it a multiple of {size}; the global batch stays {name}")


def _resumable(config: dict) -> dict:
    """What must match to resume a run: everything but how long it runs and how often it checkpoints."""
    return {k: v for k, v in config.items() if k not in ("steps", "checkpoint_every")}
