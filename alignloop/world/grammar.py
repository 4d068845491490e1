"""The shapes world's prompt grammar, in Lee et al.'s categories (count, color, background, combination).

A prompt is a structured `Prompt` with a canonical English text; `parse_prompt` maps text back, so the
oracle can judge any prompt that a user typed in the world's grammar.
"""

import dataclasses
import functools
import itertools
import random
import re
from typing import Optional

# Counts up to six, as in Lee et al.'s prompts ("Five dogs."): five and six are where counting gets hard.
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("black", "white", "gray", "brown")
CATEGORIES = ("count", "color", "background", "combination")

# Combinations held out of the feedback loop's training data (votes used to train the reward model, prompts
# fine-tuned on), to measure generalization to unseen prompts as Lee et al. did with unseen objects. As in
# their footnote 1, "unseen" is with respect to the feedback only: the bundled base generator and CLIP are
# pretrained on every combination, as SD 1.5 and CLIP had seen tigers. Every single word stays seen; only
# these pairings are new to the loop. A prompt is unseen if any pair it names is held out.
HELD_OUT_COLOR_SHAPE = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
HELD_OUT_SHAPE_BACKGROUND = frozenset({("square", "white")})
HELD_OUT_COUNT_SHAPE = frozenset({(3, "circle")})


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A world prompt. `color` / `background` are None when the prompt leaves them open."""

    category: str
    count: int
    shape: str
    color: Optional[str] = None
    background: Optional[str] = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be in 1..{max(COUNT_WORDS)}, got {self.count!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        needs_color = self.category in ("color", "combination")
        needs_background = self.category in ("background", "combination")
        if (self.color is not None) != needs_color or (self.background is not None) != needs_background:
            raise ValueError(f"a {self.category} prompt names {'a' if needs_color else 'no'} color and "
                             f"{'a' if needs_background else 'no'} background: {self}")
        if self.category in ("color", "background") and self.count != 1:
            raise ValueError(f"{self.category} prompts are about one object, got count={self.count}")

    @property
    def text(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        if self.category == "count":
            return f"{COUNT_WORDS[self.count]} {noun}"
        if self.category == "color":
            return f"{'an' if self.color[0] in 'aeiou' else 'a'} {self.color} {noun}"
        if self.category == "background":
            return f"a {noun} on a {self.background} background"
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} on a {self.background} background"

    def pairs(self):
        """The attribute pairings this prompt names (what the held-out split is made of)."""
        out = [("count_shape", (self.count, self.shape))]
        if self.color is not None:
            out.append(("color_shape", (self.color, self.shape)))
        if self.background is not None:
            out.append(("shape_background", (self.shape, self.background)))
        return out

    @property
    def unseen(self) -> bool:
        held = {"count_shape": HELD_OUT_COUNT_SHAPE, "color_shape": HELD_OUT_COLOR_SHAPE,
                "shape_background": HELD_OUT_SHAPE_BACKGROUND}
        return any(pair in held[kind] for kind, pair in self.pairs())


@functools.lru_cache(maxsize=None)
def all_prompts() -> tuple:
    """Every prompt of the grammar, in a fixed order."""
    out = [Prompt("count", n, s) for n in COUNT_WORDS for s in SHAPES]
    out += [Prompt("color", 1, s, color=c) for c in COLORS for s in SHAPES]
    out += [Prompt("background", 1, s, background=b) for b in BACKGROUNDS for s in SHAPES]
    out += [Prompt("combination", n, s, color=c, background=b)
            for n, c, s, b in itertools.product(COUNT_WORDS, COLORS, SHAPES, BACKGROUNDS)]
    return tuple(out)


def split(name: str) -> tuple:
    """The prompts of a split: 'seen' (trainable), 'unseen' (held out), or 'all'."""
    if name == "all":
        return all_prompts()
    if name not in ("seen", "unseen"):
        raise ValueError(f"split must be 'seen', 'unseen' or 'all', got {name!r}")
    return tuple(p for p in all_prompts() if p.unseen == (name == "unseen"))


_WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()}
_NOUN = rf"(?P<shape>{'|'.join(SHAPES)})s?"
_COUNT = rf"(?P<count>{'|'.join(COUNT_WORDS.values())})"
_PATTERNS = {
    "combination": re.compile(rf"^{_COUNT} (?P<color>\w+) {_NOUN} on an? (?P<background>\w+) background$"),
    "background": re.compile(rf"^an? {_NOUN} on an? (?P<background>\w+) background$"),
    "color": re.compile(rf"^an? (?P<color>\w+) {_NOUN}$"),
    "count": re.compile(rf"^{_COUNT} {_NOUN}$"),
}


def normalize_text(text: str) -> str:
    """Lowercased, a trailing period dropped, whitespace collapsed: how the grammar reads a typed prompt."""
    return " ".join(text.lower().strip().rstrip(".").split())


def parse_prompt(text: str) -> Optional[Prompt]:
    """The structured prompt for a text in the world's grammar, or None if it is not one."""
    normalized = normalize_text(text)
    for category, pattern in _PATTERNS.items():
        match = pattern.match(normalized)
        if not match:
            continue
        fields = match.groupdict()
        try:
            return Prompt(category, _WORD_COUNTS.get(fields.get("count") or "one", 0), fields["shape"],
                          color=fields.get("color"), background=fields.get("background"))
        except ValueError:
            return None
    return None


def sample_prompts(rng: random.Random, n: int, split_name: str = "seen") -> list:
    """n prompts with the categories equally likely (as Lee et al. balanced theirs), uniform within one."""
    pool = split(split_name)
    by_category = {c: [p for p in pool if p.category == c] for c in CATEGORIES}
    categories = [c for c in CATEGORIES if by_category[c]]
    return [rng.choice(by_category[rng.choice(categories)]) for _ in range(n)]


def perturb(prompt: Prompt, n: int, rng: random.Random, seen_only: bool = False) -> list:
    """n prompts that contradict `prompt` (Lee et al. Algorithm 2), for the reward model's auxiliary loss.

    Unlike the paper's version, which fills one fixed template, each perturbation keeps the original's
    category and changes at least one attribute it names: a perturbed prompt that only adds detail
    ("two circles" -> "two red circles on a gray background") could be true of the same image.
    Distinct perturbations are drawn while there are enough of them; the original is never returned.
    With `seen_only`, none names a held-out pair: the feedback loop's training data never does, negatives included.
    """
    counts = list(COUNT_WORDS) if prompt.category in ("count", "combination") else [1]
    colors = list(COLORS) if prompt.color is not None else [None]
    backgrounds = list(BACKGROUNDS) if prompt.background is not None else [None]
    alternatives = [Prompt(prompt.category, c, s, color=col, background=b)
                    for c, s, col, b in itertools.product(counts, SHAPES, colors, backgrounds)]
    alternatives = [p for p in alternatives if p != prompt and not (seen_only and p.unseen)]
    if not alternatives:  # not in this grammar; a clear error should it ever change so
        raise ValueError(f"no prompt of the world contradicts {prompt.text!r} (seen_only={seen_only})")
    if n <= len(alternatives):
        return rng.sample(alternatives, n)
    return [rng.choice(alternatives) for _ in range(n)]
