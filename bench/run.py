"""`make bench`: our stages against their peers, in one run; writes bench/RESULTS.md.

1. Pipeline: wall time of `make pipeline` from an empty store, then of a rerun with nothing changed.
2. PPO: our PPO stage vs TRL 1.12.0's PPOTrainer (bench/.venv) on the SFT policy and reward model that
   pipeline built, with the same prompts and hyperparameters, interleaved; every final policy scored by
   one script (bench/eval_policy.py) on the same held-out prompts.
3. SFT: our SFT stage vs a plain trl.SFTTrainer script on the pretrain model, interleaved.
4. GRPO: our GRPO stage vs TRL's GRPOTrainer (the project's own TRL) on the SFT policy pipeline built,
   rewarded by the task's check (uses_word), with the same prompts and settings, interleaved over seeds;
   every final policy scored by one script (bench/eval_task.py) on the same held-out prompts; our stage
   also with `sampler: multinomial` (TRL's sampler, and our default until 2026-12-06), `sampler: gumbel`
   (our default until 2026-12-07) and `shared_prefill: false`.
5. GRPO on SmolLM2-135M-Instruct (`make smol` converts it): the same comparison with LoRA, a few steps.
   PPO on SmolLM2 (`smol_ppo`: LoRA on the policy, the value model from the smol experiment's reward
   model, which `make smol` builds; bench/README.md): section 2's comparison, a few steps.
6. Rollout engines (where `make vllm-setup` made .venv-vllm): `generate` against vLLM (bench/engines.py).
7. DPO and KTO: our stages with the model's own logits against the same stages with TRL's fused LM head
   (what a DPOTrainer or KTOTrainer script runs on a CPU), on the SFT policy and preferences pipeline built,
   interleaved (bench/pairs_bench.py).

Each run is its own process, so peak resident memory is per run. Benchmarks, never tests: nothing here
asserts a speed. `--quick` runs the same steps at a size that finishes in minutes (bench/quick.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS_PY = ROOT / ".venv" / "bin" / "python"
TRL_PY = ROOT / "bench" / ".venv" / "bin" / "python"
DEV_NOTES = "## Measured during development"
SECTIONS = ["pipeline", "ppo", "sft", "grpo", "smol_grpo", "smol_ppo", "engines", "pairs"]
sys.path.insert(0, str(ROOT / "bench"))
from common import difference, mean_se, ratio  # noqa: E402

SETTINGS = {
    # PPO: the hyperparameters of configs/tiny.yaml's ppo block, for fewer steps than its 120
    "full": {"config": "bench/tiny.yaml", "runs": 3, "eval_prompts": 256,
             "ppo": {"steps": 30, "batch": 64, "minibatches": 4, "epochs": 4, "response-length": 32,
                     "kl-coef": 0.05, "temperature": 1.0, "lr": 3e-4},
             # our stage again with transformers' own sampler (TRL's), with the Gumbel-max sampler (our default
             # until 2026-12-07), and with the rollout scored by a forward pass (TRL's way, our default until
             # 2026-12-07) instead of the sampler's logprobs
             "ppo_variants": {"ours, sampler multinomial": ["stages.ppo.sampler=multinomial"],
                              "ours, sampler gumbel": ["stages.ppo.sampler=gumbel"],
                              "ours, sampler_logprobs false": ["stages.ppo.sampler_logprobs=false"]},
             "sft": {"steps": 60, "batch": 32, "max-length": 128, "lr": 1e-3, "warmup": 20},
             # GRPO: configs/tiny-rlvr.yaml's grpo block (8 prompts x 8 responses, 80 steps at 3e-4)
             "grpo_runs": 3,
             # its reward: every held-out prompt, 4 samples each (one sample of 256 left ~0.03 of noise per run)
             "grpo_eval_prompts": 512, "grpo_eval_samples": 4,
             "grpo": {"reward": "uses_word", "steps": 80, "prompts-per-step": 8, "group-size": 8, "minibatches": 2,
                      "epochs": 1, "response-length": 32, "temperature": 1.0, "lr": 3e-4, "beta": 0.04,
                      "loss": "sequence_mean", "estimator": "grpo"},
             # our stage again with transformers' own sampler (TRL's) and with the Gumbel-max sampler (our default
             # until 2026-12-07), beside our default (rlhf.sampling.InverseCDF), and with each row prefilling its
             # own copy of its prompt (shared_prefill false, the default until 2026-12-07)
             "grpo_variants": {"ours, sampler multinomial": ["stages.grpo.sampler=multinomial"],
                               "ours, sampler gumbel": ["stages.grpo.sampler=gumbel"],
                               "ours, shared_prefill false": ["stages.grpo.shared_prefill=false"]},
             # GRPO on SmolLM2-135M-Instruct (make smol): configs/smol.yaml's grpo block (LoRA r 16 on every
             # linear layer, 8 prompts x 4 responses of at most 48 tokens at temperature 0.7, one minibatch),
             # float32 on both sides, the task check as the reward; a few steps, to time them
             "smol_grpo_runs": 2, "smol_grpo_eval_prompts": 64,
             # the default reuses the rollout's forward here (one minibatch of one epoch); the variant runs two
             # (the sampler's logprobs, which would stand in for the first, off too); and the defaults until
             # 2026-12-07: the Gumbel-max sampler, each row prefilling its own copy of its prompt
             "smol_grpo_variants": {"ours, reuse_rollout_forward false": ["stages.grpo.reuse_rollout_forward=false",
                                                                          "stages.grpo.sampler_logprobs=false",
                                                                          "stages.grpo.share_prompts=false"],
                                    "ours, sampler gumbel, shared_prefill false": [
                                        "stages.grpo.sampler=gumbel", "stages.grpo.shared_prefill=false"]},
             "smol_grpo": {"reward": "uses_word", "steps": 5, "prompts-per-step": 8, "group-size": 4,
                           "minibatches": 1, "epochs": 1, "response-length": 48, "temperature": 0.7, "lr": 3e-4,
                           "beta": 0.04, "loss": "sequence_mean", "estimator": "grpo", "lora-r": 16,
                           "lora-alpha": 32},
             # PPO on SmolLM2-135M-Instruct: configs/smol.yaml's ppo block (LoRA r 16 on the policy's linear layers,
             # the value model from the smol reward model, every weight trained; 32 prompts, 2 minibatches, 2
             # epochs, 48 tokens at temperature 0.7), fp32 on both sides (no bfloat16 sampling: TRL samples in the
             # training precision), one learning rate for policy and value (TRL has one); a few steps, to time them
             "smol_ppo_runs": 2, "smol_ppo_eval_prompts": 64,
             "smol_ppo": {"steps": 4, "batch": 32, "minibatches": 2, "epochs": 2, "response-length": 48,
                          "kl-coef": 0.05, "temperature": 0.7, "lr": 3e-4, "lora-r": 16, "lora-alpha": 32},
             # DPO and KTO: configs/compare.yaml's blocks (32 pairs, 64 unpaired answers a step), fewer steps
             "pairs": {"dpo": {"steps": 100, "batch": 32, "lr": 1e-4}, "kto": {"steps": 100, "batch": 64, "lr": 1e-4}},
             # one more run of ours (defaults) and TRL per section, this many steps, with the matrix arithmetic counted
             "flop_steps": {"ppo": 10, "grpo": 20, "smol_ppo": 2}},
    "quick": {"config": "bench/quick.yaml", "runs": 3, "eval_prompts": 64,
              "ppo": {"steps": 3, "batch": 32, "minibatches": 4, "epochs": 4, "response-length": 32,
                      "kl-coef": 0.05, "temperature": 1.0, "lr": 3e-4},
              "sft": {"steps": 10, "batch": 32, "max-length": 128, "lr": 1e-3, "warmup": 2},
              "grpo_runs": 2,
              "grpo": {"reward": "uses_word", "steps": 3, "prompts-per-step": 4, "group-size": 8, "minibatches": 2,
                       "epochs": 1, "response-length": 32, "temperature": 1.0, "lr": 3e-4, "beta": 0.04,
                       "loss": "sequence_mean", "estimator": "grpo"},
              "grpo_variants": {"ours, sampler multinomial": ["stages.grpo.sampler=multinomial"]},
              "smol_grpo_runs": 1, "smol_grpo_eval_prompts": 8,
              "smol_grpo": {"reward": "uses_word", "steps": 1, "prompts-per-step": 4, "group-size": 4,
                            "minibatches": 1, "epochs": 1, "response-length": 16, "temperature": 0.7, "lr": 3e-4,
                            "beta": 0.04, "loss": "sequence_mean", "estimator": "grpo", "lora-r": 16,
                            "lora-alpha": 32},
              "smol_ppo_runs": 1, "smol_ppo_eval_prompts": 8,
              "smol_ppo": {"steps": 1, "batch": 8, "minibatches": 2, "epochs": 1, "response-length": 16,
                           "kl-coef": 0.05, "temperature": 0.7, "lr": 3e-4, "lora-r": 16, "lora-alpha": 32},
              "pairs": {"dpo": {"steps": 5, "batch": 32, "lr": 1e-4}, "kto": {"steps": 5, "batch": 64, "lr": 1e-4}},
              "flop_steps": {"ppo": 2, "grpo": 2, "smol_ppo": 1}},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env(threads: int) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if threads:
        e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = str(threads)
    return e


def run(cmd: list[str], threads: int, logfile: Path) -> float:
    """Run a command from the repository root, its output to `logfile`; seconds of wall time."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(" ".join(str(c) for c in cmd))
    t0 = time.perf_counter()
    with logfile.open("w") as f:
        rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(threads), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"bench: {cmd[0]} failed (exit {rc}); see {logfile}")
    return time.perf_counter() - t0


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def versions(py: Path, mods: list[str]) -> dict:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try:\n        return m.version(n)\n"
            "    except m.PackageNotFoundError:\n        return 'not installed'\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(py), "-c", code, *mods], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def shown(path: Path) -> str:
    """`path` relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def gpu(py: Path) -> str | None:
    """The GPU the runs will use (torch's name for CUDA device 0), or None."""
    code = "import torch; print(torch.cuda.get_device_name(0) + ', CUDA ' + torch.version.cuda if torch.cuda.is_available() else '')"
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.strip() or None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "os": platform.platform(),
            "python": platform.python_version()}


