"""Training configs of the bundled models; saved with every checkpoint and exported model."""

import dataclasses


@dataclasses.dataclass
class GeneratorTrainConfig:
    seed: int = 0
    # Architecture (models.build_tiny_generator_components); 16x16 latents, one UNet level per channel entry.
    vae_channels: tuple = (32, 64)
    unet_channels: tuple = (48, 64, 96)
    unet_attention: tuple = (0, 1, 1)  # 1: self- and cross-attention at that level
    unet_layers_per_block: int = 1
    vae_steps: int = 2400  # phase 1 optimizer steps: reconstructions pass the oracle at 0.77 after 800, 0.99 after 2400
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # tiny, as in SD: the latent only needs to be roughly Gaussian
    unet_steps: int = 4000  # phase 2 optimizer steps (UNet + text encoder)
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    batch_size: int = 64
    uncond_prob: float = 0.1  # share of empty prompts, for classifier-free guidance
    ema_decay: float = 0.999  # of the UNet and the text encoder, which are exported averaged
    checkpoint_every: int = 250  # steps between resumable checkpoints


@dataclasses.dataclass
class ClipTrainConfig:
    seed: int = 0
    steps: int = 1000  # the bundled model: ~22 min on 2 cores
    lr: float = 1e-3
    batch_size: int = 256
    warmup_steps: int = 100
    generated_share: float = 0.25  # share of each batch drawn from generator samples (when given)
    generated_pool: int = 2048  # generator samples drawn once before training
    checkpoint_every: int = 250
