"""Reward-model training from the vote stream (Lee et al. 2023 §3.2 and App. D-E; the student report's eq. 4).

    alignloop train reward --snapshot DIR [--out DIR] [--registry URL] [--no-publish]

    1. Read      a snapshot's votes.parquet and images/<image_id>.png (alignloop.feedback.snapshot's layout)
    2. Clean     vote hygiene: votes on prompts naming held-out pairs dropped (`drop_held_out_pair_votes`),
                 the latest vote per (image, user), anonymous votes once per image, each user's share of the
                 training votes capped, and of the held-out ones (`clean_votes`)
    3. Embed     frozen CLIP image embeddings, computed once and cached per image id; text embeddings of
                 every prompt and of its rule-perturbed alternatives (none naming a held-out pair)
    4. Split     a held-out part chosen by the hash of the normalized prompt (`prompt_key`), for the gate
    5. Train     the head on
                     MSE(sigmoid(logit), vote)                                      Lee et al.
                   + λ · CE(softmax(logits of [true prompt, N-1 perturbed] / T), 0)  Lee et al. eq. 1
                   + w · -log σ(logit_up - logit_down), same prompt                  student report eq. 4
    6. Gate      held-out preference accuracy of the new head against the live one's (the CLIP score's
                 when no head is live): `live` if not worse, else `candidate` with the reason
    7. Publish   head.safetensors + metrics.jsonl + a manifest to the registry

`train_reward_from_arrays` runs steps 2-5 in-process from arrays (images, prompts, labels, user hashes),
for the benchmark and for tests: no Kafka, no snapshot.
"""

import dataclasses
import hashlib
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from alignloop.errors import UserFacingError
from alignloop.rewards.head import RewardHead, load_head, save_head
from alignloop.trainer.config import RewardTrainConfig
from alignloop.world.grammar import normalize_text, parse_prompt, perturb

POOL = 256  # perturbed prompts drawn once per distinct prompt; each step samples N-1 of them
EMBED_BATCH = 256  # images or texts per CLIP forward pass
REWARD_KIND = "reward"  # the registry kind


# -------------------------------------------------------------------------------------------------
# 2. Vote hygiene
# -------------------------------------------------------------------------------------------------

def user_cap(counts: Sequence[int], anonymous: int, max_share: float, floor: int = 0) -> int:
    """The most votes one identified user may keep: the largest c with c <= max_share * (anonymous +
    sum_u min(n_u, c)), i.e. no user holds more than `max_share` of the votes that remain after capping;
    but never below `floor`, so that a small dataset (fewer votes than floor / max_share) is not thinned
    for want of other users."""
    if not counts:
        return 0
    cap = max(counts)
    while cap > floor:  # c -> floor(s * total(c)) decreases to the largest fixed point
        allowed = math.floor(max_share * (anonymous + sum(min(n, cap) for n in counts)) + 1e-9)
        if allowed >= cap:
            return cap
        cap = max(allowed, floor)
    return cap