def artifact(store: Path, experiment: str, stage: str) -> Path:
    key = (store / "aliases" / experiment / stage).read_text().strip()
    return store / "artifacts" / key


def bench_pipeline(cfg: str, store: Path, threads: int, out: Path) -> dict:
    if store.exists():
        shutil.rmtree(store)
    cold = run(["make", "-s", "pipeline", f"CONFIG={cfg}"], threads, out / "logs" / "pipeline-cold.log")
    warm = run(["make", "-s", "pipeline", f"CONFIG={cfg}"], threads, out / "logs" / "pipeline-rerun.log")
    return {"cold_s": cold, "rerun_s": warm}


def eval_args(s: dict, reward: Path, key: str = "ppo") -> list:
    """bench/eval_policy.py's arguments after `--policy`: the held-out prompts, length and temperature of section
    `key` (ppo, smol_ppo) of `s`."""
    return ["--reward", reward, "--prompts", "data/prompts/eval.jsonl.gz",
            "--num-prompts", s.get(f"{key}_eval_prompts", s["eval_prompts"]),
            "--response-length", s[key]["response-length"], "--temperature", s[key]["temperature"]]


def ppo_run(fw: str, seed: int, d: Path, s: dict, sft: Path, reward: Path, threads: int, logs: tuple[Path, Path],
            pythons: tuple[Path, Path] | None = None, overrides: list[str] = (), count_flops: bool = False,
            key: str = "ppo") -> dict:
    """Train one PPO run (`fw`: ours or trl) with the settings `s[key]` into `d`, then score its final policy.

    Returns the run's result.json with bench/eval_policy.py's result under "eval". `logs` are the training
    and evaluation logs; `pythons` the (ours, TRL) interpreters, by default those of this run of bench/run.py;
    `overrides` go to our stage (`--set`). `count_flops`: count the matrix arithmetic instead (`--count-flops`,
    its "gflop"), and score nothing.
    """
    ours_py, trl_py = pythons or (OURS_PY, TRL_PY)
    py, script = (ours_py, "bench/ppo_ours.py") if fw == "ours" else (trl_py, "bench/ppo_trl.py")
    if overrides and fw != "ours":
        raise ValueError(f"overrides are for our stage, not {fw}")
    run([py, script, "--policy", sft, "--reward", reward, "--prompts", "data/prompts/train.jsonl.gz",
         *flags(s[key]), "--threads", threads, "--seed", seed, "--out", d, "--json", d / "result.json",
         *(["--set", *overrides] if overrides else []), *(["--count-flops"] if count_flops else [])],
        threads, logs[0])
    r = json.loads((d / "result.json").read_text())
    if count_flops:
        return r
    run([ours_py, "bench/eval_policy.py", "--policy", r["policy_dir"], *eval_args(s, reward, key),
         "--json", d / "eval.json"],
        threads, logs[1])
    r["eval"] = json.loads((d / "eval.json").read_text())
    return r


def count_arithmetic(s: dict, key: str, out: Path, run_one: Callable[[str, Path, dict, Path], dict]) -> dict:
    """One more run of ours (its defaults) and of TRL for section `key`, `s["flop_steps"][key]` steps each, with
    their matrix arithmetic counted: {"steps", "ours", "trl"} (each run's result.json), {} where the settings ask
    for none. `run_one(fw, directory, settings, training log)` trains one counted run."""
    if key not in s.get("flop_steps", {}):
        return {}
    steps = s["flop_steps"][key]
    counting = {**s, key: {**s[key], "steps": steps}}
    runs = {fw: run_one(fw, out / key / f"flops-{fw}", counting, out / "logs" / f"{key}-flops-{fw}.log")
            for fw in ("ours", "trl")}
    return {"steps": steps, **runs}


