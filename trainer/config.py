"""Typed training configs of alignloop.trainer; each is saved with what it trains (head metadata, manifest).

Kept free of heavy imports: the CLI builds its flags from these fields at start-up.
"""

import dataclasses
from typing import ClassVar

from alignloop.adapters import DEFAULT_TARGET_MODULES


@dataclasses.dataclass
class RewardTrainConfig:
    """How a reward head is trained; saved with every head (file metadata and registry manifest)."""

    seed: int = 0  # seeds the head's initialization, the batch order and the perturbed prompts
    # Head (Lee et al. App. D: two hidden layers of 1024, ReLU, sigmoid output)
    hidden: tuple = (1024, 1024)  # MLP hidden widths; each a multiple of 16 in 16..2048 (the fused kernel's limits)
    # Loss = MSE(sigmoid, vote) + classification_weight * CE + pairwise_weight * Bradley-Terry
    classification_weight: float = 0.5  # λ of Lee et al.; 0 turns prompt classification off
    temperature: float = 2.0  # T of Lee et al.: the head's logits are divided by T before the softmax over prompts
    prompts_per_image: int = 8  # N: the true prompt and N-1 rule-perturbed ones (alignloop.world.perturb), >= 2
    classify_downvoted: bool = False  # False: classify only up-voted images, as Lee et al. §3.2 say (a down-voted
    #                                   image may fit a perturbed prompt better than its own); True: every image
    pairwise_weight: float = 0.1  # weight of -log σ(logit_up - logit_down) over same-prompt pairs; 0 turns it off.
    #                               At 0.5 the head ranked unseen prompts' images worse (0.68 vs 0.73 without it, 3,000
    #                               simulated votes): on logits the term keeps pushing noisy pairs apart
    # Optimization: AdamW with Lee et al.'s betas, eps and weight decay
    lr: float = 1e-3  # constant learning rate
    weight_decay: float = 1e-2
    epochs: int = 40  # passes over the training votes
    batch_size: int = 128  # votes per step; each step also draws as many same-prompt (up, down) pairs
    # Data
    max_user_share: float = 0.05  # largest share of the training votes one user may keep (see clean_votes), (0, 1]
    min_user_votes: int = 50  # votes every user keeps whatever the share: small datasets are not thinned, >= 0
    held_out_fraction: float = 0.1  # share of prompts (by hash of the normalized prompt) held out for the gate, [0, 1)

    def __post_init__(self):
        from alignloop.kernels.config import HeadConfig

        self.hidden = tuple(self.hidden)
        HeadConfig(embed_dim=1, hidden=self.hidden)  # "hidden[i] must be a multiple of 16 in 16..2048, got ..."
        checks = [
            ("classification_weight", self.classification_weight >= 0, ">= 0"),
            ("temperature", self.temperature > 0, "> 0"),
            ("prompts_per_image", isinstance(self.prompts_per_image, int) and self.prompts_per_image >= 2,
             "an integer >= 2"),
            ("pairwise_weight", self.pairwise_weight >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("max_user_share", 0 < self.max_user_share <= 1, "in (0, 1]"),
            ("min_user_votes", isinstance(self.min_user_votes, int) and self.min_user_votes >= 0, "an integer >= 0"),
            ("held_out_fraction", 0 <= self.held_out_fraction < 1, "in [0, 1)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}


@dataclasses.dataclass
class FinetuneConfig:
    """What every LoRA fine-tuning run shares; saved with its adapter (metadata and registry manifest)."""

    # Whether the method runs under torchrun with WORLD_SIZE > 1 (alignloop.trainer.distributed): its batch splits
    # into per-sample shards. Not a field: it is the method's property, not a setting.
    data_parallel: ClassVar[bool] = True
    seed: int = 0
    generator: str = "shapes-sd-tiny"  # the base pipeline: bundled name, local diffusers folder or hub id
    device: str = ""  # "" = CUDA when available, else CPU; LoRA weights and the loss stay fp32
    # LoRA on the UNet: attention, feed-forward, projections and ResNet convolutions
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple = DEFAULT_TARGET_MODULES
    init_adapter: str = ""  # "" = a fresh LoRA; else a registry adapter version folder to go on from (its rank,
    #                         alpha and target modules must equal these): the nightly job tunes the live adapter
    # Optimization: AdamW on the LoRA weights only
    lr: float = 1e-4
    weight_decay: float = 0.0
    steps: int = 300
    batch_size: int = 32  # model samples per step: the global batch, split evenly over torchrun's processes
    grad_clip: float = 1.0
    # β·pre-training loss: the base's own denoising loss on fresh renders of seen prompts (Lee et al. eq. 2)
    # The model's own samples are trained at timesteps t >= sample_min_timestep only (of 1000): where the layout,
    # and with it the count, is decided; the pre-training renders at every t
    sample_min_timestep: int = 0
    pretrain_weight: float = 1.0
    pretrain_batch_size: int = 32  # renders per step (global, like batch_size)
    uncond_prob: float = 0.1  # empty prompts in the pre-training batch, as the base was trained
    # The sampler the data came from and the adapter is evaluated with (sampling and training must agree)
    sample_steps: int = 20
    guidance: float = 5.0
    checkpoint_every: int = 100

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        checks = [
            ("rank", isinstance(self.rank, int) and self.rank >= 1, "an integer >= 1"),
            ("alpha", self.alpha > 0, "> 0"),
            ("lr", self.lr > 0, "> 0"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("pretrain_weight", self.pretrain_weight >= 0, ">= 0"),
            ("uncond_prob", 0 <= self.uncond_prob < 1, "in [0, 1)"),
            ("sample_min_timestep", 0 <= self.sample_min_timestep < 1000, "in [0, 1000)"),
            ("guidance", self.guidance >= 0, ">= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}


@dataclasses.dataclass
class RwrConfig(FinetuneConfig):
    """Reward-weighted likelihood (Lee et al. eq. 2): Σ r·‖ε − ε̃_θ‖² over model samples + β·pre-training loss."""

    vote_weight_up: float = 1.0  # the reward of an up-voted sample
    vote_weight_down: float = 0.0  # of a down-voted one (Lee et al.: binary rewards, so down-votes drop out)
    learned_reward_power: float = 1.0  # unvoted samples weigh reward**power (the learned reward, in [0, 1])
    guided_loss: bool = True  # fit the guided prediction that drew the samples (alignloop.trainer.finetune)


@dataclasses.dataclass
class KtoConfig(FinetuneConfig):
    """Diffusion-KTO (Li et al. 2024) on the raw thumbs: no reward model."""

    beta: float = 2000.0  # β of the sigmoid utility; the implicit reward g is a difference of mean squared errors
    up_weight: float = 1.0  # λ_up: the loss weight of up-voted images
    down_weight: float = 1.0  # λ_down: of down-voted ones
    guided_loss: bool = True  # g from the guided predictions (as the samples were drawn); False: conditional branch


@dataclasses.dataclass
class PpoConfig(FinetuneConfig):
    """PPO on the denoising MDP (Pinterest §3, Algorithm 1; after DDPO). `steps` counts optimizer updates; a round
    samples `batch_size * minibatches` rollouts with the current LoRA and makes `minibatches` updates on them."""

    # Its rewards and advantages are statistics of the whole round (color diversity over the batch, per-prompt
    # trackers): sharding needs the rollouts gathered across ranks, which is not built.
    data_parallel: ClassVar[bool] = False
    lr: float = 3e-4
    steps: int = 120
    batch_size: int = 16  # rollouts per optimizer update
    minibatches: int = 2  # updates per round of rollouts: later ones see a changed policy, so the clip matters
    samples_per_prompt: int = 4  # rollouts of each prompt in a round: its advantage has its own group to compare
    eta: float = 1.0  # DDIM noise of the rollouts (> 0: the policy needs a density)
    train_timesteps: int = 5  # denoising steps trained per rollout, drawn at random (Pinterest: 5 of 50)
    clip_range: float = 1e-4  # PPO's ratio clip; for log-probs that are a mean over latent dimensions
    advantage_clip: float = 5.0  # |advantage| bound after normalization
    tracker_buffer: int = 32  # rewards kept per prompt for its running mean and std
    tracker_min_count: int = 4  # below this many, a prompt's advantage uses the batch's mean and std
    learned_reward_weight: float = 1.0  # weight of the learned reward's advantage
    color_diversity_weight: float = 0.2  # of the color-diversity advantage, on prompts that leave color open
    pretrain_weight: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0 (the policy needs a density), got {self.eta}")
        if (self.batch_size * self.minibatches) % self.samples_per_prompt:
            raise ValueError(f"samples_per_prompt must divide batch_size * minibatches "
                             f"({self.batch_size} * {self.minibatches}), got {self.samples_per_prompt}")


@dataclasses.dataclass
class ReflConfig(FinetuneConfig):
    """Reward gradient with a KL term (the student report's eq. 5, after ReFL): −α·reward + β_KL·KL at one step
    drawn from the last quarter of the trajectory, gradients only through that step."""

    lr: float = 1e-4
    steps: int = 150
    batch_size: int = 16
    eta: float = 1.0  # the trajectory's DDIM noise; the KL is between the step's Gaussians, so σ_t > 0
    reward_weight: float = 1.0  # α, on the learned head's reward (in (0, 1))
    # α when the reward is the CLIP score (no head live): its gap between a prompt's passing and failing images is
    # a few hundredths to a tenth or two of a cosine; at 3 ReFL on it passed unseen prompts as on the head (0.513)
    clip_reward_weight: float = 3.0
    kl_weight: float = 0.01  # β_KL; the KL is ‖μ_θ − μ_base‖² / 2σ², a mean over latent dimensions
    last_fraction: float = 0.25  # the step is drawn from this last share of the trajectory
    pretrain_weight: float = 0.0  # the KL term is this method's anchor; add renders too if wanted

    def __post_init__(self):
        super().__post_init__()
        if self.eta <= 0:  # σ_t = 0 would make the KL 0/0
            raise ValueError(f"eta must be > 0 (the KL is between the step's Gaussians), got {self.eta}")


@dataclasses.dataclass
class NightlyConfig:
    """What a nightly run does; saved in its state and in the candidate's manifest."""

    method: str = "refl"  # rwr | ppo | refl | kto: ReFL passed unseen prompts best in `bench finetune` (0.513)
    fallback_method: str = dataclasses.field(default="", metadata={"help": (
        "ppo and refl optimize the live reward: the live head, or the CLIP score (what serving ranks by) while the "
        "reward stage's gate has left no head live; a method named here (kto: the thumbs alone, or rwr) tunes "
        "instead then")})
    steps: int = 0  # optimizer steps of the method; 0 = the method's default
    canary_share: float = 0.1  # share of users arm B (the candidate) gets, in (0, 1)
    eval_prompts: int = 32  # seen prompts (4 images each) the candidate and its parent are compared on
    min_new_votes: int = 1  # fewer new votes than this since the last run that tuned: nothing to do
    max_drop: float = dataclasses.field(default=0.0, metadata={"help": (
        "open no canary when the candidate's seen pass rate is below its parent's by more than this (and by more "
        "than chance, --worse-significance)")})
    # Any drop alone would hold back an adapter as good as its parent whenever chance puts it an image behind, nearly
    # half the time, and the guardrail (which promotes only at P(B better) >= 0.99 on live thumbs) would never see it
    worse_significance: float = dataclasses.field(default=0.05, metadata={"help": (
        "a drop counts as more than chance when a one-sided sign test over the prompts on which the candidate's and "
        "its parent's paired images (same seeds) differ in number passed gives p below this; 1: any drop over "
        "--max-drop counts")})
    # Processes (one per GPU) the finetune stage trains with: > 1 launches `alignloop train METHOD` under torchrun
    nproc_per_node: int = dataclasses.field(default=1, metadata={"help": (
        "processes the finetune stage trains with, one per GPU: above 1 it runs `alignloop train METHOD` under "
        "torchrun (data-parallel, the same adapter as one process); the method's batch sizes must divide by it")})

    def __post_init__(self):
        if self.method not in METHOD_CONFIGS:
            raise ValueError(f"method must be one of {', '.join(METHOD_CONFIGS)}, got {self.method!r}")
        allowed = [m for m in METHOD_CONFIGS if m not in NEEDS_LIVE_REWARD]
        if self.fallback_method not in ("", *allowed):
            raise ValueError(f"fallback_method must be {', '.join(allowed)} (methods that need no reward model) or "
                             f"'' (optimize the CLIP score), got {self.fallback_method!r}")
        if not (isinstance(self.nproc_per_node, int) and self.nproc_per_node >= 1):
            raise ValueError(f"nproc_per_node must be an integer >= 1, got {self.nproc_per_node!r}")
        if self.nproc_per_node > 1 and not METHOD_CONFIGS[self.method].data_parallel:
            raise ValueError(f"nproc_per_node must be 1 for method {self.method}, which does not run data-parallel; "
                             f"got {self.nproc_per_node}")
        checks = [("steps", isinstance(self.steps, int) and self.steps >= 0, "an integer >= 0"),
                  ("canary_share", 0 < self.canary_share < 1, "in (0, 1)"),
                  ("eval_prompts", isinstance(self.eval_prompts, int) and self.eval_prompts >= 1, "an integer >= 1"),
                  ("min_new_votes", isinstance(self.min_new_votes, int) and self.min_new_votes >= 1, "an integer >= 1"),
                  ("max_drop", 0 <= self.max_drop <= 1, "in [0, 1]"),
                  ("worse_significance", 0 < self.worse_significance <= 1, "in (0, 1]")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The config class of each fine-tuning method (the CLI's `train METHOD` flags, the nightly job's --method).
METHOD_CONFIGS = {"rwr": RwrConfig, "ppo": PpoConfig, "refl": ReflConfig, "kto": KtoConfig}
NEEDS_LIVE_REWARD = ("ppo", "refl")  # the methods that optimize the live reward model


@dataclasses.dataclass
class ExperimentConfig:
    """`alignloop experiment`: the simulated traffic, the cycles and the evaluation of one closed-loop run. The
    defaults are the full run's; QUICK_EXPERIMENT is the smoke test's (`--quick`)."""

    seed: int = 0  # seeds the users' prompts and votes, the rater's noise and every evaluation image
    # Traffic: simulated users over HTTP, as the browser's contract (alignloop.trainer.experiment.Traffic)
    users: int = 64  # identities (sticky arms are per identity): enough that a canary share reaches several
    clients: int = 3  # users requesting at once; 3 keeps the 2-core CPU busy without shedding
    n: int = 8  # candidates per request: 8 halves a request's CPU (~3 s) so that two cycles fit in about an hour
    k: int = 4  # images shown (the best k by the live reward)
    steps: int = 20  # denoising steps per request
    guidance: float = 5.0
    vote_rate: float = 1.0  # chance a user thumbs a shown image, in (0, 1]
    flip: float = 0.1  # the simulated rater's noise: chance a vote is the opposite of the oracle's verdict
    # Cycles: a day's traffic, the nightly job, then traffic while the guardrail decides on the canary
    cycles: int = 2
    requests_per_cycle: int = 150  # a "day": 600 votes at k=4, vote_rate 1 (about 8 minutes of CPU at n=8)
    method: str = "refl"  # the nightly job's method (its default: the best of `bench finetune`)
    method_steps: int = 0  # optimizer steps of the nightly method; 0 = the method's default
    canary_share: float = 0.5  # users on the candidate: half, so the guardrail has its votes in one "day"
    canary_requests: int = 100  # traffic the guardrail gets at most (200 votes an arm); then retired as inconclusive
    guardrail_every: int = 20  # requests between two looks of the guardrail
    guardrail_min_votes: int = 150  # votes each arm needs before the guardrail decides (GuardrailConfig.min_votes)
    nightly_eval_prompts: int = 32  # seen prompts the nightly job compares a candidate and its parent on
    # Every other method trained from cycle 1's snapshot beside the nightly one (the report's per-method rows)
    other_methods: bool = True
    other_method_steps: int = 0  # their optimizer steps; 0 = each method's default
    # Evaluation, on seen and unseen prompts with fixed seeds (world eval's), per category
    eval_prompts: int = 48  # prompts of each split (a seeded sample; unseen has 137, seen 418)
    eval_per_prompt: int = 4  # images of a prompt for the generator alone (pass rate, fidelity, diversity)
    served_per_prompt: int = 16  # candidates of a prompt for best-k-of-n (the first eval_per_prompt are the same)
    served_k: int = 4  # the best k of them by a reward

    def __post_init__(self):
        checks = [
            ("users", self.users >= 1, ">= 1"), ("clients", 1 <= self.clients <= self.users, "in 1..users"),
            ("n", 1 <= self.n <= 64, "in 1..64"), ("k", 1 <= self.k <= self.n, "in 1..n"),
            ("steps", 1 <= self.steps <= 150, "in 1..150"), ("vote_rate", 0 < self.vote_rate <= 1, "in (0, 1]"),
            ("flip", 0 <= self.flip <= 0.5, "in [0, 0.5]"), ("cycles", self.cycles >= 1, ">= 1"),
            ("requests_per_cycle", self.requests_per_cycle >= 1, ">= 1"),
            ("method", self.method in METHOD_CONFIGS, f"one of {', '.join(METHOD_CONFIGS)}"),
            ("method_steps", self.method_steps >= 0, ">= 0"),
            ("canary_share", 0 < self.canary_share < 1, "in (0, 1)"),
            ("canary_requests", self.canary_requests >= 1, ">= 1"),
            ("guardrail_every", self.guardrail_every >= 1, ">= 1"),
            ("guardrail_min_votes", self.guardrail_min_votes >= 1, ">= 1"),
            ("nightly_eval_prompts", self.nightly_eval_prompts >= 1, ">= 1"),
            ("other_method_steps", self.other_method_steps >= 0, ">= 0"),
            ("eval_prompts", self.eval_prompts >= 1, ">= 1"),
            ("eval_per_prompt", self.eval_per_prompt >= 2, ">= 2 (diversity needs two images a prompt)"),
            ("served_per_prompt", self.served_per_prompt >= self.eval_per_prompt, ">= eval_per_prompt"),
            ("served_k", 1 <= self.served_k <= self.served_per_prompt, "in 1..served_per_prompt"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# `alignloop experiment --quick`: every stage of the loop in a few minutes on 2 cores (a smoke test: its figures
# show the code path, not the effect).
QUICK_EXPERIMENT = dict(users=16, clients=2, n=8, k=4, requests_per_cycle=16, method_steps=3, canary_requests=16,
                        guardrail_every=8, guardrail_min_votes=24, nightly_eval_prompts=2, other_method_steps=3,
                        eval_prompts=12, eval_per_prompt=2, served_per_prompt=8, served_k=2)
