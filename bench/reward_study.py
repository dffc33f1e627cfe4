"""Reward reached by PPO over many seeds: ours (as configured, and with any overrides) against TRL 1.12.0.

`bench/run.py` measures speed on 3 runs; the reward a run reaches scatters by about 0.1 between seeds,
so 3 runs cannot tell whether two implementations reach the same reward. This runs N seeds of each arm
on the SFT policy and reward model `make reward` built for bench/tiny.yaml, with bench/run.py's PPO
settings, scores every final policy with bench/eval_policy.py, and reports each arm's mean with its
standard error and each arm's difference from TRL with a 95% interval. Several runs at a time
(`--parallel`) suit a GPU or a many-core machine; speed is not measured here.

    .venv/bin/python bench/reward_study.py --seeds 10 --parallel 2 \\
        --arm ours --arm at_eos:stages.ppo.score_after_eos=false --arm trl

An arm is `trl`, or `NAME[:override ...]` for our stage with those overrides (space-separated
`key=value`). Results: <out>/reward-study.json and a markdown table on stdout and in <out>/reward-study.md.
Seeds already done in <out> are read back, not rerun. Every run imports the project as installed, which
for the repository's editable install is the working tree (ahead of PYTHONPATH): do not change the code
while a study runs, or its later seeds measure something else.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: the settings, environment and artifact lookup)
from common import difference, mean_se  # noqa: E402

ROOT = bench.ROOT


def parse_arm(text: str) -> tuple[str, list[str]]:
    """`NAME[:override ...]` -> (NAME, [override, ...])."""
    name, _, overrides = text.partition(":")
    return name, overrides.split()


def one_run(arm: str, overrides: list[str], seed: int, a, sft: Path, reward: Path) -> dict:
    """Train one seed of one arm and evaluate its policy; the run's result.json with "eval" added."""
    d = a.out / f"{arm}-{seed}"
    if (d / "eval.json").exists():
        return {**json.loads((d / "result.json").read_text()), "eval": json.loads((d / "eval.json").read_text())}
    r = bench.ppo_run("trl" if arm == "trl" else "ours", seed, d, bench.SETTINGS["full"], sft, reward, a.threads,
                      (d / "train.log", d / "eval.log"), pythons=(a.ours_python, a.trl_python), overrides=overrides)
    for f in Path(r["policy_dir"]).glob("*.safetensors"):  # weights are not needed once scored
        f.unlink()
    bench.log(f"{arm} seed {seed}: reward {r['eval']['reward']:.3f}, gold {r['eval']['gold']:.3f}")
    return r


def report(results: dict[str, list[dict]], arms: dict[str, list[str]]) -> str:
    """A markdown table: per arm, reward and gold judge as mean +- s.e., and the difference from TRL."""
    lines = ["| arm | overrides | seeds | reward (mean +- s.e.) | reward - TRL [95%] | gold (mean +- s.e.) | gold - TRL [95%] |",
             "|---|---|---|---|---|---|---|"]
    base = results.get("trl")
    for name, rs in results.items():
        cells = [name, " ".join(arms[name]) or "-", str(len(rs))]
        for key in ("reward", "gold"):
            xs = [r["eval"][key] for r in rs]
            m, se = mean_se(xs)
            cells.append(f"{m:.3f} +- {se:.3f}")
            if base and name != "trl":
                d, lo, hi = difference(xs, [r["eval"][key] for r in base])
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", help="trl, or NAME[:override ...] for our stage (repeatable)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds per arm")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", default="bench/out/reward-study")
    ap.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--trl-python", default=str(ROOT / "bench" / ".venv" / "bin" / "python"))
    ap.add_argument("--report-only", action="store_true", help="summarise the runs already in --out, run nothing")
    a = ap.parse_args()
    a.out = Path(a.out).resolve()  # the runs' working directory is the repository root
    arms = dict(parse_arm(t) for t in (a.arm or ["ours", "trl"]))
    if a.report_only:
        results = {name: [{"eval": json.loads((d / "eval.json").read_text())}
                          for d in sorted(a.out.glob(f"{name}-*")) if (d / "eval.json").exists()] for name in arms}
        print(report({k: v for k, v in results.items() if v}, arms))
        return
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / bench.SETTINGS["full"]["config"])
    store = ROOT / cfg.store
    if not (store / "aliases" / cfg.name / "reward").exists():
        bench.run(["make", "-s", "reward", f"CONFIG={bench.SETTINGS['full']['config']}"], a.threads,
                  a.out / "upstream.log")
    sft, reward = bench.artifact(store, cfg.name, "sft"), bench.artifact(store, cfg.name, "reward")
    # seed-major, so every arm advances together and a study cut short stays balanced
    jobs = [(name, seed) for seed in range(a.first_seed, a.first_seed + a.seeds) for name in arms]
    with ThreadPoolExecutor(a.parallel) as pool:
        done = list(pool.map(lambda job: one_run(job[0], arms[job[0]], job[1], a, sft, reward), jobs))
    results = {name: [r for (n, _), r in zip(jobs, done) if n == name] for name in arms}
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward-study.json").write_text(json.dumps({"arms": arms, "results": results}, indent=1, default=str))
    text = report(results, arms)
    (out / "reward-study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