def bench_ppo(s: dict, sft: Path, reward: Path, threads: int, out: Path, key: str = "ppo") -> dict:
    """Section `key` (ppo, smol_ppo): ours, its variants (`s[key + "_variants"]`: name -> overrides of our stage)
    and TRL, interleaved over `s[key + "_runs"]` (else `s["runs"]`) seeds in alternating order."""
    variants = {"ours": [], **s.get(f"{key}_variants", {}), "trl": []}
    results: dict[str, list] = {name: [] for name in variants}
    run([OURS_PY, "bench/eval_policy.py", "--policy", sft, *eval_args(s, reward, key),
         "--json", out / key / "sft-eval.json"],
        threads, out / "logs" / f"{key}-eval-sft.log")
    sft_eval = json.loads((out / key / "sft-eval.json").read_text())
    for i in range(s.get(f"{key}_runs", s["runs"])):
        # alternate which goes first, so drift in the machine's speed hits both alike
        for name in (list(variants) if i % 2 == 0 else list(reversed(variants))):
            fw, tag = ("trl" if name == "trl" else "ours"), re.sub(r"\W+", "-", name)
            r = ppo_run(fw, i, out / key / f"{tag}-{i}", s, sft, reward, threads,
                        (out / "logs" / f"{key}-{tag}-{i}.log", out / "logs" / f"{key}-eval-{tag}-{i}.log"),
                        overrides=variants[name], key=key)
            results[name].append(r)
            log(f"{key} {name} run {i}: {r['episodes_per_s']:.2f} episodes/s, peak {r['peak_rss_mib']:.0f} MiB, "
                f"reward {r['eval']['reward']:.3f}")
    counted = count_arithmetic(s, key, out, lambda fw, d, c, logfile: ppo_run(
        fw, 0, d, c, sft, reward, threads, (logfile, Path(os.devnull)), count_flops=True, key=key))
    return {"sft_eval": sft_eval, **results, **({"arithmetic": counted} if counted else {})}


def smol_reward() -> tuple[Path, Path] | None:
    """SmolLM2 as the store converted it and the smol experiment's reward model (LoRA merged, a plain sequence
    classifier): the (policy, reward) directories of the smol_ppo section, None where the reward stage has not run."""
    store = ROOT / "artifacts"
    if not (store / "aliases" / "smol" / "reward").exists():
        return None
    reward = artifact(store, "smol", "reward")
    manifest = json.loads((reward / "manifest.json").read_text())
    return store / "artifacts" / manifest["inputs"]["model"]["key"], reward


def bench_smol_ppo(s: dict, threads: int, out: Path) -> dict:
    """The smol_ppo section: PPO from SmolLM2 with the smol reward model, ours against TRL."""
    found = smol_reward()
    if found is None:
        return {"text": "Not measured: the smol experiment's reward model is not in the store "
                        "(`make smol`, or only that far: `make .venv/.smol-installed-stamp && .venv/bin/rlhf run "
                        "configs/smol.yaml --until reward`).\n"}
    return bench_ppo(s, *found, threads, out, key="smol_ppo")


def grpo_eval(s: dict, key: str, policy: Path, json_out: Path, threads: int, logfile: Path) -> dict:
    """bench/eval_task.py on `policy`: the held-out prompts, length and temperature of section `key` of `s`."""
    hp = s[key]
    run([OURS_PY, "bench/eval_task.py", "--policy", policy, "--prompts", "data/prompts/eval.jsonl.gz",
         "--num-prompts", s.get(f"{key}_eval_prompts", s["eval_prompts"]),
         "--samples-per-prompt", s.get(f"{key}_eval_samples", 1), "--response-length",
         hp["response-length"], "--temperature", hp["temperature"], "--reward", hp["reward"], "--json", json_out],
        threads, logfile)
    return json.loads(json_out.read_text())


def grpo_run(fw: str, seed: int, d: Path, s: dict, key: str, policy: Path, threads: int, logs: tuple[Path, Path],
             overrides: list[str] = (), count_flops: bool = False) -> dict:
    """Train one GRPO run (`fw`: ours or trl, both in the project's virtualenv) with the settings `s[key]` into
    `d` (`overrides` go to our stage), then score its final policy; the run's result.json with
    bench/eval_task.py's result under "eval". `count_flops`: count the matrix arithmetic instead
    (`--count-flops`, its "gflop"), and score nothing."""
    if d.exists():
        shutil.rmtree(d)  # a fresh run: nothing resumed, no stale policy scored
    run([OURS_PY, f"bench/grpo_{fw}.py", "--policy", policy, "--prompts", "data/prompts/train.jsonl.gz",
         *flags(s[key]), "--threads", threads, "--seed", seed, "--out", d, "--json", d / "result.json",
         *(["--set", *overrides] if overrides else []), *(["--count-flops"] if count_flops else [])],
        threads, logs[0])
    r = json.loads((d / "result.json").read_text())
    if count_flops:
        return r
    r["eval"] = grpo_eval(s, key, Path(r["policy_dir"]), d / "eval.json", threads, logs[1])
    return r


def bench_grpo(s: dict, key: str, policy: Path, threads: int, out: Path) -> dict:
    """Section `key` (grpo, smol_grpo): ours, its variants (`s[key + "_variants"]`) and TRL, interleaved over
    `s[key + "_runs"]` seeds, in alternating order."""
    variants = {"ours": [], **s.get(f"{key}_variants", {}), "trl": []}
    results: dict[str, list] = {name: [] for name in variants}
    sft_eval = grpo_eval(s, key, policy, out / key / "sft-eval.json", threads, out / "logs" / f"{key}-eval-sft.log")
    for i in range(s[f"{key}_runs"]):
        for name in (list(variants) if i % 2 == 0 else list(reversed(variants))):
            fw, tag = ("trl" if name == "trl" else "ours"), re.sub(r"\W+", "-", name)
            r = grpo_run(fw, i, out / key / f"{tag}-{i}", s, key, policy, threads,
                         (out / "logs" / f"{key}-{tag}-{i}.log", out / "logs" / f"{key}-eval-{tag}-{i}.log"),
                         variants[name])
            results[name].append(r)
            log(f"{key} {name} run {i}: {r['completions_per_s']:.2f} completions/s, peak {r['peak_rss_mib']:.0f} MiB, "
                f"reward {r['eval']['reward']:.3f}")
    counted = count_arithmetic(s, key, out, lambda fw, d, c, logfile: grpo_run(
        fw, 0, d, c, key, policy, threads, (logfile, Path(os.devnull)), count_flops=True))
    return {"sft_eval": sft_eval, **results, **({"arithmetic": counted} if counted else {})}


