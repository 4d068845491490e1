"""The guardrail: promotes the canary (arm B) or rolls it back by what users say, and watches for reward hacking.

    alignloop rollout watch --once            # read the feedback stream, decide once, exit
    alignloop rollout watch                   # keep watching, deciding every --poll-s seconds

    decision = decide(stats_a, stats_b, GuardrailConfig(), now, started_at)    # the rule alone, no Kafka

The rule (Beta-Binomial, as experimentation platforms such as GrowthBook state theirs):
- Each arm's thumbs-up rate p has a Beta(1 + ups/d, 1 + downs/d) posterior (a uniform Beta(1, 1) prior), d the
  arm's design effect: a user's votes share their taste (and a request's k votes its prompt) and agree more than
  independent votes, so d (the cluster-robust variance of the rate, votes grouped by voter: the user, whom arms are
  assigned by, else the anonymous request; over the binomial one; >= 1) says how many of them count as one. A
  voter who changes a vote on an image counts once, with the last. From
  `draws` seeded Monte Carlo samples of both: P(B > A), P(B > A + min_lift), and the expected loss of shipping B,
  E[max(pA - pB, 0)]: how many thumbs-up points per vote users lose on average if B ships and is worse.
- No decision while either arm has fewer than `min_votes` votes.
- Reward hacking: B's images score higher by the reward model (its mean above A's by `reward_margin_sd` pooled
  standard deviations) while users like B less (P(B < A) >= `hacking_probability`): the adapter learned to please
  the reward model, not the users. Roll back, saying so. Checked before the plain rules, whose reason it refines.
- Roll back when P(B > A) <= `rollback_probability`.
- Promote when P(B > A + min_lift) >= `promote_probability` and the expected loss <= `max_expected_loss`.
- After `max_exposure_s` without a decision, B is retired as inconclusive (a rollback with that reason): a canary
  that cannot be told apart from the live adapter is not worth the risk of shipping it.

Why the promotion bar is P(B > A + 0.01) >= 0.99 and not the platforms' P(B > A) >= 0.95: the guardrail looks
again at every poll, and each look at two equal arms is another chance that noise crosses the bar. Simulated
(200 runs, a look every 10 votes an arm up to 3,000), equal arms were promoted in 17% of runs under
P(B > A) >= 0.95, and in 3% under this rule; a B 10 points better (0.55 vs 0.45) was still promoted in every run,
after 290 votes an arm (median). The lift term makes a false promotion rarer as votes pile up instead of likelier.
Those runs drew votes independently; served votes are not: with k=4 votes a request and prompts whose pass rates
spread over 0..1 (a look every 20 votes an arm), equal arms counted vote by vote were promoted in 10 of 100 runs
up to 2,000 votes an arm and in 24 of 200 up to 1,000; with the design effect in 1 of 100 and 3 of 200. A B 10 points
better was still promoted in 95 of 100, after 570 votes an arm (median) instead of 270.

What is counted: the votes (FeedbackEvent) and shown images' reward-model scores (GenerationEvent) whose `arm` and
`adapter_version` match arm A or B of the current rollout, stamped at or after the rollout started, each event once
(by event_id). The counts live only in this process: on start, and at every new rollout, it reads the topics again
from the rollout's start time (Kafka's offset-for-time lookup), so a restarted guardrail loses nothing.
Every decision is written to the registry (alignloop.rollout.promote / rollback, with its numbers) and logged as
one JSON line.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Literal, Optional

from alignloop import rollout as rollouts
from alignloop.errors import UserFacingError
from alignloop.events import FeedbackEvent, GenerationEvent
from alignloop.registry import Registry, RegistryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardrailConfig:
    """The decision rule's thresholds and the watcher's timing. The defaults are argued beside each field."""

    # Votes each arm needs before any decision. At 200 votes a rate's posterior sd is still ~0.035, so only
    # effects of several points can show; fewer votes also come mostly from the first, most eager users.
    min_votes: int = 200
    # P(B > A + min_lift) needed to promote: 0.99 and a lift of one thumbs-up point (0.01) rather than the
    # platforms' usual 0.95 and 0, because the guardrail looks again and again (see the module docstring).
    promote_probability: float = 0.99
    min_lift: float = 0.01
    # Expected loss of shipping B, in thumbs-up rate (0.005 = half a point per vote), at most, to promote: a high
    # chance to win is not enough if the rest could cost a lot. Under the default 0.99 bar it rarely binds (a B
    # that clears it has a loss near 0.0005); it is the guard when promote_probability is lowered.
    max_expected_loss: float = 0.005
    # P(B > A) at or below which B is rolled back. Looser than the promotion bar on purpose: rolling back an equal
    # B by mistake costs only the experiment, keeping a worse one costs users.
    rollback_probability: float = 0.05
    # Seconds after the rollout started without a decision before B is retired as inconclusive. A week covers
    # weekday and weekend users and bounds how many times the rule looks at a null result (each look is another
    # chance of a false promotion).
    max_exposure_s: float = 7 * 24 * 3600.0
    # Reward hacking: B's mean reward-model score above A's by at least this many pooled standard deviations of
    # the shown images' scores (Cohen's d; 0.2 is a "small" effect, yet more than two standard errors at 200
    # images an arm). In sd units so that it means the same for CLIP scores and for learned heads' [0, 1].
    reward_margin_sd: float = 0.2
    # ... while P(B < A) for the thumbs-up rate is at least this: users like B less, likely though not yet surely
    # (0.9, looser than rollback's 0.95, since the reward signal corroborates it and the cause is worth naming).
    hacking_probability: float = 0.9
    # Monte Carlo draws per posterior (standard error of P(B > A) <= 0.0011 at 200,000), and their seed, so that
    # the same counts always give the same decision.
    draws: int = 200_000
    seed: int = 0
    # Watcher: seconds between looks in continuous mode; how far before the rollout's start to seek in Kafka
    # (seconds; producer clocks and the spool's replays are late, never early, but hosts' clocks drift); and how
    # long one read to the end of the topics may take before it is an error (seconds).
    poll_s: float = 10.0
    lookback_s: float = 300.0
    read_timeout_s: float = 120.0

    def __post_init__(self):
        checks = [
            ("min_votes", isinstance(self.min_votes, int) and self.min_votes >= 1, "an integer >= 1"),
            ("promote_probability", 0.5 < self.promote_probability <= 1, "in (0.5, 1]"),
            ("min_lift", 0 <= self.min_lift < 1, "in [0, 1)"),
            ("max_expected_loss", self.max_expected_loss >= 0, ">= 0"),
            ("rollback_probability", 0 <= self.rollback_probability < 0.5, "in [0, 0.5)"),
            ("max_exposure_s", self.max_exposure_s > 0, "> 0"),
            ("reward_margin_sd", self.reward_margin_sd >= 0, ">= 0"),
            ("hacking_probability", 0.5 < self.hacking_probability <= 1, "in (0.5, 1]"),
            ("draws", isinstance(self.draws, int) and self.draws >= 1000, "an integer >= 1000"),
            ("poll_s", self.poll_s > 0, "> 0"),
            ("lookback_s", self.lookback_s >= 0, ">= 0"),
            ("read_timeout_s", self.read_timeout_s > 0, "> 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")


@dataclass
class RewardTally:
    """Reward-model scores of an arm's shown images, by reward model (scores of two models do not compare)."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, score: float) -> None:
        self.n, self.total, self.total_sq = self.n + 1, self.total + score, self.total_sq + score * score

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def var(self) -> float:
        return max(self.total_sq / self.n - self.mean ** 2, 0.0)


