"""The experiment report: metrics and plots from the artifact store -> reports/<experiment>/report.md.

Everything is read from the artifacts the experiment's aliases point at (manifests and the
metrics.jsonl each artifact carries), so a report can be drawn on any machine that sees the store.
This module knows no stage by name: each stage class writes its own section (`Stage.report_section`)
with the building blocks below (plots, the shared policy-evaluation tables).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf")

JUDGE_LABELS = {"gold": "gold judge", "heldout": "held-out judge", "task": "task success"}
"""How the report names the judge roles every experiment's evaluation knows (`rlhf.schema.EvalConfig.judges`);
an experiment's own roles (`fluency`, `tone`, ...) appear under their own names, after these."""


def ordered_roles(roles) -> list[str]:
    """Judge roles in report order: those of `JUDGE_LABELS` first, in its order; any other after them by name."""
    known = list(JUDGE_LABELS)
    return sorted(roles, key=lambda r: (known.index(r) if r in known else len(known), r))


@dataclass
class StageReport:
    """What a stage's report section can read: its artifact's manifest, its logged rows, where plots go."""

    name: str
    key: str
    manifest: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    out_dir: Path = Path(".")
    plots: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def plot(self, filename: str, panels: list[tuple[str, list[tuple[str, list, list]]]], title: str) -> str:
        """Line plots side by side (`lines_plot`), written into the report directory; returns the markdown."""
        lines_plot(self.out_dir / filename, panels, title)
        self.plots.append(filename)
        return f"![{title}]({filename})"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged metric."""
        pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]


def _rows(art: Path) -> list[dict]:
    path = art / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(store, experiment: str, stage_names) -> tuple[dict[str, dict], list[str]]:
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


def write_report(store, experiment, out_dir: Path) -> tuple[Path, list[str], list[str]]:
    """Write report.md and its PNG plots for a loaded experiment. Returns (path, plots, missing stages)."""
    from rlhf.pipeline import stage_order

    name = experiment.name
    found, missing = collect(store, name, stage_order(experiment))
    if not found:
        raise FileNotFoundError(
            f"experiment {name!r} has no artifacts in {store.url} (missing: {', '.join(missing)}); "
            "run `make pipeline` first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    md = [f"# Report: {name}", "", f"Store: `{store.url}`", ""]
    if missing:
        md += [f"**Missing stages:** {', '.join(missing)} (not run yet for this experiment).", ""]

    md += ["## Stages", "", "| stage | key | seconds | headline |", "|---|---|---|---|"]
    for stage, info in found.items():
        m = info["manifest"]
        md.append(f"| {stage} | `{info['key']}` | {m.get('seconds', '')} | {m.get('headline', '')} |")
    md.append("")

    loss_panels = []
    for stage, info in found.items():
        xs, ys = StageReport(stage, info["key"], info["manifest"], info["rows"]).series("loss")
        if xs:
            loss_panels.append((f"{stage} loss", [(stage, xs, ys)]))
    if loss_panels:
        plots.append("losses.png")
        lines_plot(out_dir / "losses.png", loss_panels, "Training loss per stage")
        md += ["## Training losses", "", "![losses](losses.png)", ""]

    sections = {}
    for stage, info in found.items():
        cls = experiment.stages[stage].cls
        section = sections[stage] = StageReport(stage, info["key"], info["manifest"], info["rows"], out_dir)
        lines = cls.report_section(section)
        plots += section.plots
        if lines:
            md += [f"## {stage}", "", *lines, ""]
    compared = [s for s in sections.values() if "gold_gain" in s.metrics]
    if len(compared) > 1:
        md += ["## Comparison of the alignment methods", "", *comparison(compared, out_dir), ""]
        plots.append("frontier.png")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return out_dir / "report.md", plots, missing


def comparison(sections: list[StageReport], out_dir: Path) -> list[str]:
    """Every policy stage against its reference in one table per decoding (sampled, greedy), and gold
    against KL with each one's trajectory over training (Gao et al.'s over-optimisation frontier, one
    line per method). The judge roles are those every section has, in `ordered_roles` order."""
    lines = ["Each method against the reference it started from, on the same held-out prompts and seed "
             "(gain with its paired-bootstrap 95% interval). A gain counts only with task success kept and "
             "no collapse."]
    for mode, prefix in (("sampled", ""), ("greedy", "greedy_")):
        roles = ordered_roles(k[len(prefix):-len("_gain")] for k in sections[0].metrics
                              if k.startswith(prefix) and k.endswith("_gain") and (prefix or not k.startswith("greedy_"))
                              and all(k in s.metrics for s in sections))
        if not roles:
            continue
        kl = " KL |" if mode == "sampled" else ""
        lines += ["", f"{mode.capitalize()} responses:", "",
                  "| method | " + " | ".join(f"{JUDGE_LABELS.get(r, r)} gain" for r in roles)
                  + f" |{kl} unique responses | distinct-2 | repetition | EOS rate | most common opening |",
                  "|---" * (len(roles) + 6 + bool(kl)) + "|"]
        for s in sections:
            m = s.metrics
            gains = [f"{m[f'{prefix}{r}_gain']:+.3f} ({m[f'{prefix}{r}_gain_ci'][0]:+.3f}, "
                     f"{m[f'{prefix}{r}_gain_ci'][1]:+.3f})" for r in roles]
            shifts = [f"{_fmt(m.get(f'{prefix}{k}_ref'))} -> {_fmt(m.get(f'{prefix}{k}'))}"
                      for k in ("unique_share", "distinct_2", "repetition", "eos_rate", "opening_top_share")]
            kl_cell = f" {_fmt(m.get('kl'))} |" if kl else ""
            lines.append(f"| {s.name} | " + " | ".join(gains) + f" |{kl_cell} " + " | ".join(shifts) + " |")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for s in sections:
        steps, kls = s.series("eval/kl")
        _, golds = s.series("eval/gold")
        xs, ys = [0.0, *kls[: len(golds)]], [s.metrics["gold_ref"], *golds[: len(kls)]]
        if s.metrics.get("kl") is not None:
            xs.append(s.metrics["kl"])
            ys.append(s.metrics["gold"])
        ax.plot(xs, ys, "-o", alpha=0.85, label=s.name)
    ax.set_xlabel("KL to the reference policy (nats per response)")
    ax.set_ylabel("gold judge (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Gold judge against KL over training, per method", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=110)
    plt.close(fig)
    return lines + ["", "![gold against KL per method](frontier.png)"]


# ---- building blocks for the stages' sections --------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lines_plot(path: Path, panels: list[tuple[str, list[tuple[str, list, list]]]], title: str) -> None:
    """One panel per (y label, [(line label, steps, values)]), side by side."""
    plt = _pyplot()
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


def bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    """Bars in [0, 1] with a chance line at 0.5 (accuracies)."""
    plt = _pyplot()
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


def overoptimisation_plot(section: StageReport, filename: str = "overoptimisation.png") -> str:
    """Gold judge and task success against KL to the reference over training (Gao et al. 2022).

    Points are the periodic evaluations (`eval/*` rows) and the final one, joined in step order and
    starting from the reference at KL 0, so the point where the policy starts gaming the reward model
    (KL still rising, gold falling) shows. Returns the markdown that links the plot.
    """
    m = section.metrics
    steps, kls = section.series("eval/kl")
    curves = {}
    for role in ("gold", "task"):
        if f"{role}_ref" not in m:
            continue
        xs, ys = section.series(f"eval/{role}")
        curves[role] = [m[f"{role}_ref"], *[y for x, y in zip(xs, ys) if x in steps]]
    if not curves:
        return ""
    points = [0.0, *kls]
    labels = ["start", *[f"step {int(s)}" for s in steps]]
    if m.get("kl") is not None and (not kls or abs(kls[-1] - m["kl"]) > 1e-9):
        points.append(m["kl"])
        labels.append("final")
        for role in curves:
            curves[role].append(m.get(role, float("nan")))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for role, ys in curves.items():
        ax.plot(points[: len(ys)], ys, "-o", alpha=0.85, label=JUDGE_LABELS.get(role, role))
    for x, y, label in zip(points, curves.get("gold", []), labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -11), fontsize=7)
    ax.set_xlabel("KL to the reference policy (nats per response)")
    ax.set_ylabel("held-out score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Over-optimisation: gold judge and task success against KL", fontsize=10)
    fig.tight_layout()
    fig.savefig(section.out_dir / filename, dpi=110)
    plt.close(fig)
    section.plots.append(filename)
    return f"![gold and task success against KL]({filename})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def evaluation_table(m: dict[str, Any]) -> list[str]:
    """The shared evaluation of one policy on its own (no reference): judges, diversity, length."""
    n = m.get("eval_prompts", "?")
    lines = [f"Shared evaluation on {n} held-out prompts (sampled at the evaluation temperature; greedy).", "",
             "| metric | sampled | greedy |", "|---|---|---|"]
    for key, label in _evaluation_rows(m):
        lines.append(f"| {label} | {_fmt(m.get(key))} | {_fmt(m.get('greedy_' + key))} |")
    return lines + [""]


_MEASURES = [("unique_share", "unique responses (share)"), ("top_share", "most common response (share)"),
             ("template_top_share", "most common frame, prompt's words blanked (share)"),
             ("opening_top_share", "most common opening, first two words (share)"),
             ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
             ("repetition", "words repeated within a response (seq-rep-1)"), ("response_length", "length (tokens)"),
             ("eos_rate", "EOS rate")]
"""What the evaluation measures of every policy beside its judges (`rlhf.evaluation.summarize`), as reported."""


def _evaluation_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    roles = ordered_roles(k[: -len("_gain")] for k in m if k.endswith("_gain") and not k.startswith("greedy_"))
    if not roles:  # a policy without a reference: the judge roles are the means both decodings have
        measures = {k for k, _ in _MEASURES}
        roles = ordered_roles(k for k, v in m.items() if isinstance(v, (int, float)) and f"greedy_{k}" in m
                              and not k.startswith("greedy_") and k not in measures) or [r for r in JUDGE_LABELS if r in m]
    return [(r, JUDGE_LABELS.get(r, r)) for r in roles] + _MEASURES


def comparison_table(m: dict[str, Any], before: str, after: str) -> list[str]:
    """The policy against its reference on the same prompts: every judge, sampled and greedy, with the
    paired-bootstrap 95% interval of the gain; diversity, length and KL beside them."""
    n = m.get("eval_prompts", "?")
    lines = [f"{n} held-out prompts, the same for both; gain = {after} - {before} with a paired-bootstrap "
             "95% interval. A gain counts only with task success kept and no collapse (unique responses).", "",
             f"| metric | decoding | {before} | {after} | gain (95% CI) |", "|---|---|---|---|---|"]
    for key, label in _evaluation_rows(m):
        for prefix, mode in (("", "sampled"), ("greedy_", "greedy")):
            if prefix + key not in m:
                continue
            gain = ""
            if prefix + key + "_gain" in m:
                lo, hi = m[prefix + key + "_gain_ci"]
                gain = f"{m[prefix + key + '_gain']:+.3f} ({lo:+.3f}, {hi:+.3f})"
            lines.append(f"| {label} | {mode} | {_fmt(m.get(prefix + key + '_ref'))} | {_fmt(m[prefix + key])} "
                         f"| {gain} |")
    lines.append(f"| KL to {before} (nats per response) | sampled | 0 | {_fmt(m.get('kl'))} | |")
    return lines + [""]


def samples_table(samples: list[dict[str, str]], columns: list[tuple[str, str]]) -> list[str]:
    """Samples side by side: `columns` are (key in each sample, column header)."""
    columns = [(k, h) for k, h in columns if any(k in s for s in samples)]
    if not samples or not columns:
        return []
    lines = ["| prompt | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for s in samples:
        lines.append("| " + " | ".join(_cell(str(s.get(k, ""))) for k in ["prompt", *[k for k, _ in columns]]) + " |")
    return lines + [""]


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def fmt(m: dict[str, Any], key: str, spec: str = "{:.3g}") -> str:
    """A metric for a headline: formatted, or '?' when the manifest lacks it."""
    return spec.format(m[key]) if isinstance(m.get(key), (int, float)) else "?"