def bench_smol_grpo(s: dict, threads: int, out: Path) -> dict:
    """The smol_grpo section: GRPO from SmolLM2 as `make smol` converted it, ours against TRL."""
    if not (ROOT / "artifacts" / "aliases" / "smol" / "grpo").exists():
        return {"text": "Not measured: SmolLM2 is not in the store (`make smol`).\n"}
    from engines import smol_source
    from grpo_trl import trl_loss_type

    hp = s["smol_grpo"]
    return {**bench_grpo(s, "smol_grpo", smol_source(), threads, out),
            "trl_loss_type": trl_loss_type(hp["loss"], hp["minibatches"], hp.get("grad-accum", 1))}


def phase_table(runs: list[dict]) -> list[str]:
    """Markdown rows: seconds per step of each logged phase of our loop (median over runs of the mean step)."""
    phases = [k for k in runs[0]["time"] if k != "time/step"]
    per_step = {k: statistics.median(r["time"][k] / r["steps"] for r in runs) for k in phases + ["time/step"]}
    rows = ["| phase | s/step | share |", "|---|---|---|"]
    for k in sorted(phases, key=lambda k: -per_step[k]):
        rows.append(f"| {k[5:]} | {per_step[k]:.3f} | {per_step[k] / per_step['time/step']:.0%} |")
    rows.append(f"| whole step | {per_step['time/step']:.3f} | |\n")
    return rows


def phase_sections(p: dict, names: list[str], add: Callable[[str], None]) -> None:
    """For each of our variants `names` in section results `p`: its time per step by phase (`phase_table`)."""
    for name in names:
        add(f"Time per step of {name} (seconds, median over runs of the mean step):\n")
        for row in phase_table(p[name]):
            add(row)
        add("")


def keep_previous(res: dict, previous: dict) -> None:
    """Copy into this run's results `res` the sections of the earlier results `previous` (of the same mode) that
    this run did not redo, each with the date and the settings it was measured with."""
    res["section_settings"] = {section: res["settings"] for section in SECTIONS if section in res}
    if previous.get("quick") != res["quick"]:
        return
    for section in SECTIONS:
        if section not in res and section in previous:
            res[section] = {**previous[section], "date": previous[section].get("date", previous["date"])}
            res["section_settings"][section] = settings_of(previous, section)
            if section == "ppo" and "trl" not in res["versions"] and "trl" in previous.get("versions", {}):
                res["versions"]["trl"] = previous["versions"]["trl"]


def settings_of(res: dict, section: str) -> dict:
    """The settings `section` of results `res` was measured with: a section kept from an earlier run keeps that
    run's settings (its runs, its evaluation), which may differ from this run's."""
    return res.get("section_settings", {}).get(section, res["settings"])


def arms(p: dict) -> list[str]:
    """A PPO or GRPO section's arms in run order, TRL last: every key of `p` that holds runs."""
    return [n for n in p if n not in ("sft_eval", "date", "trl_loss_type", "trl", "arithmetic")] + ["trl"]


def faults_line(p: dict) -> str:
    """A sentence on the kernel's share of each side's runs: minor page faults and system time of the whole
    process (medians over runs); "" where the runs did not record them."""
    runs = {fw: p[fw] for fw in ("ours", "trl")}
    if not all("minor_faults" in r for rs in runs.values() for r in rs):
        return ""
    faults = {fw: statistics.median(r["minor_faults"] for r in rs) / 1e6 for fw, rs in runs.items()}
    system = {fw: statistics.median(r["system_s"] for r in rs) for fw, rs in runs.items()}
    return (f"The kernel's share (whole process, medians over runs): minor page faults ours {faults['ours']:.2f} "
            f"million, TRL {faults['trl']:.2f} million; system time ours {system['ours']:.1f} s, TRL "
            f"{system['trl']:.1f} s. A minor fault is the kernel handing the process a zero-filled page: on first "
            "touch, and again each time the allocator gave the page back; docs/benchmarks.md measures what glibc's "
            "allocator settings change on each side.\n")


def ratio_line(p: dict, key: str, goal: float) -> str:
    """A sentence on ours / TRL as the ratio of the mean `key` (a speed) over the runs, with its 95% interval
    (`common.ratio`), and whether the interval clears `goal`, falls short of it or straddles it; "" with
    fewer than 3 runs a side, where the standard errors say little."""
    ours, theirs = ([r[key] for r in p[fw]] for fw in ("ours", "trl"))
    n = min(len(ours), len(theirs))
    if n < 3:
        return ""
    r, lo, hi = ratio(ours, theirs)
    verdict = ("above the goal" if lo >= goal else "below the goal" if hi < goal else
               "the goal inside it: these runs do not settle it")
    return (f"Ratio of the means over {len(ours)} and {len(theirs)} runs: **{r:.2f}x**, 95% interval **{lo:.2f}x to "
            f"{hi:.2f}x** (delta method, bench/common.py `ratio`), {verdict} ({goal}x).\n")


def arithmetic_line(p: dict, speed: float, unit: str) -> str:
    """A sentence on each side's matrix arithmetic per step, from the section's counted runs (`p["arithmetic"]`)
    against the speed ratio `speed` (ours / TRL `unit` per second); "" where not counted."""
    a = p.get("arithmetic")
    if not a:
        return ""
    steps = a["steps"]
    per_step = {fw: a[fw]["gflop"] / steps for fw in ("ours", "trl")}
    ratio = per_step["trl"] / per_step["ours"]
    efficiency = speed / ratio
    work = "less" if ratio > 1 else "more"
    why = (" (TRL's extra work is large matrix products, which run near the peak; the rest of either step is the "
           "same layers' many small operations)") if ratio > 1 else ""
    reading = (f"ours does {work} work and runs it at a lower share of the machine's peak than TRL runs its step{why}"
               if efficiency < 1 else f"ours does {work} work and runs its arithmetic faster than TRL runs its own")
    return (f"Matrix arithmetic: one more run each of {steps} steps (seed 0, not timed) under torch's FLOP counter "
            f"(matrix products; the CPU attention kernels are not counted): TRL {per_step['trl']:.1f} GFLOP a step, "
            f"ours {per_step['ours']:.1f}, so TRL multiplies **{ratio:.2f}x** the matrices ours does. Ours / TRL "
            f"{unit} per second over that ratio, {speed:.2f} / {ratio:.2f} = **{efficiency:.2f}**: {reading}.\n")


