"""Typed training configs of alignloop.trainer; each is saved with what it trains (head metadata, manifest).

Kept free of heavy imports: the CLI builds its flags from these fields at start-up.
"""

import dataclasses


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
    held_out_fraction: float = 0.1  # share of prompts (by hash of the prompt text) held out for the gate, [0, 1)

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