@dataclass
class ArmStats:
    """What one arm has gathered since the rollout started."""

    arm: str
    adapter: str
    up: int = 0
    down: int = 0
    rewards: dict[str, RewardTally] = field(default_factory=dict)  # reward model -> scores of the shown images
    clusters: dict[str, list] = field(default_factory=dict)  # voter (user hash, else request id) -> [up, votes]
    latest: dict = field(default_factory=dict)  # (image id, voter) -> (up, cluster): the vote that counts

    def add_vote(self, cluster: str, up: bool, key: Optional[tuple] = None) -> None:
        """One vote in `cluster`; a vote with the `key` of an earlier one (the same voter on the same image, who
        changed their mind) replaces it, as the reward model's vote hygiene does."""
        if key is not None:
            if key in self.latest:
                self._tally(*self.latest[key], sign=-1)
            self.latest[key] = (up, cluster)
        self._tally(up, cluster)

    def _tally(self, up: bool, cluster: str, sign: int = 1) -> None:
        self.up, self.down = self.up + sign * up, self.down + sign * (not up)
        tally = self.clusters.setdefault(cluster, [0, 0])
        tally[0], tally[1] = tally[0] + sign * up, tally[1] + sign

    @property
    def votes(self) -> int:
        return self.up + self.down

    @property
    def design_effect(self) -> float:
        """How many votes count as one independent vote: the cluster-robust variance of the thumbs-up rate (votes
        grouped by voter, the unit arms are assigned by: a user's votes over all their requests, an anonymous
        request's k votes) over the binomial one, at least 1. A voter's votes share their taste and a request's its
        prompt, so they agree more than independent votes would; counted as independent they make the posterior too
        sure. 1 when the votes carry no clusters (counts given directly) or come from fewer than 2."""
        groups = [tally for tally in self.clusters.values() if tally[1]]
        if len(groups) < 2 or not 0 < self.up < self.votes:
            return 1.0
        rate = self.up / self.votes
        robust = len(groups) / (len(groups) - 1) * sum((u - rate * m) ** 2 for u, m in groups) / self.votes ** 2
        return max(1.0, robust / (rate * (1 - rate) / self.votes))

    @property
    def rate(self) -> float:
        return self.up / self.votes if self.votes else float("nan")

    def summary(self) -> dict:
        return {"arm": self.arm, "adapter": self.adapter, "up": self.up, "down": self.down,
                "rate": round(self.rate, 4) if self.votes else None,
                "clusters": sum(1 for t in self.clusters.values() if t[1]),
                "design_effect": round(self.design_effect, 3)}