def grpo_report(res: dict, key: str, add: Callable[[str], None], measured: Callable[[str], None]) -> None:
    """A GRPO section of RESULTS.md: `key` grpo (the tiny SFT policy) or smol_grpo (SmolLM2 with LoRA)."""
    s = settings_of(res, key)
    p, hp = res[key], s[key]
    trl = res["versions"]["ours"].get("trl", "?")
    smol = key == "smol_grpo"
    add(f"## GRPO{' on SmolLM2-135M-Instruct' if smol else ''}: our stage vs TRL {trl} `trl.GRPOTrainer`\n")
    measured(key)
    advantages = "(r - group mean) / group std" if hp["estimator"] == "grpo" else "r - group mean"
    home = {"uses_word": "tasks/words.py, 1 when the response uses the word its prompt asks for"}.get(
        hp["reward"], "tasks/words.py" if ":" not in hp["reward"] and hp["reward"] not in ("vader", "textblob",
                                                                                         "fluency") else "")
    reward = f"`{hp['reward']}`" + (f" ({home})" if home else "")
    runs, n_eval = s[f"{key}_runs"], s.get(f"{key}_eval_prompts", s["eval_prompts"])
    n_samples = s.get(f"{key}_eval_samples", 1)
    lora = (f"LoRA r {hp['lora-r']} alpha {hp.get('lora-alpha', 32)} on the seven linear layers of every block "
            "(PEFT on both sides; the reference is the policy with its adapters off), " if hp.get("lora-r") else "")
    start = ("SmolLM2-135M-Instruct as `make smol` converts it (the starting policy of configs/smol.yaml)" if smol
             else f"Same SFT policy ({s['config']})")
    add(f"{start}, prompts data/prompts/train.jsonl.gz, reward the function {reward}, no "
        f"reward model; {hp['steps']} steps of {hp['prompts-per-step']} prompts x {hp['group-size']} responses, "
        f"{hp['minibatches']} minibatch(es) (optimizer steps) per rollout, {hp['epochs']} epoch(s), {lora}"
        f"{hp['response-length']} response tokens, temperature {hp['temperature']} (no top-k, top-p), learning "
        f"rate {hp['lr']} (constant), KL coefficient {hp['beta']} (k3, in the loss), clip {hp.get('clip', 0.2)}, "
        f"gradient clipping at {hp.get('max-grad-norm', 1.0)}, advantages {advantages}, "
        f"loss aggregation {hp['loss']} (TRL `loss_type` {p.get('trl_loss_type', '?')}), fp32, no vLLM; "
        f"{runs} run(s) each (seeds 0 to {runs - 1}), interleaved, one process per run. "
        "The mapping, setting by setting, and what it cannot make equal: bench/grpo_trl.py. Completions/s counts "
        f"the training loop only; generated tokens/s: the response tokens of every rollout (EOS included) per "
        f"second of training. Reward: mean `{hp['reward']}` of the final policy on the first {n_eval} "
        "prompts of data/prompts/eval.jsonl.gz (words not in the training prompts; "
        f"{'one sample' if n_samples == 1 else f'{n_samples} samples'} each, seeded, bench/eval_task.py).\n")
    names = arms(p)
    gpu = any(r.get("peak_gpu_mib") for n in names for r in p[n])
    add("| | completions/s | generated tokens/s | peak RSS (MiB) |" + (" peak GPU (MiB) |" if gpu else "") +
        " reward | EOS rate | length |")
    add("|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|")
    e = p["sft_eval"]
    add(f"| {'SmolLM2' if smol else 'SFT policy'} (before GRPO) | | | |" + (" |" if gpu else "") +
        f" {e['reward']:.3f} | {e['eos_rate']:.2f} | {e['length']:.1f} |")

    def tokens_per_s(r: dict) -> float | None:
        if r.get("generated_tokens") is not None:  # ours: summed over the rollouts
            return r["generated_tokens"] / r["train_s"]
        lengths = r.get("train_lengths")  # TRL: its logged mean completion length per optimizer step
        return sum(lengths) / len(lengths) * r["completions"] / r["train_s"] if lengths else None

    for name in names:
        rs, toks = p[name], [t for t in map(tokens_per_s, p[name]) if t is not None]
        add(f"| {f'TRL {trl}' if name == 'trl' else name} | {fmt(stats([r['completions_per_s'] for r in rs]))} | "
            f"{fmt(stats(toks), 1) if len(toks) == len(rs) else '-'} | {fmt(stats([r['peak_rss_mib'] for r in rs]), 0)} |" +
            (f" {fmt(stats([r['peak_gpu_mib'] for r in rs]), 0)} |" if gpu else "") +
            f" {fmt(stats([r['eval']['reward'] for r in rs]), 3)} | "
            f"{fmt(stats([r['eval']['eos_rate'] for r in rs]))} | "
            f"{fmt(stats([r['eval']['length'] for r in rs]), 1)} |")

    def median(fw: str, k: str) -> float:
        return statistics.median(r[k] for r in p[fw])
    goal = 1.5 if smol else 2.5
    memory = "GPU" if gpu else "RSS"
    mem = median("ours", f"peak_{memory.lower()}_mib") - median("trl", f"peak_{memory.lower()}_mib")
    ours, theirs = ([r["eval"]["reward"] for r in p[fw]] for fw in ("ours", "trl"))
    speeds = ", ".join(f"{n} {median(n, 'completions_per_s') / median('trl', 'completions_per_s'):.2f}x"
                       for n in names[1:-1])
    add(f"\nOurs / TRL completions per second (medians): **{median('ours', 'completions_per_s') / median('trl', 'completions_per_s'):.2f}x** "
        f"(goal: at least {goal}x){'; ' + speeds if speeds else ''}. Peak {memory}, ours - TRL (medians): "
        f"**{mem:+.0f} MiB** (goal: at most 0).\n")
    if line := ratio_line(p, "completions_per_s", goal):
        add(line)
    if runs > 1:
        d, lo, hi = difference(ours, theirs)
        (mo, so), (mt, st) = mean_se(ours), mean_se(theirs)
        add(f"Reward reached, ours - TRL (means over seeds): **{d:+.3f} [{lo:+.3f}, {hi:+.3f}]** (95%, Welch; goal: "
            f"an interval around 0), from ours {mo:.3f} +- {so:.3f} and TRL {mt:.3f} +- {st:.3f} (mean +- s.e.).\n")
    if line := arithmetic_line(p, median("ours", "completions_per_s") / median("trl", "completions_per_s"), "completions"):
        add(line)
    if line := faults_line(p):
        add(line)
    seen = {e["reward"], *ours, *theirs, *(r[k] for fw in ("ours", "trl") for r in p[fw]
                                          for k in ("train_reward_first", "train_reward_last"))}
    if len(seen) == 1:
        add(f"**No reward signal**: the first and last rollouts and every evaluation scored {seen.pop():.3f}. With "
            "equal rewards in every group, GRPO's advantages are 0 and neither side learned anything, so the reward "
            "comparison says nothing; pick a reward the SFT policy sometimes earns (`reward` in bench/run.py's "
            "SETTINGS).\n")
    first_last = {fw: (statistics.median(r["train_reward_first"] for r in p[fw]),
                       statistics.median(r["train_reward_last"] for r in p[fw])) for fw in ("ours", "trl")}
    add(f"Training reward (the rollouts' mean `{hp['reward']}`, first and last step, medians): ours "
        f"{first_last['ours'][0]:.3f} -> {first_last['ours'][1]:.3f}, TRL {first_last['trl'][0]:.3f} -> "
        f"{first_last['trl'][1]:.3f}.\n")
    phase_sections(p, names[:-1], add)
    add("rollout = sampling the responses; policy and reference forwards = the no-grad passes over the rollout "
        "batch (with LoRA the reference is the policy with its adapters off; with `reuse_rollout_forward` the "
        "policy forward keeps its graph, and the update is its backward and the optimizer step; with "
        "`sampler_logprobs` the sampler keeps the logprobs and no policy forward runs); score = decoding "
        "and the reward function; update = the minibatch steps (forward and backward of the policy, optimizer "
        "steps). The rest of a step: advantages, the watchdogs' policy copy, logging.\n")


