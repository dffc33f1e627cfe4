"""The experiment report: metrics and plots from the artifact store -> reports/<experiment>/report.md.

Everything is read from the artifacts the experiment's aliases point at (manifests and the
metrics.jsonl each artifact carries), so a report can be drawn on any machine that sees the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "sft", "reward", "ppo")


def _rows(art: Path) -> list[dict]:
    path = art / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def collect(store, experiment: str, stage_names=STAGES) -> tuple[dict[str, dict], list[str]]:
    """({stage: {"key", "manifest", "rows"}}, [missing stages]) for an experiment's aliases."""
    found, missing = {}, []
    for name in stage_names:
        key = store.alias(experiment, name)
        if key is None or not store.exists(key):
            missing.append(name)
            continue
        art = store.local_dir(key)
        found[name] = {"key": key, "manifest": store.manifest(key), "rows": _rows(art)}
    return found, missing


def _plot(path: Path, panels: list[tuple[str, list[tuple[str, list, list]]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(store, experiment: str, out_dir: Path) -> tuple[Path, list[str], list[str]]:
    """Write report.md and its PNG plots. Returns (report path, plots written, missing stages)."""
    found, missing = collect(store, experiment)
    if not found:
        raise FileNotFoundError(
            f"experiment {experiment!r} has no artifacts in {store.url} (missing: {', '.join(missing)}); "
            "run `make pipeline` first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    md = [f"# Report: {experiment}", "", f"Store: `{store.url}`", ""]
    if missing:
        md += [f"**Missing stages:** {', '.join(missing)} (not run yet for this experiment).", ""]

    md += ["## Stages", "", "| stage | key | seconds | headline |", "|---|---|---|---|"]
    for name, info in found.items():
        md.append(f"| {name} | `{info['key']}` | {info['manifest'].get('seconds', '')} | {headline(name, info['manifest']['metrics'])} |")
    md.append("")

    loss_panels = []
    for name, info in found.items():
        xs, ys = _series(info["rows"], "loss")
        if xs:
            loss_panels.append((f"{name} loss", [(name, xs, ys)]))
    if loss_panels:
        plots.append("losses.png")
        _plot(out_dir / "losses.png", loss_panels, "Training loss per stage")
        md += ["## Training losses", "", "![losses](losses.png)", ""]

    if "reward" in found:
        m = found["reward"]["manifest"]["metrics"]
        sources = [k.removeprefix("accuracy_") for k in m if k.startswith("accuracy_")]
        plots.append("reward_accuracy.png")
        _bar(out_dir / "reward_accuracy.png", sources, [m[f"accuracy_{s}"] for s in sources],
             "held-out pairwise accuracy", "Reward model agreement with the gold judge")
        md += ["## Reward model", "", "![reward accuracy](reward_accuracy.png)", "",
               *(f"- {s}: accuracy {m[f'accuracy_{s}']:.3f} on {m.get(f'eval_pairs_{s}', '?')} pairs, "
                 f"mean margin {m.get(f'margin_{s}', float('nan')):.3f}" for s in sources), ""]

    if "ppo" in found:
        rows, m = found["ppo"]["rows"], found["ppo"]["manifest"]["metrics"]
        panels = [(label, [(label, *_series(rows, key))]) for key, label in (
            ("env/score", "score"), ("env/kl", "KL to reference"), ("env/response_length", "response length"),
            ("env/eos_rate", "EOS rate"))]
        plots.append("ppo_training.png")
        _plot(out_dir / "ppo_training.png", panels, "PPO rollouts")
        gold_x, gold_y = _series(rows, "eval/gold")
        kl_x, kl_y = _series(rows, "eval/kl")
        points = [(0.0, m["gold_sft"])] + list(zip(kl_y, gold_y))
        labels = ["SFT"] + [f"step {int(s)}" for s in gold_x]
        plots.append("gold_vs_kl.png")
        _scatter(out_dir / "gold_vs_kl.png", [p[0] for p in points], [p[1] for p in points], labels,
                 "KL to the SFT policy (nats per response)", "gold judge (VADER)", "Over-optimisation curve")
        md += ["## PPO", "", "![ppo training](ppo_training.png)", "", "![gold vs kl](gold_vs_kl.png)", "",
               *sft_vs_ppo(m)]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return out_dir / "report.md", plots, missing


def _bar(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868"][: len(labels)])
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scatter(path: Path, xs, ys, labels: list[str], xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.plot(xs, ys, "-o", alpha=0.8)
    # Points are joined in step order, so the labels tell which way the run went.
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -11), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sft_vs_ppo(m: dict[str, Any]) -> list[str]:
    """The before/after table and side-by-side samples of a PPO manifest's metrics."""
    lines = ["### SFT vs PPO on held-out prompts", "",
             f"{m.get('eval_prompts', '?')} prompts; gain = PPO - SFT with a paired-bootstrap 95% interval.", "",
             "| metric | SFT | PPO | gain (95% CI) |", "|---|---|---|---|"]
    for name, label in (("gold", "gold judge (VADER)"), ("heldout", "held-out judge (TextBlob)"),
                        ("fluency", "fluency (dictionary words)")):
        if f"{name}_sft" in m:
            lo, hi = m[f"{name}_gain_ci"]
            lines.append(f"| {label} | {m[f'{name}_sft']:.3f} | {m[f'{name}_ppo']:.3f} | "
                         f"{m[f'{name}_gain']:+.3f} ({lo:+.3f}, {hi:+.3f}) |")
    lines.append(f"| KL to SFT (nats) | 0 | {m.get('kl', float('nan')):.2f} | |")
    lines += ["", "### Samples", "", "| prompt | SFT | PPO |", "|---|---|---|"]
    for s in m.get("samples", []):
        cells = [s["prompt"], s["sft"], s["ppo"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return lines + [""]


def headline(stage: str, m: dict[str, Any]) -> str:
    """The numbers a person looks at first, per stage."""
    def f(key, fmt="{:.3g}"):
        return fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "?"

    if stage == "pretrain":
        return f"perplexity {f('perplexity')} (unigram {f('unigram_perplexity')}, untrained {f('perplexity_before')})"
    if stage == "sft":
        return f"perplexity {f('perplexity')}, EOS rate {f('eos_rate', '{:.2f}')}"
    if stage == "reward":
        parts = [f"{k.removeprefix('accuracy_')} {m[k]:.3f}" for k in m if k.startswith("accuracy_")]
        return "accuracy " + ", ".join(parts)
    if stage == "ppo":
        return (f"gold {f('gold_sft')} -> {f('gold_ppo')}, held-out {f('heldout_sft')} -> {f('heldout_ppo')}, "
                f"KL {f('kl')}, fluency {f('fluency_sft')} -> {f('fluency_ppo')}")
    return ""