@dataclass(frozen=True)
class Decision:
    action: Literal["none", "promote", "rollback"]
    reason: str  # one line, with the numbers: what the registry's history and the rollout record say
    numbers: dict  # posterior, counts, rewards, exposure: JSON values


def posterior(a: ArmStats, b: ArmStats, draws: int, seed: int, lift: float = 0.0) -> tuple[float, float, float]:
    """P(pB > pA), P(pB > pA + lift) and E[max(pA - pB, 0)] under Beta(1 + up/d, 1 + down/d) posteriors (d: the
    arm's design effect, so that clustered votes count as the independent votes they are worth), by seeded Monte
    Carlo."""
    import numpy as np  # here, not at the top: the CLI builds its flags from this module's config

    rng = np.random.default_rng(seed)
    d_a, d_b = a.design_effect, b.design_effect
    p_a = rng.beta(1 + a.up / d_a, 1 + a.down / d_a, draws)  # [draws]
    p_b = rng.beta(1 + b.up / d_b, 1 + b.down / d_b, draws)  # [draws]
    return float((p_b > p_a).mean()), float((p_b > p_a + lift).mean()), float(np.maximum(p_a - p_b, 0).mean())


def reward_effect(a: ArmStats, b: ArmStats) -> Optional[tuple[str, float, float, float]]:
    """(reward model, A's mean, B's mean, (B - A) / pooled sd) for the reward model both arms have the most
    scores from; None when they share none with at least two scores each."""
    shared = [(min(a.rewards[m].n, b.rewards[m].n), m) for m in a.rewards.keys() & b.rewards.keys()]
    shared = [(n, m) for n, m in shared if n >= 2]
    if not shared:
        return None
    model = max(shared)[1]
    ra, rb = a.rewards[model], b.rewards[model]
    pooled = math.sqrt((ra.n * ra.var + rb.n * rb.var) / (ra.n + rb.n))
    diff = rb.mean - ra.mean
    effect = diff / pooled if pooled > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    return model, ra.mean, rb.mean, effect