def bench_sft(s: dict, pretrain: Path, threads: int, out: Path) -> dict:
    results = {"ours": [], "plain": []}
    for i in range(s["runs"]):
        for mode in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
            d = out / "sft" / f"{mode}-{i}"
            if d.exists():
                shutil.rmtree(d)  # our stage would resume from its own checkpoints otherwise
            run([OURS_PY, "bench/sft_bench.py", "--mode", mode, "--model", pretrain, *flags(s["sft"]),
                 "--threads", threads, "--out", d, "--json", d / "result.json"], threads, out / "logs" / f"sft-{mode}-{i}.log")
            r = json.loads((d / "result.json").read_text())
            results[mode].append(r)
            log(f"sft {mode} run {i}: {r['tokens_per_s']:.0f} tokens/s")
    return results


def bench_pairs(s: dict, sft: Path, preferences: Path, threads: int, out: Path) -> dict:
    """DPO and KTO, each with the model's own logits and with TRL's fused LM head, interleaved over `s["runs"]`
    runs in alternating order."""
    results: dict[str, dict[str, list]] = {}
    for method, hp in s["pairs"].items():
        results[method] = {"own": [], "trl": []}
        for i in range(s["runs"]):
            for head in (("own", "trl") if i % 2 == 0 else ("trl", "own")):
                d = out / "pairs" / f"{method}-{head}-{i}"
                if d.exists():
                    shutil.rmtree(d)  # the stage would resume from its own checkpoints otherwise
                run([OURS_PY, "bench/pairs_bench.py", "--method", method, "--head", head, "--policy", sft,
                     "--preferences", preferences, *flags(hp), "--threads", threads, "--out", d,
                     "--json", d / "result.json"], threads, out / "logs" / f"pairs-{method}-{head}-{i}.log")
                r = json.loads((d / "result.json").read_text())
                results[method][head].append(r)
                log(f"{method} {head} head run {i}: {r['examples_per_s']:.1f} examples/s, loss {r['train_loss']:.7f}")
    return results


def kept_sections(old: str, new: str) -> str:
    """The `## ` sections of the previous RESULTS.md (before the development notes) that `new` lacks, in
    their order: a run of some sections leaves the others' numbers as they were instead of deleting them.
    A kept section still carries the date line of the run that measured it."""
    def sections(text: str) -> dict[str, str]:
        parts = re.split(r"(?m)^(?=## )", text.split(DEV_NOTES)[0])
        return {part.splitlines()[0]: part for part in parts[1:]}

    # a section measured by the run that wrote the old file has no date line of its own: give it that run's
    written = re.search(r"Written by (`[^`]*`).*? on ([^,]+), commit (\w+)", old)
    out, have = [], set(sections(new))
    for head, part in sections(old).items():
        if head in have:
            continue
        if written and "(Measured on" not in part:
            command, date, commit = written.groups()
            part = part.replace(head + "\n", f"{head}\n\n(Measured on {date} by {command}, commit {commit}.)\n", 1)
        out.append("\n" + part.rstrip("\n") + "\n")
    return "".join(out)


def bench_engines(quick: bool, threads: int, out: Path) -> dict:
    """bench/engines.py in .venv-vllm (make vllm-setup), where it exists: each variant's phases, throughput and
    mismatch, and the held-out task success of the two bfloat16 variants trained longer."""
    py = ROOT / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        return {"text": "Not measured: .venv-vllm does not exist (`make vllm-setup`).\n"}
    if not (ROOT / "artifacts" / "aliases" / "smol" / "grpo").exists():
        return {"text": "Not measured: SmolLM2 is not in the store (`make smol`).\n"}
    steps, longer, prompts = (2, 2, 16) if quick else (6, 16, 256)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    parts = []
    for args in (["--steps", str(steps)],
                 ["--steps", str(longer), "--only", "hf-bf16", "vllm-bf16", "--eval", str(prompts),
                  "--out", str(out / "engines-reward")]):
        done = subprocess.run([str(py), str(ROOT / "bench" / "engines.py"), *args], cwd=ROOT, env=env(threads),
                              capture_output=True, text=True, check=True)
        (logs / "engines.log").open("a").write(done.stderr)
        parts.append(done.stdout)
    text = (f"`bench/engines.py --steps {steps}` (SmolLM2 from `make smol`'s store, configs/smol.yaml's GRPO with "
            "LoRA, 8 prompts x 4 responses of at most 48 tokens, task-check reward; per step, one run each, in "
            f"turn):\n\n{parts[0]}\nThe two bfloat16 variants trained {longer} steps, then sampled on {prompts} "
            f"held-out prompts (`bench/engines.py --steps {longer} --eval {prompts}`):\n\n{parts[1]}")
    return {"text": text}


