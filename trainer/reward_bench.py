"""`alignloop bench reward`: does the learned reward beat the CLIP score on prompts it never got votes on?

In the shapes world, with the bundled generator and CLIP, in one run:

    1. Votes      base-model samples of seen prompts, drawn as requests of 16 candidates (20 DDIM steps,
                  guidance 5, one seed per image), every one voted on by the simulated rater (flip 0.1), from
                  100 simulated users
    2. Train      three heads on those votes: the full loss, without prompt classification (λ = 0),
                  without the pairwise term; and, for selection bias, full-loss heads on the votes users would
                  have cast had they been shown only 4 of each 16: the CLIP score's top 4, or the top 3 and one
                  explored below them (serving's policy, with exploration probability 0.25 and 1)
    3. Evaluate   on unseen prompts (held out of the feedback loop), 16 seeded samples per prompt:
                  - preference accuracy over oracle-defined pairs (a passing and a failing image of one prompt)
                    for the CLIP score and the three heads
                  - the oracle pass rate of the best 4 of 16 picked by random choice (its expectation: the
                    prompt's pass rate), the CLIP score, the learned reward and the oracle itself (the ceiling)

    4. Probe      why a head learns so little beyond the CLIP score: the full-loss head on noise-free votes (the
                  oracle's verdicts of the same training images: no vote can teach more), a head trained on the unseen images' own
                  oracle verdicts (no noise), measured on those images (can the embeddings separate them at
                  all?) and trained on half of the unseen prompts, measured on the other half (does what it
                  learns carry over to other prompts?)
                  - a head that starts as the CLIP score (its MLP's output zero) trained on the votes for more and
                    more epochs: does what the votes add move it toward or away from the right ranking, on seen
                    prompts held out of its training and on unseen ones?
                  - the CLIP image tower itself tuned on the votes (prompt classification among rule-perturbed
                    prompts, count hard negatives included, + the pairwise term, on cosines): a better
                    representation instead of a head; and tuned on half the unseen prompts' oracle verdicts,
                    measured on the other half

Every reward is called through alignloop.rewards.get_reward, as serving and training call it.
"""

import random
import time
from collections import Counter

import numpy as np
import torch

QUICK = {"train_images": 256, "eval_prompts": 6, "epochs": 20}
FULL = {"train_images": 3000, "eval_prompts": None, "epochs": 40}  # None: every unseen prompt
# The head's hidden widths here: the bundled CLIP's embeddings are 64-d, twelve times narrower than the 768 of
# ViT-L-14 that Lee et al.'s 1024 were sized for; at 1,000 votes 256 measured as well as 1024 on unseen
# prompts and trains five times faster on a CPU. The other settings are RewardTrainConfig's defaults.
HIDDEN = (256, 256)
PER_PROMPT, BEST_K = 16, 4
USERS = 100  # simulated users the votes are spread over (each well under the 5% cap)


def _generate(pipe, prompts, seed: int, steps: int, guidance: float, progress: bool, desc: str) -> np.ndarray:
    """uint8 [len(prompts), H, W, 3]; image i's seed is image_seed(seed, prompt's index, its repeat number)."""
    from tqdm import tqdm

    from alignloop.world.evaluate import generate_images, image_seed
    from alignloop.world.grammar import all_prompts

    index = {p: i for i, p in enumerate(all_prompts())}
    repeats = Counter()
    seeds = []
    for prompt in prompts:
        seeds.append(image_seed(seed, index[prompt], repeats[prompt]))
        repeats[prompt] += 1
    chunks = []
    for start in tqdm(range(0, len(prompts), 32), desc=desc, disable=not progress):
        chunk = prompts[start:start + 32]
        chunks.append(generate_images(pipe, [p.text for p in chunk], seeds[start:start + 32], steps, guidance))
    return np.concatenate(chunks)


def best_k_pass_rate(scores: torch.Tensor, passes: torch.Tensor, n: int = PER_PROMPT, k: int = BEST_K) -> float:
    """Mean oracle pass rate of the k best of each group of n consecutive images, by `scores`."""
    from alignloop.kernels import grouped_topk

    _, indices = grouped_topk(scores.float(), n, k)  # [G, k], within each group
    return float(passes.view(-1, n).gather(1, indices).float().mean())