def decide(a: ArmStats, b: ArmStats, config: GuardrailConfig, now: datetime, started_at: datetime) -> Decision:
    """The rule of the module docstring, applied to arm A (control) and arm B (the canary)."""
    exposure_s = (now - started_at).total_seconds()
    expired = exposure_s >= config.max_exposure_s
    numbers = {"a": a.summary(), "b": b.summary(), "exposure_s": round(exposure_s, 1), "min_votes": config.min_votes}
    counts = f"thumbs-up B {_rate(b)} vs A {_rate(a)}"

    # 1. Enough votes?
    if min(a.votes, b.votes) < config.min_votes:
        if expired:
            return Decision("rollback", f"inconclusive after {_hours(exposure_s)}: too few votes (A {a.votes}, "
                                        f"B {b.votes}, {config.min_votes} needed each); {counts}", numbers)
        return Decision("none", f"waiting for votes: A {a.votes}, B {b.votes} of {config.min_votes} each", numbers)

    # 2. Posterior.
    p_better, p_lift, loss = posterior(a, b, config.draws, config.seed, config.min_lift)
    numbers.update(p_b_beats_a=round(p_better, 4), p_b_beats_a_by_min_lift=round(p_lift, 4),
                   min_lift=config.min_lift, expected_loss_b=round(loss, 5))
    stated = (f"P(B>A)={p_better:.3f}, P(B>A+{config.min_lift:g})={p_lift:.3f}, expected loss of B {loss:.4f}; "
              f"{counts}")

    # 3. Reward hacking: the reward model prefers B while users prefer A.
    effect = reward_effect(a, b)
    if effect is not None:
        model, mean_a, mean_b, d = effect
        numbers["reward"] = {"model": model, "mean_a": round(mean_a, 4), "mean_b": round(mean_b, 4),
                             "effect_sd": round(d, 3) if math.isfinite(d) else str(d)}
        if d >= config.reward_margin_sd and 1 - p_better >= config.hacking_probability:
            return Decision("rollback", f"reward hacking suspected: reward model {model} scores B above A "
                                        f"({mean_b:.4f} vs {mean_a:.4f}, {d:+.2f} sd) while users like B less, "
                                        f"P(B<A)={1 - p_better:.3f}; {counts}", numbers)

    # 4. The plain rules.
    if p_better <= config.rollback_probability:
        return Decision("rollback", f"B is worse: {stated}", numbers)
    if p_lift >= config.promote_probability and loss <= config.max_expected_loss:
        return Decision("promote", f"B is better: {stated}", numbers)
    if expired:
        return Decision("rollback", f"inconclusive after {_hours(exposure_s)}: {stated}", numbers)
    return Decision("none", f"no decision yet: {stated}", numbers)


def _rate(stats: ArmStats) -> str:
    return f"{stats.rate:.3f} ({stats.up}/{stats.votes})" if stats.votes else "- (0 votes)"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


# -- the watcher ----------------------------------------------------------------------------------------------


class GuardrailError(UserFacingError):
    """The guardrail cannot read what it needs (a missing topic, an unreachable broker)."""