def report(res: dict) -> str:
    lines = []
    add = lines.append

    def measured(section: str) -> None:
        when = res[section].get("date", res["date"])
        if when != res["date"]:
            add(f"(Measured on {when}, by another `bench/run.py` of the same mode.)\n")
    m = res["machine"]
    add("# Benchmarks\n")
    command = " ".join(["bench/run.py", *res.get("argv", [])])
    add(f"Written by `{command}` (what `make bench` runs) on {res['date']}, commit {res['commit']}. "
        "Raw numbers: bench/out/results.json; logs: bench/out/logs/.\n")
    if res["quick"]:
        add("**Quick mode**: short runs on barely trained models, to check the benchmark itself. Do not quote.\n")
    add("## Machine and versions\n")
    add(f"- {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; {m['os']}; Python {m['python']}; "
        f"torch threads: {res['threads'] or 'torch default'}")
    if m.get("gpu"):
        add(f"- GPU: {m['gpu']} (every run below used it)")
    add(f"- ours ({res.get('pythons', {}).get('ours', '.venv/bin/python')}): {', '.join(f'{k} {v}' for k, v in res['versions']['ours'].items())}")
    if "trl" in res["versions"]:
        add(f"- TRL for PPO ({res.get('pythons', {}).get('trl', 'bench/.venv/bin/python')}): "
            f"{', '.join(f'{k} {v}' for k, v in res['versions']['trl'].items())}")
    add("")
    add("Each cell: median [min, max] over the runs.\n")
    if "pipeline" in res:
        p, s = res["pipeline"], settings_of(res, "pipeline")
        add("## Pipeline\n")
        measured("pipeline")
        add(f"`make pipeline CONFIG={s['config']}` (all four stages and the report):\n")
        add("| | wall time |\n|---|---|")
        add(f"| from an empty store | {p['cold_s']:.1f} s |")
        add(f"| rerun, nothing changed | {p['rerun_s']:.1f} s |\n")
    if "ppo" in res:
        ppo_report(res, "ppo", add, measured)
    if "sft" in res:
        p, s = res["sft"], settings_of(res, "sft")
        hp = s["sft"]
        add("## SFT: our stage vs a plain `trl.SFTTrainer` script\n")
        measured("sft")
        add(f"Same pretrain model ({s['config']}), data/sft/train.jsonl.gz, {hp['steps']} steps of {hp['batch']}, "
            f"max length {hp['max-length']}, assistant-only loss, fp32; {s['runs']} runs each, interleaved. "
            "Tokens are the trainer's `num_tokens`; time is training (`trainer.train()` inside our stage's `train()`).\n")
        add("| | tokens/s | train s | setup s | peak RSS (MiB) |\n|---|---|---|---|---|")
        for mode, name in (("ours", "our SFT stage"), ("plain", "plain SFTTrainer")):
            rs = p[mode]
            add(f"| {name} | {fmt(stats([r['tokens_per_s'] for r in rs]), 0)} | {fmt(stats([r['train_s'] for r in rs]), 1)} | "
                f"{fmt(stats([r['setup_s'] for r in rs]), 1)} | {fmt(stats([r['peak_rss_mib'] for r in rs]), 0)} |")
        ratio = statistics.median(r["tokens_per_s"] for r in p["ours"]) / statistics.median(
            r["tokens_per_s"] for r in p["plain"])
        add(f"\nOurs / plain tokens per second (medians): **{ratio:.3f}**.\n")
    if "grpo" in res:
        grpo_report(res, "grpo", add, measured)
    if "smol_grpo" in res and "text" in res["smol_grpo"]:
        add("## GRPO on SmolLM2-135M-Instruct: our stage vs TRL `trl.GRPOTrainer`\n")
        add(res["smol_grpo"]["text"])
    elif "smol_grpo" in res:
        grpo_report(res, "smol_grpo", add, measured)
    if "smol_ppo" in res:
        ppo_report(res, "smol_ppo", add, measured)
    if "engines" in res:
        add("## Rollout engines: GRPO on SmolLM2-135M-Instruct through `generate` and vLLM\n")
        measured("engines")
        add(res["engines"]["text"])
    if "pairs" in res:
        pairs_report(res, settings_of(res, "pairs"), add, measured)
    return "\n".join(lines) + "\n"


def ppo_report(res: dict, key: str, add: Callable[[str], None], measured: Callable[[str], None]) -> None:
    """A PPO section of RESULTS.md: `key` ppo (the tiny SFT policy and reward model) or smol_ppo (SmolLM2 with
    LoRA and the smol experiment's reward model), or why it was not measured (its "text")."""
    p, smol = res[key], key == "smol_ppo"
    add(f"## PPO{' on SmolLM2-135M-Instruct' if smol else ''}: our stage vs TRL 1.12.0 "
        "`trl.experimental.ppo.PPOTrainer`\n")
    if "text" in p:
        add(p["text"])
        return
    s = settings_of(res, key)
    hp = s[key]
    measured(key)
    start = ("SmolLM2-135M-Instruct as `make smol` converts it and the smol experiment's reward model "
             "(configs/smol.yaml, its LoRA merged; the value model starts from it and trains every weight on both "
             f"sides), LoRA r {hp['lora-r']} alpha {hp.get('lora-alpha', 32)} on the policy's seven linear layers of "
             "every block (PEFT on both sides; the reference is the policy with its adapters off), "
             if smol else f"Same SFT policy and reward model ({s['config']}), ")
    runs, n_eval = s.get(f"{key}_runs", s["runs"]), s.get(f"{key}_eval_prompts", s["eval_prompts"])
    add(f"{start}prompts data/prompts/train.jsonl.gz; "
        f"{hp['steps']} PPO steps of {hp['batch']} prompts, {hp['minibatches']} minibatches, {hp['epochs']} PPO "
        f"epochs, {hp['response-length']} response tokens, KL coefficient {hp['kl-coef']} (k1), temperature "
        f"{hp['temperature']}, learning rate {hp['lr']} (constant, policy and value), clip 0.2/0.2, value weight "
        "0.5, gamma 1, lambda 0.95, fp32; raw reward-model score on the state after EOS (both place it there), no "
        "EOS penalty, no score normalisation, no gradient clipping (TRL's PPO loop has none). "
        f"{runs} runs each, interleaved, one process per run. Episodes/s counts the training loop only. "
        f"Reward: mean reward-model score of the final policy on the first {n_eval} prompts of "
        f"data/prompts/eval.jsonl.gz (one sample each, seeded, bench/eval_policy.py); gold: the VADER judge "
        "(word_vader) on the same samples.\n")
    add("| | episodes/s | peak RSS (MiB) | reward | gold judge | EOS rate |\n|---|---|---|---|---|---|")
    e = p["sft_eval"]
    add(f"| {'SmolLM2' if smol else 'SFT policy'} (before PPO) | | | {e['reward']:.3f} | {e['gold']:.3f} | {e['eos_rate']:.2f} |")
    names = arms(p)
    for fw in names:
        rs, name = p[fw], "TRL 1.12.0" if fw == "trl" else fw
        add(f"| {name} | {fmt(stats([r['episodes_per_s'] for r in rs]))} | "
            f"{fmt(stats([r['peak_rss_mib'] for r in rs]), 0)} | {fmt(stats([r['eval']['reward'] for r in rs]), 3)} | "
            f"{fmt(stats([r['eval']['gold'] for r in rs]), 3)} | {fmt(stats([r['eval']['eos_rate'] for r in rs]))} |")

    def median(fw: str, value: Callable[[dict], float]) -> float:
        return statistics.median(value(r) for r in p[fw])

    def speed_ratio(fw: str) -> float:
        return median(fw, lambda r: r["episodes_per_s"]) / median("trl", lambda r: r["episodes_per_s"])

    speed = speed_ratio("ours")
    goal = "the goal of 2x is set on the default model's section" if smol else "goal: at least 2x"
    mem = median("ours", lambda r: r["peak_rss_mib"]) - median("trl", lambda r: r["peak_rss_mib"])
    rew = median("ours", lambda r: r["eval"]["reward"]) - median("trl", lambda r: r["eval"]["reward"])
    others = ", ".join(f"{n} {speed_ratio(n):.2f}x" for n in names[1:-1])
    add(f"\nOurs / TRL episodes per second (medians): **{speed:.2f}x** ({goal}){'; ' + others if others else ''}; "
        f"peak memory {mem:+.0f} MiB; reward {rew:+.3f}.\n")
    if line := ratio_line(p, "episodes_per_s", 2.0):
        add(line)
    if line := arithmetic_line(p, speed, "episodes"):
        add(line)
    if line := faults_line(p):
        add(line)
    phase_sections(p, names[:-1], add)
    add("rollout = sampling the responses; policy, reference and value forwards = the no-grad passes over the "
        "rollout batch (with `sampler_logprobs` the sampler keeps the logprobs and no policy forward runs); "
        "score = the reward model; update = the PPO epochs (forward and backward of policy "
        "and value, optimizer steps; with LoRA the reference forward is the policy's with its adapters off). The "
        "rest of a step: rewards, advantages, the watchdogs' policy copy, logging.\n")