def generalization_probe(image_emb: torch.Tensor, text_emb: torch.Tensor, passes: np.ndarray, groups: np.ndarray,
                         seed: int, epochs: int = 200) -> dict:
    """Preference accuracy of heads fitted to the oracle's verdicts of these very images: in-sample, and on the
    prompts (groups) left out of fitting (even groups fit, odd groups measured)."""
    from alignloop.rewards import RewardHead
    from alignloop.trainer.reward_model import preference_accuracy

    def fit(rows):
        torch.manual_seed(seed)
        head = RewardHead(image_emb.shape[1], HIDDEN)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
        targets = torch.as_tensor(passes, dtype=torch.float32)
        for _ in range(epochs):
            for batch in torch.as_tensor(rows)[torch.randperm(len(rows))].split(128):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    head.logits(image_emb[batch], text_emb[batch]), targets[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return head.logits(image_emb, text_emb).numpy()

    every, left_out = np.arange(len(passes)), groups % 2 == 1
    in_sample, _ = preference_accuracy(fit(every), groups, passes)
    scores = fit(np.flatnonzero(~left_out))
    other_prompts, _ = preference_accuracy(scores[left_out], groups[left_out], passes[left_out])
    return {"means": "heads fitted to the unseen images' own oracle verdicts: measured on them (in_sample), and "
                     "fitted on half the unseen prompts, measured on the other half (other_prompts)",
            "in_sample": round(float(in_sample), 4), "other_prompts": round(float(other_prompts), 4)}


ANCHOR_SCALE = 100.0  # cosine -> logit in the anchored head: the CLIP score's sd on these prompts (~0.1) is 10 logits
ANCHOR_EPOCHS = (1, 3, 10, 40)


def anchored_head(embed_dim: int, hidden, mean_cosine: float):
    """A probe, not the served head: logit = s * cos(image, text) + MLP([image, text]), s learnable from
    ANCHOR_SCALE, the MLP's last layer zero but for its bias, -s * mean_cosine (so that the sigmoid starts
    unsaturated). Before any step it ranks every prompt's images exactly as the CLIP score does; training adds the
    votes' correction."""
    from alignloop.kernels.onnx_scorer import clip_score
    from alignloop.rewards import RewardHead

    class AnchoredHead(RewardHead):
        def __init__(self):
            super().__init__(embed_dim, hidden)
            self.scale = torch.nn.Parameter(torch.tensor(ANCHOR_SCALE))
            torch.nn.init.zeros_(self.mlp[-1].weight)
            torch.nn.init.constant_(self.mlp[-1].bias, -ANCHOR_SCALE * mean_cosine)

        def logits(self, image_emb, text_emb):
            return super().logits(image_emb, text_emb) + self.scale * clip_score(image_emb, text_emb)

    return AnchoredHead()


def anchored_probe(clip, train_emb: np.ndarray, train_texts: list, labels, eval_emb: torch.Tensor,
                   eval_text_emb: torch.Tensor, passes: np.ndarray, groups: np.ndarray, config) -> dict:
    """Does training on the votes move a head that starts as the CLIP score toward the right ranking or away from
    it, on held-out seen prompts (a quarter of the seen prompts by the gate's hash split, measured on their votes, as
    the gate measures) and on unseen prompts (the oracle's pairs)? One anchored head per epoch count, each from the
    same initial weights."""
    import dataclasses

    from alignloop.kernels.onnx_scorer import clip_score
    from alignloop.trainer.reward_model import (build_examples, embed_texts, held_out_mask, preference_accuracy,
                                                prompt_groups, train_head)

    encode = lambda texts: embed_texts(clip, texts)  # noqa: E731
    held = held_out_mask(train_texts, 0.25)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    if not len(train_rows) or not len(held_rows):
        raise ValueError(f"the anchored probe needs seen prompts on both sides of its split: {len(train_rows)} "
                         f"training and {len(held_rows)} held-out votes; draw more prompts")
    labels = np.asarray(labels)
    train = build_examples(train_emb[train_rows], [train_texts[i] for i in train_rows], labels[train_rows], encode,
                           config.seed)
    seen = build_examples(train_emb[held_rows], [train_texts[i] for i in held_rows], labels[held_rows], encode,
                          config.seed)
    seen_groups = prompt_groups(seen)
    mean_cosine = float(clip_score(train.image, train.text[train.prompt_id]).mean())

    def accuracies(score):
        with torch.no_grad():
            on_seen, _ = preference_accuracy(score(seen.image, seen.text[seen.prompt_id]), seen_groups, seen.label)
            on_unseen, _ = preference_accuracy(score(eval_emb, eval_text_emb), groups, passes)
        return {"held_out_seen": None if on_seen is None else round(float(on_seen), 4),
                "unseen": None if on_unseen is None else round(float(on_unseen), 4)}

    rows = {"clip_score": accuracies(clip_score)}
    for epochs in ANCHOR_EPOCHS:
        torch.manual_seed(config.seed)  # every row's head starts from the same weights
        head = train_head(train, dataclasses.replace(config, epochs=epochs), progress=False,
                          head=anchored_head(train.image.shape[1], config.hidden, mean_cosine))
        rows[f"epochs_{epochs}"] = accuracies(head.logits)
    return {"means": "preference accuracy of a head that starts as the CLIP score (anchored_head) after training on "
                     "the votes of three quarters of the seen prompts for that many epochs: on the other quarter's "
                     "votes (held_out_seen, as the gate measures) and on the unseen prompts' oracle pairs",
            "train_votes": len(train_rows), "held_out_seen_votes": len(held_rows), **rows}


def failure_kind(verdict: dict, text: str) -> str:
    """How the oracle failed an image (`verdict`: one of the oracle reward's info["verdicts"]): "pass", the failing
    aspects joined by "+", or, where the count alone fails, whether a clump (objects touching) hid the right number
    ("count:clump") or one too many or too few showed."""
    from alignloop.world.grammar import parse_prompt

    if verdict["passed"]:
        return "pass"
    failed = [aspect for aspect in ("count", "color", "shape", "background") if verdict.get(aspect) is False]
    if failed != ["count"]:
        return "+".join(failed)
    off = verdict["found_count"] - parse_prompt(text).count
    return "count:clump" if off == 0 else "count:+1" if off == 1 else "count:-1" if off == -1 else "count:other"


def accuracy_by_failure(scores: dict, kinds: np.ndarray, groups: np.ndarray) -> dict:
    """Per kind of failure: its images, and each reward's preference accuracy over the pairs (a passing image, an
    image failing that way) of one prompt: where a reward's ranking goes wrong."""
    from alignloop.trainer.reward_model import preference_accuracy

    out = {}
    for kind in sorted(set(kinds) - {"pass"}, key=lambda k: -int((kinds == k).sum())):
        rows = (kinds == "pass") | (kinds == kind)
        kind = str(kind)
        out[kind] = {"images": int((kinds == kind).sum())}
        for name, values in scores.items():
            accuracy, out[kind]["pairs"] = preference_accuracy(np.asarray(values)[rows], groups[rows],
                                                               (kinds[rows] == "pass").astype(int))
            out[kind][name] = None if accuracy is None else round(float(accuracy), 4)
    return out


def tune_image_tower(clip, images, prompts, labels, measure, seed: int, epochs: int, lr: float = 1e-5,
                     temperature: float = 0.1, batch_size: int = 64, negatives: int = 7) -> list:
    """Tunes a copy of the CLIP's image tower on votes, the text tower frozen, and scores by the tuned cosine:
    cross-entropy of the true prompt among `negatives` rule-perturbed ones (count, color, shape, background hard
    negatives, Lee et al.'s classification term on the towers instead of a head) on up-voted images + the pairwise
    Bradley-Terry term on same-prompt (up, down) pairs, both on cosines over `temperature`. Returns
    `measure(score_fn)` after each epoch, score_fn(images, texts) -> cosines [B] under the tuned tower."""
    import copy

    import torch.nn.functional as F

    from alignloop.rewards.scorer import RewardScorer
    from alignloop.trainer.reward_model import PairSampler, build_examples, embed_texts, sample_negatives

    scorer = RewardScorer(clip, head=None, backend="torch")  # its preprocessing, as serving's
    ex = build_examples(np.zeros((len(prompts), clip.embed_dim), np.float32), prompts, labels,
                        lambda rows: embed_texts(clip, rows), seed)  # for its prompts' perturbation pools
    text = F.normalize(ex.text, dim=-1)  # [T, D], frozen
    pixels = scorer.clip_input(images).float()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tower = copy.deepcopy(clip.model.visual).float().train()
    optimizer = torch.optim.AdamW(tower.parameters(), lr=lr, weight_decay=0.01)
    pairs = PairSampler(ex.prompt_id, ex.label)

    @torch.no_grad()
    def score(eval_images, eval_texts):
        tower.eval()
        embedded = F.normalize(tower(scorer.clip_input(eval_images).float()), dim=-1)
        tower.train()
        return (embedded * F.normalize(embed_texts(clip, eval_texts), dim=-1)).sum(-1)

    measured = []
    for _ in range(epochs):
        order = torch.randperm(len(prompts), generator=generator)
        for start in range(0, len(prompts), batch_size):
            rows = order[start:start + batch_size]  # [b]
            classify = (ex.label[rows] > 0.5) & (ex.pool_len[ex.prompt_id[rows]] > 0)
            negative_rows = sample_negatives(ex, rows, negatives, generator)  # [b, N-1]
            ups, downs = pairs.sample(len(rows), generator)  # [p], [p]
            embedded = F.normalize(tower(pixels[torch.cat([rows, ups, downs])]), dim=-1)
            image, up, down = embedded.split([len(rows), len(ups), len(downs)])
            candidates = torch.cat([text[ex.prompt_id[rows]][:, None], text[negative_rows]], 1)  # [b, N, D]
            logits = (image[:, None] * candidates).sum(-1) / temperature  # true prompt first
            loss = F.cross_entropy(logits[classify], torch.zeros(int(classify.sum()), dtype=torch.int64)) \
                if classify.any() else torch.zeros(())
            if len(ups):
                loss = loss - F.logsigmoid(((up - down) * text[ex.prompt_id[ups]]).sum(-1) / temperature).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        measured.append(measure(score))
    return measured


def tower_probe(clip, images, prompts, labels, eval_images, eval_texts, passes: np.ndarray, groups: np.ndarray,
                clip_scores: np.ndarray, seed: int, epochs: int) -> dict:
    """Would a better image-text representation, tuned from the votes, rank unseen prompts better than the frozen
    CLIP score? `tune_image_tower` on the bench's votes, measured on every unseen pair; and on the oracle's
    verdicts of half the unseen prompts (no noise, the very prompt distribution), measured on the other half."""
    from alignloop.trainer.reward_model import preference_accuracy

    def accuracy(scores, rows):
        value, _ = preference_accuracy(scores, groups[rows], passes[rows])
        return None if value is None else round(float(value), 4)  # None: no pair among these prompts

    def accuracy_on(rows):
        return lambda score: accuracy(score(eval_images[rows], [eval_texts[i] for i in rows]).numpy(), rows)

    every, odd, even = np.arange(len(passes)), np.flatnonzero(groups % 2 == 1), np.flatnonzero(groups % 2 == 0)
    on_votes = tune_image_tower(clip, images, prompts, labels, accuracy_on(every), seed, epochs)
    on_half = tune_image_tower(clip, eval_images[even], [eval_texts[i] for i in even], passes[even].astype(int),
                               accuracy_on(odd), seed, epochs)
    return {"means": "unseen preference accuracy of the CLIP image tower tuned (text tower frozen, cosine score) with "
                     "prompt classification among rule-perturbed prompts + the pairwise term, after each epoch: on "
                     "the bench's votes (measured on every unseen pair, beside the frozen CLIP score's), and on the "
                     "oracle's verdicts of the even unseen prompts (measured on the odd ones, beside the frozen "
                     "CLIP score's on those)",
            "votes_by_epoch": on_votes, "other_unseen_by_epoch": on_half,
            "frozen_on_odd_unseen": accuracy(clip_scores[odd], odd)}


def run(quick: bool = False, seed: int = 0, steps: int = 20, guidance: float = 5.0, flip: float = 0.1,
        train_images: int = None, eval_prompts: int = None, progress: bool = True) -> dict:
    from alignloop.machine import describe_machine
    from alignloop.models import load_clip, load_generator
    from alignloop.rewards import get_reward
    from alignloop.trainer.config import RewardTrainConfig
    from alignloop.trainer.reward_model import preference_accuracy, train_reward_from_arrays
    from alignloop.world import SimulatedRater, sample_prompts, split

    started = time.perf_counter()
    size = dict(QUICK if quick else FULL)
    size["train_images"] = train_images or size["train_images"]
    size["eval_prompts"] = eval_prompts or size["eval_prompts"]
    pipe = load_generator(device="cpu", dtype=torch.float32)
    clip = load_clip(device="cpu", dtype=torch.float32)

    # 1. Votes on base-model samples of seen prompts, as requests of 16 candidates
    rng = random.Random(seed)
    requests = sample_prompts(rng, max(1, size["train_images"] // PER_PROMPT), "seen")
    train_prompts = [p for p in requests for _ in range(PER_PROMPT)]
    images = _generate(pipe, train_prompts, seed, steps, guidance, progress, "sample seen")
    rater = SimulatedRater(flip=flip, seed=seed)
    labels = [int(rater.vote(image, prompt) == "up") for image, prompt in zip(images, train_prompts)]
    users = [f"simulated-user-{i % USERS}" for i in range(len(labels))]

    # 2. Three heads: the full loss and the two ablations, same data, same seed
    base = RewardTrainConfig(seed=seed, hidden=HIDDEN, epochs=size["epochs"], held_out_fraction=0.0)  # no gate here
    variants = {"learned": base,
                "learned_no_classification": RewardTrainConfig(**{**base.to_dict(), "classification_weight": 0.0}),
                "learned_no_pairwise": RewardTrainConfig(**{**base.to_dict(), "pairwise_weight": 0.0})}
    trained = {name: train_reward_from_arrays(images, [p.text for p in train_prompts], labels, users, clip, config,
                                              progress=progress, desc=name)
               for name, config in variants.items()}
    # 2a. The same head on noise-free votes (the oracle's own verdicts of these images): what votes on seen prompts
    #     could teach at best, a ceiling for step 2's heads on unseen prompts
    truth = get_reward("oracle")(images, [p.text for p in train_prompts])[0].numpy().astype(int)
    noise_free = train_reward_from_arrays(images, [p.text for p in train_prompts], truth, users, clip, base,
                                          progress=progress, desc="noise-free votes")

    # 2b. Selection bias: only the 4 shown of each 16 get votes; which 4 depends on the policy
    from alignloop.serving.sampler import choose_shown

    clip_train = get_reward("clip", clip=clip, backend="torch")(images, [p.text for p in train_prompts])[0]
    shown_sets = {}
    for policy, explore in (("top4_only", 0.0), ("explore_0.25", 0.25), ("explore_1.0", 1.0)):
        policy_rng, rows = random.Random(seed + 2), []
        for g in range(len(requests)):
            shown, _, _ = choose_shown(clip_train[g * PER_PROMPT:(g + 1) * PER_PROMPT], BEST_K, explore, policy_rng)
            rows += [g * PER_PROMPT + i for i in shown]
        shown_sets[policy] = rows
    biased = {policy: train_reward_from_arrays(images[rows], [train_prompts[i].text for i in rows],
                                               [labels[i] for i in rows], [users[i] for i in rows], clip, base,
                                               progress=progress, desc=policy)
              for policy, rows in shown_sets.items()}

    # 3. Unseen prompts: 16 seeded samples each, scored by every reward
    unseen = list(split("unseen"))
    if size["eval_prompts"]:
        unseen = random.Random(seed + 1).sample(unseen, min(size["eval_prompts"], len(unseen)))
    eval_prompts = [p for p in unseen for _ in range(PER_PROMPT)]
    eval_images = _generate(pipe, eval_prompts, seed + 1, steps, guidance, progress, "sample unseen")
    texts = [p.text for p in eval_prompts]
    passes, oracle_info = get_reward("oracle")(eval_images, texts)
    rewards = {"clip": get_reward("clip", clip=clip, backend="torch"),
               **{name: get_reward("learned", head=t.head, clip=clip, backend="torch")
                  for name, t in {**trained, **biased, "noise_free_votes": noise_free}.items()}}
    scores = {name: reward(eval_images, texts)[0] for name, reward in rewards.items()}
    groups = np.repeat(np.arange(len(unseen)), PER_PROMPT)
    accuracy, pairs = {}, 0
    for name, values in scores.items():
        accuracy[name], pairs = preference_accuracy(values.numpy(), groups, passes.numpy())
    # 4. Probe: is what separates passing from failing images in the embeddings, and does it carry over?
    from alignloop.rewards.images import select
    from alignloop.trainer.reward_model import embed_images, embed_texts

    image_emb = torch.from_numpy(embed_images(clip, lambda ids: select(eval_images, [int(i) for i in ids]),
                                              [str(i) for i in range(len(eval_images))]))
    text_emb = embed_texts(clip, texts)
    probe = generalization_probe(image_emb, text_emb, passes.numpy().astype(bool), groups, seed,
                                 epochs=40 if quick else 200)
    train_emb = embed_images(clip, lambda ids: select(images, [int(i) for i in ids]),
                             [str(i) for i in range(len(images))])
    anchored = anchored_probe(clip, train_emb, [p.text for p in train_prompts], labels, image_emb, text_emb,
                              passes.numpy(), groups, base)
    tower = tower_probe(clip, images, [p.text for p in train_prompts], labels, eval_images, texts,
                        passes.numpy().astype(int), groups, scores["clip"].numpy(), seed, epochs=1 if quick else 3)
    kinds = np.array([failure_kind(verdict, text) for verdict, text in zip(oracle_info["verdicts"], texts)])
    by_failure = accuracy_by_failure({"clip": scores["clip"].numpy(), "learned": scores["learned"].numpy()}, kinds,
                                     groups)
    best = {"random": float(passes.mean()), "clip": best_k_pass_rate(scores["clip"], passes),
            "learned": best_k_pass_rate(scores["learned"], passes), "oracle": best_k_pass_rate(passes, passes)}

    gap = best["oracle"] - best["clip"]
    return {
        "benchmark": "reward",
        "machine": describe_machine(),
        "settings": {"quick": quick, "seed": seed, "steps": steps, "guidance": guidance, "rater_flip": flip,
                     "train_images": len(train_prompts), "train_split": "seen", "users": USERS,
                     "eval_split": "unseen", "eval_prompts": len(unseen), "per_prompt": PER_PROMPT, "best_k": BEST_K,
                     "generator": "shapes-sd-tiny", "clip": clip.name, "reward_config": base.to_dict(),
                     "random_means": "expected pass rate of 4 of 16 drawn at random (the prompt's pass rate)"},
        "votes": {"images": len(labels), "up_share": round(float(np.mean(labels)), 4),
                  "prompts": len({p.text for p in train_prompts}), "requests_of_16": len(requests)},
        "pass_best4": {k: round(v, 4) for k, v in best.items()},
        "preference_accuracy": {k: (round(v, 4) if v is not None else None) for k, v in accuracy.items()
                                if k not in biased and k != "noise_free_votes"},
        "selection_bias": {
            "means": "unseen preference accuracy and best-4 pass rate of full-loss heads trained on the votes of the "
                     "4 images shown per request of 16 (CLIP-ranked), by the last slot's exploration probability; "
                     "all_votes: every candidate voted",
            "all_votes": {"votes": len(labels), "preference_accuracy": round(accuracy["learned"], 4),
                          "pass_best4": round(best["learned"], 4)},
            **{policy: {"votes": len(shown_sets[policy]), "up_share": round(float(np.mean(
                [labels[i] for i in shown_sets[policy]])), 4), "preference_accuracy": round(accuracy[policy], 4),
                        "pass_best4": round(best_k_pass_rate(scores[policy], passes), 4)} for policy in biased}},
        "oracle_pairs": pairs,
        "accuracy_by_failure": {"means": "unseen preference accuracy over pairs (a passing image, an image the oracle "
                                         "fails this way) of one prompt; count:clump = objects drawn touching, "
                                         "count:+1 / -1 = one object too many / too few", **by_failure},
        "generalization_probe": {**probe, "noise_free_votes": round(accuracy["noise_free_votes"], 4),
                                 "noise_free_votes_means": "unseen preference accuracy of the full-loss head trained "
                                 "on the oracle's verdicts of the training images instead of the rater's votes",
                                 "tuned_image_tower": tower, "anchored_head": anchored},
        "eval_pass_rate": round(float(passes.mean()), 4),
        "training": {name: t.counts for name, t in trained.items()},
        "gap_closed": round((best["learned"] - best["clip"]) / gap, 4) if gap > 0 else None,
        "ratio": round(best["learned"] / best["clip"], 4) if best["clip"] > 0 else None,
        "ratio_means": "best-4-of-16 oracle pass rate on unseen prompts: learned reward / CLIP score (bigger: learned better)",
        "seconds": round(time.perf_counter() - started, 1),
    }


def summary_lines(report: dict) -> list:
    s, best, acc = report["settings"], report["pass_best4"], report["preference_accuracy"]
    lines = [f"votes: {report['votes']['images']} samples of {report['votes']['prompts']} seen prompts, "
             f"{report['votes']['up_share']:.1%} up (rater flip {s['rater_flip']})",
             f"unseen: {s['eval_prompts']} prompts x {s['per_prompt']} samples, oracle pass rate "
             f"{report['eval_pass_rate']:.3f}, {report['oracle_pairs']} oracle-defined pairs",
             "preference accuracy: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in acc.items()),
             "best 4 of 16 pass rate: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items())]
    lines.append("selection bias (votes on 4 shown of 16; unseen preference accuracy): " + ", ".join(
        f"{k} {v['preference_accuracy']:.3f} ({v['votes']} votes)" for k, v in report["selection_bias"].items()
        if k != "means"))
    probe = report["generalization_probe"]
    lines.append(f"probe, heads fitted to unseen images' oracle verdicts: in-sample {probe['in_sample']:.3f}, "
                 f"on other prompts {probe['other_prompts']:.3f}; full-loss head on noise-free votes "
                 f"{probe['noise_free_votes']:.3f}")
    lines.append("preference accuracy by the oracle's failure (clip / learned): " + ", ".join(
        f"{kind} {row['clip']} / {row['learned']} ({row['images']} images)"
        for kind, row in report["accuracy_by_failure"].items() if kind != "means"))
    tower = probe["tuned_image_tower"]
    lines.append(f"probe, CLIP image tower tuned on the votes, by epoch: {tower['votes_by_epoch']} (frozen CLIP score "
                 f"{acc['clip']:.3f}); tuned on half the unseen prompts' oracle verdicts, the other half: "
                 f"{tower['other_unseen_by_epoch']} (frozen {tower['frozen_on_odd_unseen']})")
    anchored = probe["anchored_head"]
    by_epochs = ", ".join(f"{k.replace('epochs_', '')} {v['held_out_seen']} / {v['unseen']}"
                          for k, v in anchored.items() if k.startswith("epochs_"))
    lines.append(f"probe, a head that starts as the CLIP score, by epochs on the votes (held-out seen / unseen): "
                 f"{by_epochs} (CLIP score {anchored['clip_score']['held_out_seen']} / "
                 f"{anchored['clip_score']['unseen']})")
    if report["gap_closed"] is not None:
        lines.append(f"gap closed (learned - clip) / (oracle - clip): {report['gap_closed']:.3f}")
    return lines
