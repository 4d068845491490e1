"""The experiment's report: report.md beside experiment.json, with matplotlib plots and the image grids.

    write_report(report, out_dir)   # report: what alignloop.trainer.experiment.run_experiment returns

Plots: pass rates of every row (seen and unseen), unseen pass rates per category, the thumbs-up rate of each
arm as the canary traffic came in with the guardrail's looks, and the training curves (the reward model's loss,
each cycle's fine-tuning loss and reward). Every figure in the Markdown is read from `report`.
"""

import json
from pathlib import Path

import numpy as np

ROW_ORDER = ("base", "rejection_clip", "rejection_reward", "rwr", "ppo", "refl", "kto", "candidate1", "cycle1",
             "served_cycle1", "candidate2", "cycle2", "served_cycle2")
ROW_MEANING = {
    "base": "the bundled generator alone",
    "rejection_clip": "base, best k of n by the CLIP score",
    "rejection_reward": "base, best k of n by the learned reward",
    "rwr": "reward-weighted likelihood adapter (cycle 1's snapshot, from the base)",
    "ppo": "PPO adapter (cycle 1's snapshot, from the base)",
    "refl": "ReFL adapter (cycle 1's snapshot, from the base)",
    "kto": "Diffusion-KTO adapter (cycle 1's snapshot, from the base)",
}


def ordered_rows(split_rows: dict) -> list:
    known = [r for r in ROW_ORDER if r in split_rows]
    return known + sorted(r for r in split_rows if r not in ROW_ORDER)


def meaning(row: str) -> str:
    if row in ROW_MEANING:
        return ROW_MEANING[row]
    for prefix, text in (("served_cycle", "live after cycle {}, best k of n by the live reward (as served)"),
                         ("candidate", "cycle {}'s candidate (the nightly job's adapter)"),
                         ("cycle", "the generator live after cycle {}")):
        if row.startswith(prefix):
            return text.format(row[len(prefix):])
    return row


def _learned_reward_label(reward_model: dict) -> str:
    """Which head ranked the rejection_reward row: the live one, else the newest candidate; "" when none was trained."""
    version = reward_model.get("rejection_reward")
    if not version:
        return ""
    return f"{version}, {'live' if version == reward_model.get('live') else 'a candidate: none was live'}"