class Guardrail:
    """Counts the current rollout's arms A and B from Kafka and applies `decide` to them; `step()` looks once."""

    def __init__(self, registry: Registry, bootstrap: str, topics=None, config: GuardrailConfig = GuardrailConfig(),
                 who: str = "guardrail"):
        from alignloop.feedback.config import Topics

        self.registry, self.bootstrap, self.config, self.who = registry, bootstrap, config, who
        self.topics = topics or Topics()
        self.rollout: Optional[rollouts.Rollout] = None  # the one being counted
        self.stats: dict[str, ArmStats] = {}  # arm name ("A", "B") -> its counts
        self.seen: set = set()  # event_ids counted for this rollout
        self.rejected = 0  # malformed records skipped
        self.last_record: Optional[dict] = None  # the last decision as logged: rollout, action, reason, numbers
        self._consumer = None
        self._partitions = []

    def step(self, now: Optional[datetime] = None) -> Optional[Decision]:
        """Read what is on the topics now, decide, and apply the decision. None when there is no canary to judge."""
        # 1. Which rollout, and is there a canary in it?
        current = rollouts.current_rollout(self.registry)
        a, b = (current.arm("A"), current.arm("B")) if current else (None, None)
        if a is None or b is None or b.adapter == rollouts.BASE:
            self.rollout = None
            return None
        if self.registry.get("adapter", b.adapter).state != "canary":  # rollback would then hit the live adapter
            log.warning("rollout %s: arm B serves %s, which is not a canary; not judging it", current.id, b.adapter)
            return None
        # 2. Count: from the rollout's start when it is new to us, else what arrived since the last look.
        if self.rollout is None or self.rollout.id != current.id:
            self._start(current)
        self._read_to_end()
        # 3. Decide, and write the decision to the registry.
        now = now or datetime.now(timezone.utc)
        decision = decide(self.stats["A"], self.stats["B"], self.config, now, current.started_at)
        record = dict(ts=now.isoformat(), rollout=current.id, who=self.who, **asdict(decision))
        if decision.action != "none":
            try:
                change = rollouts.promote if decision.action == "promote" else rollouts.rollback
                args = (b.adapter,) if decision.action == "promote" else ()
                after = change(self.registry, *args, who=self.who, why=f"guardrail: {decision.reason}",
                               numbers=decision.numbers, expect_rollout=current.id)
                record["new_rollout"] = after.id
            except rollouts.RolloutError as err:  # e.g. an operator changed the rollout meanwhile
                record["not_applied"] = str(err)
        self.last_record = record
        (log.info if decision.action != "none" else log.debug)(json.dumps(record))
        return decision

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    # -- reading ------------------------------------------------------------------------------------------------

    def _start(self, current: rollouts.Rollout) -> None:
        """Forget the old counts; seek every partition to the new rollout's start."""
        from kafka import KafkaConsumer, TopicPartition

        # The rollout is set last: a start that fails (broker down, a topic not there yet) is tried again whole at
        # the next look, with a fresh consumer, rather than counting from wherever a half-made consumer stands.
        self.rollout, self.seen, self.rejected = None, set(), 0
        self.stats = {name: ArmStats(name, current.arm(name).adapter) for name in ("A", "B")}
        try:
            if self._consumer is None:
                self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), enable_auto_commit=False,
                                               client_id="alignloop-guardrail")
                self._partitions = []
                for topic in (self.topics.generations, self.topics.feedback):
                    ids = self._consumer.partitions_for_topic(topic)
                    if not ids:
                        raise GuardrailError(f"topic {topic!r} does not exist on {self.bootstrap}; create it with "
                                             "`alignloop kafka topics`")
                    self._partitions += [TopicPartition(topic, p) for p in sorted(ids)]
                self._consumer.assign(self._partitions)
            since_ms = int((current.started_at.timestamp() - self.config.lookback_s) * 1000)
            found = self._consumer.offsets_for_times({tp: since_ms for tp in self._partitions})
            end = self._consumer.end_offsets(self._partitions)  # an offset, not seek_to_end: that one resolves later
            for tp in self._partitions:
                self._consumer.seek(tp, end[tp] if found[tp] is None else found[tp].offset)  # None: nothing that recent
        except BaseException:
            self.close()
            raise
        self.rollout = current
        log.info("guardrail: counting rollout %s from %s", current.describe(), current.started_at.isoformat())

    def _read_to_end(self) -> None:
        """Consume up to the end offsets as of now."""
        from pydantic import ValidationError

        from alignloop.events import parse_event

        consumer = self._consumer
        end = consumer.end_offsets(self._partitions)
        deadline = time.monotonic() + self.config.read_timeout_s
        while any(consumer.position(tp) < end[tp] for tp in self._partitions):
            if time.monotonic() > deadline:
                raise GuardrailError(f"reading {self.topics.feedback} from {self.bootstrap} took over "
                                     f"{self.config.read_timeout_s:.0f} s; is the broker up?")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        self._count(parse_event(record.value))
                    except ValidationError:
                        self.rejected += 1

    def _count(self, event) -> None:
        if event.event_id in self.seen or event.ts < self.rollout.started_at:
            return
        stats = self.stats.get(event.arm)
        if stats is None or stats.adapter != event.adapter_version:  # another arm, or an earlier rollout's adapter
            return
        self.seen.add(event.event_id)
        if isinstance(event, FeedbackEvent):
            voter = event.user_hash or event.request_id  # arms are sticky per user: a user's votes are one cluster
            stats.add_vote(voter, event.vote == "up", key=(event.image_id, voter))
        elif isinstance(event, GenerationEvent):
            tally = stats.rewards.setdefault(event.reward_model or "unknown", RewardTally())
            for image in event.images:
                tally.add(image.reward)


def watch(bootstrap: str, topics=None, registry_url: Optional[str] = None,
          config: GuardrailConfig = GuardrailConfig(), once: bool = False, who: str = "guardrail",
          emit=None, stop=None) -> Optional[Decision]:
    """Run the guardrail: once (read what is there, decide, return the decision), or every `config.poll_s`
    seconds until `stop` (a threading.Event) is set, riding out broker and registry outages. `emit(line)`
    receives decisions as JSON lines: every look's in `once` mode, only promotions and rollbacks otherwise.
    Returns the last decision (None: there was no canary to judge)."""
    from kafka.errors import KafkaError

    guardrail = Guardrail(Registry(registry_url), bootstrap, topics, config, who)
    last = None
    try:
        while True:
            try:
                decision = guardrail.step()
            except (GuardrailError, KafkaError, OSError, RegistryError) as err:
                if once:
                    raise
                log.warning("guardrail: %s; trying again in %.0f s", err, config.poll_s)  # a broker or store blip
                decision = None
            if decision is not None:
                last = decision
                if emit is not None and (once or decision.action != "none"):
                    emit(json.dumps(guardrail.last_record))
            if once:
                return last
            if stop is None:
                time.sleep(config.poll_s)
            elif stop.wait(config.poll_s):
                return last
    finally:
        guardrail.close()
