"""The simulated rater: the oracle's verdict turned into a thumbs vote, with noise and bias.

People are noisy and lenient in different ways per kind of prompt (Lee et al. Table 2: counts were judged
harshly, colors kindly). `flip` is the chance any vote is flipped; `bias[category]` shifts the chance
of a thumbs-up for that category (positive: lenient, negative: harsh), applied after the flip.
"""

import dataclasses
import random
from typing import Optional

from alignloop.world.grammar import CATEGORIES, parse_prompt
from alignloop.world.oracle import judge


@dataclasses.dataclass
class SimulatedRater:
    flip: float = 0.05  # probability a vote is the opposite of the oracle's verdict
    bias: dict = dataclasses.field(default_factory=dict)  # category -> shift of P(up), in [-1, 1]
    seed: Optional[int] = None

    def __post_init__(self):
        if not 0.0 <= self.flip <= 0.5:
            raise ValueError(f"flip must be in [0, 0.5], got {self.flip}")
        unknown = set(self.bias) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"bias categories must be among {CATEGORIES}, got {sorted(unknown)}")
        self._rng = random.Random(self.seed)

    def p_up(self, passed: bool, category: str) -> float:
        base = 1.0 - self.flip if passed else self.flip
        return min(1.0, max(0.0, base + self.bias.get(category, 0.0)))

    def vote(self, image, prompt) -> str:
        """'up' or 'down' for one image."""
        prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        if prompt is None:
            raise ValueError("the simulated rater only judges prompts of the shapes world")
        return self.vote_on(judge(image, prompt).passed, prompt.category)

    def vote_on(self, passed: bool, category: str) -> str:
        """'up' or 'down' for an image the oracle already judged (`passed`): the same draw as vote()."""
        return "up" if self._rng.random() < self.p_up(passed, category) else "down"