def write_report(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    plots = {"pass_rates": _plot_pass_rates(report, out / "pass-rates.png"),
             "categories": _plot_categories(report, out / "categories-unseen.png"),
             "guardrail": _plot_guardrail(report, out / "guardrail.png"),
             "training": _plot_training(report, out / "training-curves.png")}
    path = out / "report.md"
    path.write_text(markdown(report, {k: v for k, v in plots.items() if v}))
    return path


def markdown(report: dict, plots: dict) -> str:
    config, traffic = report["config"], report["traffic"]
    lines = [f"# The closed loop, end to end{' (quick)' if report['quick'] else ''}", "",
             f"`alignloop experiment{' --quick' if report['quick'] else ''} --seed {report['seed']}`, "
             f"{report['date']}, {report['seconds'] / 60:.0f} minutes on {report['machine'].get('cpu', 'an unknown CPU')} "
             f"({report['machine'].get('cpu_count')} cores{', ' + report['machine']['gpu'] if 'gpu' in report['machine'] else ''}).",
             "",
             f"Traffic: {traffic['requests']} requests (n={config['n']}, k={config['k']}, {config['steps']} steps) "
             f"from {config['users']} simulated users, {traffic['votes']} votes (the simulated rater, flip "
             f"{config['flip']}), {traffic['feedback_events_on_topic']} feedback events on the topic, "
             f"{len(traffic['failures'])} failed requests, {traffic['shed_and_retried']} shed and retried.", "",
             "## Checks", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'} {name}" for name, ok in report["checks"].items()]
    g = report["goals"]
    lines += ["", "## Goals (unseen prompts)", "",
              f"- live generator after the last cycle minus base: {g['live_minus_base_unseen']:+.3f} "
              f"(goal +{g['live_goal']:.2f}: {'met' if g['live_met'] else 'not met'})",
              f"- as served (best {config['served_k']} of {config['served_per_prompt']} by the live reward) minus "
              f"base: {g['served_minus_base_unseen']:+.3f} (goal +{g['served_goal']:.2f}: "
              f"{'met' if g['served_met'] else 'not met'})", ""]
    same_run = {m: f": the same run as {run['same_as']}" for m, run in (report.get("methods") or {}).items()
                if run.get("same_as")}
    head = _learned_reward_label(report["reward_model"])
    if head:
        same_run["rejection_reward"] = f" ({head})"
    for split in ("unseen", "seen"):
        rows = report[split]
        lines += [f"## Oracle pass rate, {split} prompts ({config['eval_prompts']} prompts at most, "
                  f"{config['eval_per_prompt']} images each alone; best {config['served_k']} of "
                  f"{config['served_per_prompt']} when served)", "",
                  "| row | overall | count | color | background | combination | fidelity FD | diversity | what |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in ordered_rows(rows):
            r = rows[row]
            fd = report["fidelity"][split].get(row)
            div = report["diversity"][split].get(row)
            lines.append(f"| {row} | {_f(r['overall'])} | " + " | ".join(_f(r.get(c)) for c in
                                                                          ("count", "color", "background",
                                                                           "combination"))
                         + f" | {_f(fd, 4)} | {_f(div, 4)} | {meaning(row)}{same_run.get(row, '')} |")
        lines.append("")
    if plots.get("pass_rates"):
        lines += [f"![pass rates]({plots['pass_rates']})", ""]
    if plots.get("categories"):
        lines += [f"![unseen pass rate per category]({plots['categories']})", ""]
    lines += ["## Reward model", ""]
    for row in report["reward_model"]["per_cycle"]:
        lines.append(f"- cycle {row['cycle']}: {row.get('version')} ({row.get('state')}); held-out preference "
                     f"accuracy {_f(row.get('held_out_accuracy'))} vs CLIP score {_f(row.get('clip_score_accuracy'))} "
                     f"on {row.get('held_out_pairs')} pairs of held-out seen prompts")
    accuracy = report.get("preference_accuracy_unseen") or {}
    if accuracy:
        names = {"rejection_clip": "CLIP score", "rejection_reward": f"learned reward ({head})"}
        lines.append("- unseen prompts, pairs of a passing and a failing image of the base generator: " + ", ".join(
            f"{names.get(name, name)} {_f(v['accuracy'])} ({v['pairs']} pairs)" for name, v in accuracy.items()))
    lines += ["", "## Cycles", ""]
    for cycle in report["cycles"]:
        lines.append(f"- cycle {cycle['cycle']}: traffic {cycle['traffic_seconds']:.0f} s, nightly "
                     f"{cycle['nightly_seconds']:.0f} s ({cycle['nightly_outcome']}), candidate {cycle['candidate']}, "
                     f"live {cycle['live_before']} -> {cycle['live_after']}")
        tuned = cycle["nightly_stages"].get("finetune") or {}
        if tuned.get("method"):
            why = (f" ({tuned['fallback_because']})" if "fallback_because" in tuned else
                   " on the CLIP score (no reward model was live)" if tuned.get("reward_model") == "clip" else "")
            lines.append(f"  - tuned with {tuned['method']}{why}")
        for arm, stats in (cycle.get("thumbs") or {}).items():
            lines.append(f"  - the day's traffic, arm {arm}: {stats['votes']} votes, thumbs-up {stats['up_rate']:.3f}, "
                         f"oracle {stats['oracle_pass_rate']:.3f}")
        end = (cycle["nightly_stages"].get("publish") or {}).get("end")
        if end:  # the nightly job's last word: the canary it opened, or why it opened none
            lines.append(f"  - the nightly job: {end[1]}")
        for look in cycle["guardrail"]:
            lines.append(f"  - after {look['requests']} canary requests: {look.get('action')}: {look.get('reason')}")
        for arm, stats in (cycle.get("canary_thumbs") or {}).items():
            lines.append(f"  - canary traffic, arm {arm}: {stats['votes']} votes, thumbs-up {stats['up_rate']:.3f}, "
                         f"oracle {stats['oracle_pass_rate']:.3f}")
    for p in report.get("promotions", []):
        lines.append(f"- promotion in cycle {p['cycle']}: {p['promoted']} (seen {p['seen_pass']:.3f}, unseen "
                     f"{p['unseen_pass']:.3f}) replaced {p['replaced']} (seen {p['replaced_seen_pass']:.3f}, unseen "
                     f"{p['replaced_unseen_pass']:.3f}){': WORSE' if p['worse'] else ''}")
    lines.append("")
    if plots.get("guardrail"):
        lines += [f"![thumbs-up rate per arm during the canaries]({plots['guardrail']})", ""]
    if plots.get("training"):
        lines += [f"![training curves]({plots['training']})", ""]
    if report.get("grids"):
        lines += ["## Images, base (upper row of each pair) vs tuned, the same seeds (unseen prompts)", ""]
        lines += [f"- {row}: ![{row}]({name})" for row, name in report["grids"].items()]
        lines.append("")
    lines += ["The figures are in `experiment.json` beside this file; the config:", "", "```",
              json.dumps(config, indent=1), "```", ""]
    return "\n".join(lines)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _plot_pass_rates(report: dict, path: Path):
    import matplotlib.pyplot as plt

    rows = ordered_rows(report["unseen"])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    for offset, split in ((-0.2, "seen"), (0.2, "unseen")):
        ax.bar(x + offset, [report[split].get(r, {}).get("overall") or 0 for r in rows], 0.4, label=split)
    ax.set_xticks(x, rows, rotation=45, ha="right")
    ax.set_ylabel("oracle pass rate")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("pass rate by generator (and as served)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _plot_categories(report: dict, path: Path):
    import matplotlib.pyplot as plt

    rows = ordered_rows(report["unseen"])
    categories = ("count", "color", "background", "combination")
    x = np.arange(len(categories))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, row in enumerate(rows):
        ax.bar(x + (i - len(rows) / 2) * width, [report["unseen"][row].get(c) or 0 for c in categories], width,
               label=row)
    ax.set_xticks(x, categories)
    ax.set_ylabel("oracle pass rate, unseen prompts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _plot_guardrail(report: dict, path: Path):
    """Cumulative thumbs-up rate of each arm over the canary traffic, read from traffic.json."""
    import matplotlib.pyplot as plt

    traffic_file = path.parent / "traffic.json"
    if not traffic_file.is_file():
        return None
    votes = [v for v in json.loads(traffic_file.read_text())["votes"] if v["phase"].endswith("-canary")]
    if not votes:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for phase in sorted({v["phase"] for v in votes}):
        for arm in sorted({v["arm"] for v in votes if v["phase"] == phase}):
            rows = [v for v in votes if v["phase"] == phase and v["arm"] == arm]
            t = [v["t"] for v in rows]
            up = np.cumsum([v["vote"] == "up" for v in rows]) / np.arange(1, len(rows) + 1)
            ax.plot(t, up, label=f"{phase} arm {arm} ({rows[0]['adapter']})")
    for cycle in report["cycles"]:
        for look in cycle["guardrail"]:
            if look.get("action") not in (None, "none"):
                ax.axvline(look["t"], color="gray", linestyle="--")
                ax.annotate(look["action"], (look["t"], 0.05), rotation=90, fontsize=7)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("thumbs-up rate so far")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _read_jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot_training(report: dict, path: Path):
    import matplotlib.pyplot as plt

    curves = []  # (title, label, steps, values)
    for cycle in report["cycles"]:
        folder = Path(cycle["nightly_folder"])
        reward_rows = _read_jsonl(folder / "reward" / "metrics.jsonl")
        if reward_rows:
            curves.append(("reward model loss", f"cycle {cycle['cycle']}", [r["step"] for r in reward_rows],
                           [r["loss"] for r in reward_rows]))
        tune_rows = _read_jsonl(folder / "finetune" / "metrics.jsonl")
        if tune_rows:
            curves.append(("fine-tuning loss", f"cycle {cycle['cycle']}", [r["step"] for r in tune_rows],
                           [r["loss"] for r in tune_rows]))
            if "reward" in tune_rows[0]:
                curves.append(("fine-tuning reward", f"cycle {cycle['cycle']}", [r["step"] for r in tune_rows],
                               [r["reward"] for r in tune_rows]))
    for method, run in (report.get("methods") or {}).items():
        rows = _read_jsonl(Path(run["metrics_jsonl"]))
        if rows:
            curves.append(("fine-tuning loss", method, [r["step"] for r in rows], [r["loss"] for r in rows]))
    if not curves:
        return None
    titles = list(dict.fromkeys(c[0] for c in curves))
    fig, axes = plt.subplots(1, len(titles), figsize=(4 * len(titles), 3.5), squeeze=False)
    for ax, title in zip(axes[0], titles):
        for _, label, steps, values in (c for c in curves if c[0] == title):
            ax.plot(steps, values, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