def pairs_report(res: dict, s: dict, add: Callable[[str], None], measured: Callable[[str], None]) -> None:
    """The DPO and KTO section: each stage with the model's own logits against TRL's fused LM head."""
    p = res["pairs"]
    add("## DPO and KTO: the model's own logits against TRL's fused LM head\n")
    measured("pairs")
    runs = len(next(iter(p[m]["own"] for m in p if m != "date")))
    add(f"Our DPO and KTO stages on the same SFT policy and preference pairs ({s['config']}'s), configs/compare.yaml's "
        "settings otherwise (beta 0.1, max length 128, cosine schedule, fp32), each run twice over: with the model's "
        "own logits from the batch's first answer token on (`fused_lm_head: null`, the default on a CPU, "
        "`rlhf.trainers.plain_lm_head`) and with TRL's fused LM head (`fused_lm_head: true`: what a "
        "`trl.DPOTrainer` or `trl.KTOTrainer` script runs, which on a CPU scores every position in tiles). "
        f"{runs} runs each, interleaved, one process per run; time is training only (bench/pairs_bench.py).\n")
    add("| | examples/s | train s | peak RSS (MiB) | training loss |\n|---|---|---|---|---|")
    for method in (m for m in p if m != "date"):
        hp = s["pairs"][method]
        unit = "pairs" if method == "dpo" else "unpaired answers"
        for head, name in (("own", "the model's own logits"), ("trl", "TRL's fused LM head")):
            rs = p[method][head]
            add(f"| {method.upper()} ({hp['steps']} steps of {hp['batch']} {unit}), {name} | "
                f"{fmt(stats([r['examples_per_s'] for r in rs]), 1)} | {fmt(stats([r['train_s'] for r in rs]), 1)} | "
                f"{fmt(stats([r['peak_rss_mib'] for r in rs]), 0)} | {fmt(stats([r['train_loss'] for r in rs]), 7)} |")
    add("")
    for method in (m for m in p if m != "date"):
        own, trl = (statistics.median(r["examples_per_s"] for r in p[method][h]) for h in ("own", "trl"))
        gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(p[method]["own"], p[method]["trl"]))
        add(f"{method.upper()}: own / TRL's head examples per second (medians) **{own / trl:.2f}x**; the training "
            f"loss of a run with either head differs by at most {gap:.1e}.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs on small settings (checks the benchmark)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS)
    ap.add_argument("--runs", type=int, help="runs per framework (default 3; quick: GRPO 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every run (0: torch's default)")
    ap.add_argument("--out", default="bench/out", help="results, logs, the store and the runs' models")
    ap.add_argument("--results", default="bench/RESULTS.md")
    ap.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="interpreter with this project installed")
    ap.add_argument("--trl-python", default=str(ROOT / "bench" / ".venv" / "bin" / "python"),
                    help="interpreter with TRL 1.12.0 installed")
    a = ap.parse_args()
    global OURS_PY, TRL_PY  # every run below uses them
    OURS_PY, TRL_PY = Path(a.ours_python), Path(a.trl_python)
    s = dict(SETTINGS["quick" if a.quick else "full"])
    if a.runs:
        s["runs"] = s["grpo_runs"] = s["smol_grpo_runs"] = s["smol_ppo_runs"] = a.runs
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    from omegaconf import OmegaConf

    experiment = OmegaConf.load(ROOT / s["config"]).name
    store = ROOT / OmegaConf.load(ROOT / s["config"]).store
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"quick": a.quick, "argv": sys.argv[1:], "settings": s, "threads": a.threads, "machine": {**machine(), "gpu": gpu(OURS_PY)},
           "pythons": {"ours": shown(OURS_PY), "trl": shown(TRL_PY)}, "commit": commit,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "versions": {"ours": versions(OURS_PY, ["torch", "transformers", "trl", "accelerate", "peft"])}}
    if {"ppo", "smol_ppo"} & set(a.only) or TRL_PY.exists():  # the TRL 1.12.0 venv serves PPO only
        res["versions"]["trl"] = versions(TRL_PY, ["torch", "transformers", "trl", "accelerate", "peft"])
    if "pipeline" in a.only:
        res["pipeline"] = {**bench_pipeline(s["config"], store, a.threads, out), "date": res["date"]}
    elif {"ppo", "sft", "grpo"} & set(a.only):  # the furthest stage these need: PPO the reward model, GRPO
        needed = "reward" if "ppo" in a.only else "sft" if "grpo" in a.only else "pretrain"
        if not (store / "aliases" / experiment / needed).exists():
            run(["make", "-s", needed, f"CONFIG={s['config']}"], a.threads, out / "logs" / "upstream.log")
    if "ppo" in a.only:
        res["ppo"] = {**bench_ppo(s, artifact(store, experiment, "sft"), artifact(store, experiment, "reward"),
                                  a.threads, out), "date": res["date"]}
    if "sft" in a.only:
        res["sft"] = {**bench_sft(s, artifact(store, experiment, "pretrain"), a.threads, out), "date": res["date"]}
    if "grpo" in a.only:
        from grpo_trl import trl_loss_type

        hp = s["grpo"]
        res["grpo"] = {**bench_grpo(s, "grpo", artifact(store, experiment, "sft"), a.threads, out), "date": res["date"],
                       "trl_loss_type": trl_loss_type(hp["loss"], hp["minibatches"], hp.get("grad-accum", 1))}
    if "smol_grpo" in a.only:
        res["smol_grpo"] = {**bench_smol_grpo(s, a.threads, out), "date": res["date"]}
    if "smol_ppo" in a.only:
        res["smol_ppo"] = {**bench_smol_ppo(s, a.threads, out), "date": res["date"]}
    if "engines" in a.only:
        res["engines"] = {**bench_engines(a.quick, a.threads, out), "date": res["date"]}
    if "pairs" in a.only:
        if not (store / "aliases" / experiment / "preferences").exists():
            run(["make", "-s", "preferences", f"CONFIG={s['config']}"], a.threads, out / "logs" / "upstream.log")
        res["pairs"] = {**bench_pairs(s, artifact(store, experiment, "sft"), artifact(store, experiment, "preferences"),
                                      a.threads, out), "date": res["date"]}
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    keep_previous(res, previous)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    path = ROOT / a.results
    if path.exists():
        old = path.read_text()
        text += kept_sections(old, text)  # results.json may have lost a section that RESULTS.md still shows
        if DEV_NOTES in old:  # the hand-written notes survive a rerun
            text += "\n" + old[old.index(DEV_NOTES):]
    path.write_text(text)
    log(f"wrote {shown(path)}")


if __name__ == "__main__":
    main()