def _hash_order(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prompt_key(prompt: str) -> str:
    """The prompt as the world reads it: its canonical text when it parses, else normalized as the grammar reads
    text. Variants of one prompt ("Three red  circles", "three red circles.") share a key, so they fall on one side
    of the held-out split and pair in its accuracy."""
    parsed = parse_prompt(prompt)
    return parsed.text if parsed is not None else normalize_text(prompt)


def drop_held_out_pair_votes(rows: Sequence[dict]) -> tuple:
    """(rows, how many were dropped): the vote rows without those whose prompt names a held-out pair of the world
    (alignloop.world.grammar: held-out pairs never enter the loop's training data). Prompts outside the world
    are kept. Dropped, not refused: snapshots are cumulative, so one such vote would otherwise fail every later
    run. Shared by the reward trainer and the fine-tuning job."""
    kept = [r for r in rows if not getattr(parse_prompt(r.get("prompt") or ""), "unseen", False)]
    return kept, len(rows) - len(kept)


def _cap_users(rows: Sequence[dict], max_share: float, floor: int) -> tuple:
    """(kept rows, {user: votes dropped}, cap): step 3 of clean_votes on one part of the votes."""
    anonymous = [r for r in rows if not r.get("user_hash")]
    by_user = defaultdict(list)
    for row in rows:
        if row.get("user_hash"):
            by_user[row["user_hash"]].append(row)
    cap = user_cap([len(v) for v in by_user.values()], len(anonymous), max_share, floor)
    kept, capped = list(anonymous), {}
    for user, votes in by_user.items():
        votes = sorted(votes, key=lambda r: _hash_order(str(r["image_id"])))
        kept += votes[:cap]
        if len(votes) > cap:
            capped[user] = len(votes) - cap
    return kept, capped, cap


def clean_votes(rows: Sequence[dict], max_user_share: float = 0.05, min_user_votes: int = 50,
                held_out_fraction: float = 0.0) -> tuple:
    """The votes that count, and a report of what was dropped. Pure: `rows` are dicts with image_id,
    user_hash (None or "" for anonymous), label, ts (anything orderable), optionally event_id, and prompt
    (needed when held_out_fraction > 0).

    1. The latest vote per (image, user) counts: a user who changes their mind is counted once, as they
       voted last (ties in ts broken by event_id).
    2. Anonymous votes count once per image (the latest): without a user there is no telling people apart.
    3. No identified user keeps more than `max_user_share` of the training votes, nor fewer than
       `min_user_votes` of theirs (`user_cap`; anonymous votes are not capped, step 2 already bounds them).
       The training votes are those fit() trains on: the rows whose prompt `held_out_mask(.., held_out_fraction)`
       does not hold out. The held-out rows are capped separately, by the same rule on their own total, so
       that one user can steer neither the head nor the gate that measures it. A user's excess is dropped
       deterministically: they keep the votes whose image ids hash lowest, so the same data always gives the
       same training set.
    Returns (kept rows in (ts, event_id) order, report dict; user_cap is the training votes' cap).
    """
    # 1-2. Latest vote per (image, user), anonymous ones sharing one key per image
    order = sorted(rows, key=lambda r: (r["ts"], r.get("event_id") or ""))
    latest = {}
    for row in order:
        latest[(row["image_id"], row.get("user_hash") or None)] = row
    latest_rows = list(latest.values())

    # 3. Cap each user's share of the training votes, and of the held-out ones, after fit()'s split
    held = held_out_mask([r.get("prompt") or "" for r in latest_rows], held_out_fraction)
    train_kept, train_capped, cap = _cap_users([r for r, h in zip(latest_rows, held) if not h], max_user_share,
                                               min_user_votes)
    held_kept, held_capped, held_cap = _cap_users([r for r, h in zip(latest_rows, held) if h], max_user_share,
                                                  min_user_votes)
    kept = sorted(train_kept + held_kept, key=lambda r: (r["ts"], r.get("event_id") or ""))

    anonymous_in = sum(1 for r in rows if not r.get("user_hash"))
    anonymous = sum(1 for r in latest_rows if not r.get("user_hash"))
    report = {
        "votes_in": len(rows),
        "superseded": len(rows) - anonymous_in - (len(latest_rows) - anonymous),
        "anonymous_repeats": anonymous_in - anonymous,
        "users": len({r["user_hash"] for r in latest_rows if r.get("user_hash")}),
        "user_cap": cap,
        "held_out_user_cap": held_cap,
        "capped_votes": sum(train_capped.values()) + sum(held_capped.values()),
        "capped_users": len(set(train_capped) | set(held_capped)),
        "votes": len(kept),
    }
    return kept, report


# -------------------------------------------------------------------------------------------------
# 3. Embeddings and training examples
# -------------------------------------------------------------------------------------------------

def embed_images(clip, images_for: Callable[[list], object], image_ids: Sequence[str],
                 cache_dir: Optional[Path] = None, progress: bool = False) -> np.ndarray:
    """Frozen CLIP image embeddings [M, D] float32 of the images with `image_ids`, computed with the
    serving scorer's preprocessing. `images_for(ids)` returns those images (any form the rewards take).
    With `cache_dir`, each embedding is kept as <cache_dir>/<sha256(id)[:2]>/<sha256(id)>.npy and reused
    (the caller puts the CLIP's hash in the folder name: a cached embedding is only valid for its CLIP)."""
    from alignloop.rewards.scorer import RewardScorer

    scorer = RewardScorer(clip, head=None, backend="torch")
    out = np.zeros((len(image_ids), clip.embed_dim), np.float32)
    paths = [None] * len(image_ids)
    missing = list(range(len(image_ids)))
    if cache_dir is not None:
        missing = []
        for i, image_id in enumerate(image_ids):
            key = hashlib.sha256(str(image_id).encode()).hexdigest()
            paths[i] = Path(cache_dir) / key[:2] / f"{key}.npy"
            try:
                out[i] = np.load(paths[i])
            except (OSError, ValueError, EOFError):  # absent, or a write a crash cut short (an empty file: EOFError)
                missing.append(i)
    for start in tqdm(range(0, len(missing), EMBED_BATCH), desc="embed images", disable=not progress):
        chunk = missing[start:start + EMBED_BATCH]
        embeddings = scorer.image_embeddings(images_for([image_ids[i] for i in chunk])).float().cpu().numpy()
        for i, embedding in zip(chunk, embeddings):
            out[i] = embedding
            if paths[i] is not None:
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[i].with_suffix(f".tmp{time.monotonic_ns()}.npy")
                np.save(tmp, embedding)
                tmp.replace(paths[i])  # atomic: a reader sees the whole embedding or none
    return out


@torch.no_grad()
def embed_texts(clip, texts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings [T, D] float32 on CPU (what RewardScorer.text_embedding computes, batched)."""
    rows = [clip.encode_texts(list(texts[i:i + EMBED_BATCH])).float().cpu() for i in range(0, len(texts), EMBED_BATCH)]
    return torch.cat(rows) if rows else torch.zeros(0, clip.embed_dim)


@dataclasses.dataclass
class Examples:
    """Training (or evaluation) rows on frozen embeddings. Text row p (< len(prompts)) is prompts[p]'s;
    the rows after them are the perturbed prompts the classification term draws from."""

    image: torch.Tensor  # [M, D] float32 CLIP image embeddings
    label: torch.Tensor  # [M] float32, 1 = up
    prompt_id: torch.Tensor  # [M] int64 index into prompts (and into text)
    prompts: list  # U distinct prompt texts
    text: torch.Tensor  # [T, D] float32 text embeddings, T >= U
    pool: torch.Tensor  # [U, POOL] int64 rows of `text`: perturbations of each prompt (padded with 0)
    pool_len: torch.Tensor  # [U] int64; 0 where the perturber cannot parse the prompt

    @property
    def unparseable(self) -> int:
        """Rows whose prompt the rule-based perturber cannot parse: they skip the classification term."""
        return int((self.pool_len[self.prompt_id] == 0).sum())


def build_examples(image_emb: np.ndarray, prompts: Sequence[str], labels, encode_texts: Callable,
                   seed: int = 0) -> Examples:
    """Examples from image embeddings [M, D], their prompts and labels; `encode_texts(list) -> [T, D]`."""
    rng = random.Random(seed)
    distinct = list(dict.fromkeys(prompts))
    texts = {p: i for i, p in enumerate(distinct)}
    pools = []
    for prompt in distinct:
        parsed = parse_prompt(prompt)
        # seen_only: a held-out pair is never a negative either (it would teach the head its text)
        alternatives = [] if parsed is None else \
            list(dict.fromkeys(q.text for q in perturb(parsed, POOL, rng, seen_only=True)))
        pools.append([texts.setdefault(text, len(texts)) for text in alternatives])
    pool = torch.zeros(len(distinct), POOL, dtype=torch.int64)
    for i, rows in enumerate(pools):
        pool[i, :len(rows)] = torch.tensor(rows, dtype=torch.int64)
    index = {p: i for i, p in enumerate(distinct)}
    return Examples(
        image=torch.as_tensor(np.asarray(image_emb, np.float32)),
        label=torch.as_tensor(np.asarray(labels, np.float32)),
        prompt_id=torch.tensor([index[p] for p in prompts], dtype=torch.int64),
        prompts=distinct,
        text=torch.as_tensor(encode_texts(list(texts))).float().cpu(),
        pool=pool,
        pool_len=torch.tensor([len(rows) for rows in pools], dtype=torch.int64),
    )


class PairSampler:
    """Draws (up, down) row pairs of the same prompt: only prompts with both an up- and a down-vote have any."""

    def __init__(self, prompt_id: torch.Tensor, label: torch.Tensor):
        up, down = label > 0.5, label <= 0.5
        downs = torch.nonzero(down).squeeze(1)
        self.downs = downs[torch.argsort(prompt_id[downs], stable=True)]  # down rows grouped by prompt
        groups = int(prompt_id.max()) + 1 if prompt_id.numel() else 0
        self.count = torch.bincount(prompt_id[down], minlength=groups)  # [U] down-votes per prompt
        self.start = torch.cumsum(self.count, 0) - self.count  # [U] first of each prompt's downs
        ups = torch.nonzero(up).squeeze(1)
        self.ups = ups[self.count[prompt_id[ups]] > 0] if groups else ups  # up rows that have a partner
        self.prompt_id = prompt_id
        ups_per_prompt = torch.bincount(prompt_id[up], minlength=groups)
        self.pairs = int((ups_per_prompt * self.count).sum())  # every (up, down) combination

    def sample(self, size: int, generator: torch.Generator) -> tuple:
        if self.ups.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        ups = self.ups[torch.randint(len(self.ups), (size,), generator=generator)]
        g = self.prompt_id[ups]
        offset = (torch.rand(size, generator=generator) * self.count[g]).long()
        return ups, self.downs[self.start[g] + offset]


def loss_terms(head: RewardHead, ex: Examples, rows: torch.Tensor, negatives: torch.Tensor,
               ups: torch.Tensor, downs: torch.Tensor, config: RewardTrainConfig) -> dict:
    """The three loss terms on one step's rows [b], negatives [b, N-1] (text rows) and pairs [p], [p]."""
    zero = torch.zeros(())
    logits = head.logits(ex.image[rows], ex.text[ex.prompt_id[rows]])  # [b]
    # MSE on the vote, through the sigmoid (Lee et al.)
    mse = F.mse_loss(torch.sigmoid(logits), ex.label[rows])
    # Prompt classification: the true prompt (class 0) among N at temperature T, for parseable prompts
    classify = ex.pool_len[ex.prompt_id[rows]] > 0  # [b]
    if not config.classify_downvoted:
        classify &= ex.label[rows] > 0.5
    classification = zero
    if config.classification_weight > 0 and classify.any():
        c, n_neg = int(classify.sum()), negatives.shape[1]
        image = ex.image[rows][classify].repeat_interleave(n_neg, 0)  # [c * (N-1), D]
        negative_logits = head.logits(image, ex.text[negatives[classify].reshape(-1)]).view(c, n_neg)
        candidates = torch.cat([logits[classify, None], negative_logits], 1)  # [c, N], true prompt first
        classification = F.cross_entropy(candidates / config.temperature, torch.zeros(c, dtype=torch.int64))
    # Pairwise Bradley-Terry on logits (student report eq. 4), same prompt, up over down
    pairwise = zero
    if config.pairwise_weight > 0 and ups.numel():
        margin = head.logits(ex.image[ups], ex.text[ex.prompt_id[ups]]) \
            - head.logits(ex.image[downs], ex.text[ex.prompt_id[downs]])  # [p]
        pairwise = -F.logsigmoid(margin).mean()
    total = mse + config.classification_weight * classification + config.pairwise_weight * pairwise
    return {"loss": total, "mse": mse, "classification": classification, "pairwise": pairwise,
            "classified": int(classify.sum()) if config.classification_weight > 0 else 0,
            "pairs": int(ups.numel()) if config.pairwise_weight > 0 else 0}


def sample_negatives(ex: Examples, rows: torch.Tensor, n_neg: int, generator: torch.Generator) -> torch.Tensor:
    """[b, n_neg] text rows: perturbations of each row's prompt, drawn with replacement from its pool
    (as Lee et al.'s Algorithm 2 draws). Rows without a pool get row 0, which loss_terms never reads."""
    pool_id = ex.prompt_id[rows]
    picks = (torch.rand(len(rows), n_neg, generator=generator) * ex.pool_len[pool_id, None]).long()
    return ex.pool[pool_id[:, None], picks]


# -------------------------------------------------------------------------------------------------
# 5. Training
# -------------------------------------------------------------------------------------------------

def train_head(ex: Examples, config: RewardTrainConfig, metrics_path: Optional[Path] = None,
               progress: bool = True, desc: str = "reward head", head: Optional[RewardHead] = None) -> RewardHead:
    """Trains a head on `ex`: a fresh one of config.hidden, initialized from config.seed, or `head` itself from
    where it stands (its initialization is the caller's); one JSON line per step to `metrics_path` when given."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head = (head if head is not None else RewardHead(ex.image.shape[1], config.hidden)).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay)
    pairs = PairSampler(ex.prompt_id, ex.label)
    n_rows, n_neg = ex.image.shape[0], config.prompts_per_image - 1
    steps_per_epoch = math.ceil(n_rows / config.batch_size)
    # Invariants, before step 0
    assert n_rows > 0 and ex.label.shape == (n_rows,) and ex.prompt_id.shape == (n_rows,)
    assert ex.text.shape[1] == ex.image.shape[1] and ex.pool.shape == (len(ex.prompts), POOL)
    if progress:
        tqdm.write(f"{desc}: {n_rows} votes, {config.epochs} epochs of {steps_per_epoch} steps of {config.batch_size}, "
                   f"{pairs.pairs} same-prompt (up, down) pairs, {ex.unparseable} votes without prompt classification")
    metrics_file = open(metrics_path, "w") if metrics_path else None
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=desc, disable=not progress)
    step = 0
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(n_rows, generator=generator)
            for start in range(0, n_rows, config.batch_size):
                #### SAMPLE ####
                rows = order[start:start + config.batch_size]  # [b]
                negatives = sample_negatives(ex, rows, n_neg, generator)  # [b, N-1]
                ups, downs = pairs.sample(len(rows), generator)  # [b], [b] (empty without pairs)

                #### UPDATE ####
                terms = loss_terms(head, ex, rows, negatives, ups, downs, config)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()

                #### LOG ####
                # .item() waits for the step to finish: once a step, for the log
                losses = {k: round(v.item(), 6) for k, v in terms.items() if isinstance(v, torch.Tensor)}
                record = {"step": step, "epoch": epoch, "rows": len(rows), **losses,
                          "classified": terms["classified"], "pairs": terms["pairs"], "lr": config.lr}
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                step += 1
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return head.eval()


# -------------------------------------------------------------------------------------------------
# 4 and 6. Held-out split, preference accuracy, gate
# -------------------------------------------------------------------------------------------------

def held_out_mask(prompts: Sequence[str], fraction: float) -> np.ndarray:
    """[M] bool: the rows whose prompt is held out. A prompt is held out when the first 8 bytes of
    sha256(prompt_key(prompt)) read as a fraction of 2**64 fall below `fraction`: deterministic, the same
    prompt always on the same side, whatever else the snapshot holds. The key, not the raw text: variants of
    one prompt (case, spaces, a trailing period) on both sides would leak the held-out prompts into training."""
    def side(prompt: str) -> bool:
        return int.from_bytes(hashlib.sha256(prompt_key(prompt).encode()).digest()[:8], "big") / 2**64 < fraction

    sides = {p: side(p) for p in set(prompts)}
    return np.array([sides[p] for p in prompts], dtype=bool)


def preference_accuracy(scores, groups, labels) -> tuple:
    """(accuracy, pairs) over every pair of a positive (label 1) and a negative (label 0) row of the same
    group: the share of pairs the scores rank the right way round, a tie counting half (so a constant
    reward scores 0.5). accuracy is None when there is no pair."""
    scores = np.asarray(scores, np.float64)
    groups, labels = np.asarray(groups), np.asarray(labels)
    wins, pairs = 0.0, 0
    for group in np.unique(groups):
        in_group = groups == group
        up, down = scores[in_group & (labels > 0.5)], scores[in_group & (labels <= 0.5)]
        if len(up) and len(down):
            wins += float((up[:, None] > down[None, :]).sum()) + 0.5 * float((up[:, None] == down[None, :]).sum())
            pairs += len(up) * len(down)
    return (wins / pairs if pairs else None), pairs


def prompt_groups(ex: Examples) -> np.ndarray:
    """[M] each row's prompt_key: the groups of the held-out preference accuracy, so that an up- and a down-vote
    on two variants of one prompt make a pair, as they are one prompt to the split."""
    return np.array([prompt_key(p) for p in ex.prompts], dtype=object)[ex.prompt_id.numpy()]


def gate(new_accuracy: Optional[float], baseline_accuracy: Optional[float], baseline: str, pairs: int) -> tuple:
    """(state, reason): `live` if the new head's held-out preference accuracy is not worse than the
    baseline's (the live head's, or the CLIP score's when none is live), else `candidate`."""
    if not pairs or new_accuracy is None or baseline_accuracy is None:
        return "candidate", ("no held-out pair (an up- and a down-voted image of one held-out prompt) to compare "
                             f"the new head with {baseline} on; promote it by hand after checking it")
    if new_accuracy >= baseline_accuracy:
        return "live", (f"held-out preference accuracy {new_accuracy:.4f} >= {baseline}'s {baseline_accuracy:.4f} "
                        f"on {pairs} pairs")
    return "candidate", (f"held-out preference accuracy {new_accuracy:.4f} < {baseline}'s {baseline_accuracy:.4f} "
                         f"on {pairs} pairs: kept as candidate")


# -------------------------------------------------------------------------------------------------
# In-process entry point: arrays in, trained head out (steps 2-5)
# -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainedReward:
    head: RewardHead
    config: RewardTrainConfig
    hygiene: dict  # clean_votes' report
    counts: dict  # votes trained on / held out, pairs, rows without classification
    held_out: Optional[Examples]  # None when held_out_fraction is 0 or no prompt fell on that side
    metrics: dict  # held-out preference accuracy of the new head and of the CLIP score


def fit(image_emb: np.ndarray, prompts: Sequence[str], labels, clip, config: RewardTrainConfig,
        hygiene: dict, metrics_path: Optional[Path] = None, progress: bool = True,
        desc: str = "reward head") -> TrainedReward:
    """Steps 4-5 on clean votes: split by prompt hash, train on the rest, measure the held-out part.
    Raises UserFacingError when the training rows are all up- or all down-votes (the held-out part may hold
    every vote of the other kind)."""
    from alignloop.kernels.onnx_scorer import clip_score

    prompts, labels = list(prompts), np.asarray(labels, np.float32)
    held = held_out_mask(prompts, config.held_out_fraction)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    if len(train_rows) == 0:
        raise UserFacingError(f"every prompt fell in the held-out part (held_out_fraction "
                              f"{config.held_out_fraction}): lower it, or add votes on more prompts")
    check_both_labels(labels[train_rows].tolist(), " on training prompts (the others are held out for the gate)")
    encode = lambda texts: embed_texts(clip, texts)  # noqa: E731
    train = build_examples(image_emb[train_rows], [prompts[i] for i in train_rows], labels[train_rows], encode,
                           config.seed)
    head = train_head(train, config, metrics_path, progress, desc)
    counts = {"train_votes": len(train_rows), "train_prompts": len(train.prompts),
              "train_pairs": PairSampler(train.prompt_id, train.label).pairs,
              "unparseable_votes": train.unparseable, "held_out_votes": len(held_rows)}
    metrics, held_out = {}, None
    if len(held_rows):
        held_out = build_examples(image_emb[held_rows], [prompts[i] for i in held_rows], labels[held_rows], encode,
                                  config.seed)
        with torch.no_grad():
            new = head(held_out.image, held_out.text[held_out.prompt_id])
            clip_scores = clip_score(held_out.image, held_out.text[held_out.prompt_id])
        groups = prompt_groups(held_out)
        metrics["held_out_accuracy"], pairs = preference_accuracy(new, groups, held_out.label)
        metrics["clip_score_accuracy"], _ = preference_accuracy(clip_scores, groups, held_out.label)
        counts.update(held_out_prompts=len(set(groups)), held_out_pairs=pairs)
    return TrainedReward(head, config, hygiene, counts, held_out, metrics)


def train_reward_from_arrays(images, prompts: Sequence[str], labels, users: Optional[Sequence] = None, clip=None,
                             config: Optional[RewardTrainConfig] = None, metrics_path: Optional[Path] = None,
                             progress: bool = False, desc: str = "reward head") -> TrainedReward:
    """Trains a head in-process: images (uint8 [B,H,W,3], float [B,3,H,W] or PIL list), their prompts,
    labels (1 up / 0 down) and optional user hashes (None: anonymous). Image i's id is str(i), so the
    hygiene rules see each row as a separate image. Embeddings are not cached."""
    from alignloop.models import load_clip
    from alignloop.rewards.images import check_images, select

    # 1. Check inputs
    count = check_images(images)
    labels = np.asarray(labels)
    users = list(users) if users is not None else [None] * count
    if not (len(prompts) == len(labels) == len(users) == count):
        raise ValueError(f"images, prompts, labels and users must have one entry per image: {count} images, "
                         f"{len(prompts)} prompts, {len(labels)} labels, {len(users)} users")
    config = config or RewardTrainConfig()
    clip = load_clip(clip or "shapes-clip-tiny", device="cpu") if clip is None or isinstance(clip, str) else clip
    # 2. Hygiene (the per-user cap on the rows fit() will train on: it splits by the same prompt hash)
    rows = [{"image_id": str(i), "user_hash": u, "label": int(y), "ts": i, "prompt": p}
            for i, (u, y, p) in enumerate(zip(users, labels, prompts))]
    rows, held_out_pair_votes = drop_held_out_pair_votes(rows)
    kept, hygiene = clean_votes(rows, config.max_user_share, config.min_user_votes, config.held_out_fraction)
    hygiene["held_out_pair_votes"] = held_out_pair_votes
    index = [int(r["image_id"]) for r in kept]
    check_both_labels([r["label"] for r in kept])
    # 3. Embeddings, then 4-5
    image_emb = embed_images(clip, lambda ids: select(images, [int(i) for i in ids]), [str(i) for i in index])
    return fit(image_emb, [prompts[i] for i in index], [int(labels[i]) for i in index], clip, config, hygiene,
               metrics_path, progress, desc)


def check_both_labels(labels: Sequence[int], where: str = "") -> None:
    """UserFacingError unless `labels` hold both up- and down-votes; `where` says which votes in the message."""
    ups = sum(1 for y in labels if y)
    if not labels:
        raise UserFacingError("no votes to train on (after vote hygiene): collect thumbs votes first")
    if ups == 0 or ups == len(labels):
        which = "up" if ups else "down"
        raise UserFacingError(f"all {len(labels)} votes{where} are {which}-votes: a reward model needs both up- and "
                              "down-votes to learn what separates them; collect more votes")


# -------------------------------------------------------------------------------------------------
# The command: snapshot in, head published (steps 1-7)
# -------------------------------------------------------------------------------------------------

def read_snapshot(folder: Path) -> tuple:
    """(vote rows, the version folder, its manifest) of a snapshot: a version folder holding votes.parquet,
    or a dataset folder, whose newest complete version is read."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    if not folder.is_dir():
        raise UserFacingError(f"--snapshot: {folder} is not a folder (expected a snapshot written by "
                              "`alignloop feedback snapshot --out DIR`, or one of its vNNNNNN versions)")
    if not (folder / "votes.parquet").is_file():
        versions = sorted(p for p in folder.glob("v[0-9]*") if (p / "manifest.json").is_file())
        if not versions:
            raise UserFacingError(f"--snapshot: {folder} holds no votes.parquet and no complete version "
                                  "(vNNNNNN/manifest.json)")
        folder = versions[-1]
        if not (folder / "votes.parquet").is_file():
            raise UserFacingError(f"--snapshot: {folder} has no votes.parquet")
    if not (folder / "images").is_dir():
        raise UserFacingError(f"--snapshot: {folder} has no images folder ({folder / 'images'}); the votes "
                              "cannot be trained on without their images")
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    rows = pq.read_table(folder / "votes.parquet").to_pylist()
    if not rows:
        raise UserFacingError(f"--snapshot: {folder} has no votes (votes.parquet is empty): collect thumbs "
                              "votes and cut a new snapshot first")
    return rows, folder, manifest


def _image_file(folder: Path, row: dict) -> Path:
    return folder / (row.get("image_path") or f"images/{row['image_id']}.png")


def train_reward(snapshot: Path, config: Optional[RewardTrainConfig] = None, out: Optional[Path] = None,
                 registry: Optional[str] = None, publish: bool = True, clip_spec: str = "shapes-clip-tiny",
                 clip_checkpoint: Optional[str] = None, progress: bool = True, log=print,
                 extra_data: Optional[dict] = None) -> dict:
    """The whole command; returns its report (what the CLI prints as JSON). Nothing is published on error.
    `extra_data` goes into the manifest's data (the nightly job names its run there)."""
    from PIL import Image

    from alignloop.models import ModelNotFoundError, load_clip
    from alignloop.rewards.scorer import clip_hash
    from alignloop.settings import home

    config = config or RewardTrainConfig()
    started = time.monotonic()

    # 1. Read the snapshot
    rows, folder, snapshot_manifest = read_snapshot(snapshot)
    present = [r for r in rows if _image_file(folder, r).is_file()]
    if not present:
        raise UserFacingError(f"--snapshot: none of the {len(rows)} voted images is in {folder / 'images'}")

    # 2. Vote hygiene (the per-user cap on the rows fit() will train on: it splits by the same prompt hash)
    voted, held_out_pair_votes = drop_held_out_pair_votes(present)
    kept, hygiene = clean_votes(voted, config.max_user_share, config.min_user_votes, config.held_out_fraction)
    hygiene.update(missing_images=len(rows) - len(present), held_out_pair_votes=held_out_pair_votes)
    check_both_labels([r["label"] for r in kept])
    log(f"votes: {len(rows)} read, {len(kept)} counted ({hygiene['superseded']} superseded, "
        f"{hygiene['anonymous_repeats']} repeated anonymous, {hygiene['capped_votes']} over the per-user caps of "
        f"{hygiene['user_cap']} training and {hygiene['held_out_user_cap']} held-out votes, "
        f"{hygiene['held_out_pair_votes']} dropped for naming held-out pairs, {hygiene['missing_images']} without "
        "an image)")

    # 3. Embeddings, cached per image id under the CLIP's hash
    try:
        clip = load_clip(clip_spec, checkpoint=clip_checkpoint)
    except ModelNotFoundError as err:
        raise UserFacingError(str(err)) from err
    fingerprint = clip_hash(clip)
    paths = {r["image_id"]: _image_file(folder, r) for r in kept}

    def images_for(ids):
        images = []
        for image_id in ids:
            with Image.open(paths[image_id]) as image:
                images.append(image.convert("RGB"))
        return images

    image_emb = embed_images(clip, images_for, [r["image_id"] for r in kept],
                             cache_dir=home() / "embeddings" / fingerprint, progress=progress)

    # 4-5. Split, train, measure
    out = Path(out) if out else home() / "train" / "reward" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    trained = fit(image_emb, [r["prompt"] for r in kept], [r["label"] for r in kept], clip, config, hygiene,
                  out / "metrics.jsonl", progress)
    log(f"trained on {trained.counts['train_votes']} votes of {trained.counts['train_prompts']} prompts "
        f"({trained.counts['train_pairs']} same-prompt pairs); {trained.counts['unparseable_votes']} votes have "
        "prompts the perturber cannot parse and skip prompt classification")

    # 6. Gate against the live head (the CLIP score when none is live)
    base = {"clip": clip.name, "clip_hash": fingerprint, "embed_dim": clip.embed_dim}
    parent, baseline, baseline_accuracy, blocked = live_baseline(registry, trained, base) if publish \
        else (None, "CLIP score", trained.metrics.get("clip_score_accuracy"), None)
    state, reason = gate(trained.metrics.get("held_out_accuracy"), baseline_accuracy, baseline,
                         trained.counts.get("held_out_pairs", 0))
    if blocked:
        state, reason = "candidate", blocked
    metrics = {"held_out_accuracy": trained.metrics.get("held_out_accuracy"),
               "baseline": baseline, "baseline_accuracy": baseline_accuracy,
               "clip_score_accuracy": trained.metrics.get("clip_score_accuracy"), **trained.counts}
    log(f"held-out preference accuracy on {metrics.get('held_out_pairs', 0)} pairs: "
        f"new {_fmt(metrics['held_out_accuracy'])}"
        + (f", {baseline} {_fmt(baseline_accuracy)}" if baseline != "CLIP score" else "")
        + f", CLIP score {_fmt(metrics['clip_score_accuracy'])}")

    # 7. Save, then publish
    head_path = save_head(trained.head, out / "head.safetensors",
                          metadata={"clip": clip.name, "clip_hash": fingerprint,
                                    "config": json.dumps(config.to_dict())})
    data = {"snapshot": str(folder), "snapshot_version": snapshot_manifest.get("version"),
            "offsets": snapshot_manifest.get("offsets", {}), "hygiene": hygiene, **(extra_data or {})}
    report = {"out": str(out), "state": state if publish else None, "reason": reason, "version": None,
              "base": base, "data": data, "config": config.to_dict(), "metrics": metrics,
              "seconds": round(time.monotonic() - started, 1)}
    if publish:
        from alignloop.registry import Registry

        manifest = Registry(url=registry).publish(
            kind=REWARD_KIND, files={"head.safetensors": head_path, "metrics.jsonl": out / "metrics.jsonl"},
            parent=parent, base=base, data=data, config=config.to_dict(), metrics=metrics, state=state,
            who="trainer", why=reason)
        report["version"] = manifest.version
        log(f"published reward {manifest.version} as {state}: {reason}")
    else:
        log(f"not published (--no-publish); the gate would say {state}: {reason}")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def live_baseline(registry: Optional[str], trained: TrainedReward, base: dict) -> tuple:
    """(parent version, baseline name, its held-out accuracy, reason that blocks promotion or None).
    The baseline is the registry's live reward head on the same held-out rows; the CLIP score when no
    head is live. A live head on another CLIP, or one that cannot be loaded, blocks automatic promotion."""
    from alignloop.registry import Registry, RegistryError

    store = Registry(url=registry)
    live = store.live(REWARD_KIND)
    clip_accuracy = trained.metrics.get("clip_score_accuracy")
    if live is None:
        return None, "CLIP score", clip_accuracy, None
    name = f"live {live.version}"
    if live.base.get("clip_hash") != base["clip_hash"]:
        return live.version, name, None, (f"the live reward model {live.version} was trained on another CLIP "
                                          f"({live.base.get('clip')!r}, hash {live.base.get('clip_hash')}): the two "
                                          "cannot be compared on these embeddings; kept as candidate")
    try:
        live_head = load_head(store.fetch(REWARD_KIND, live.version) / "head.safetensors")
    except (RegistryError, ValueError, FileNotFoundError) as err:
        return live.version, name, None, (f"the live reward model {live.version} cannot be loaded ({err}); "
                                          "kept as candidate")
    if trained.held_out is None:
        return live.version, name, None, None
    with torch.no_grad():
        scores = live_head(trained.held_out.image, trained.held_out.text[trained.held_out.prompt_id])
    accuracy, _ = preference_accuracy(scores, prompt_groups(trained.held_out), trained.held_out.label)
    return live.version, name, accuracy, None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
