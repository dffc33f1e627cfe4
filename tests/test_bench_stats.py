"""The statistics bench/reward_study.py reports: whether two PPO implementations reach the same reward
is read off these intervals."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import difference, mean_se, ratio  # noqa: E402
from reward_study import parse_arm  # noqa: E402


def test_mean_and_standard_error_golden():
    # mean 2; sample variance ((1)^2 + 0 + (1)^2) / 2 = 1; standard error 1 / sqrt(3)
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3), abs=1e-12)


def test_difference_has_a_welch_95_percent_interval():
    # means 2 and 1; standard errors 1/sqrt(3) and sqrt(2)/sqrt(2) = 1 -> s.e. of the difference sqrt(1/3 + 1)
    d, lo, hi = difference([1.0, 2.0, 3.0], [0.0, 2.0])
    se = math.sqrt(1 / 3 + 1)
    assert d == 1.0
    assert (lo, hi) == pytest.approx((1 - 1.96 * se, 1 + 1.96 * se), abs=1e-12)


def test_ratio_of_means_has_a_delta_method_95_percent_interval():
    # means 4 and 2 -> ratio 2; standard errors 1/sqrt(3) (of 3, 4, 5: s.d. 1) and 0.5 (of 1.5, 2.5: s.d.
    # sqrt(0.5)), relative 1/(4 sqrt(3)) and 1/4 -> the ratio's s.e. 2 * sqrt(1/48 + 1/16)
    r, lo, hi = ratio([3.0, 4.0, 5.0], [1.5, 2.5])
    se = 2 * math.sqrt(1 / 48 + 1 / 16)
    assert r == 2.0
    assert (lo, hi) == pytest.approx((2 - 1.96 * se, 2 + 1.96 * se), abs=1e-12)
    # equal runs on either side: no spread, the interval is the ratio itself
    assert ratio([3.0, 3.0], [2.0, 2.0]) == (1.5, 1.5, 1.5)


def test_arm_names_and_overrides():
    assert parse_arm("trl") == ("trl", [])
    assert parse_arm("at_eos:stages.ppo.score_after_eos=false stages.ppo.lam=1") == (
        "at_eos", ["stages.ppo.score_after_eos=false", "stages.ppo.lam=1"])


def test_a_partial_benchmark_run_keeps_the_sections_it_did_not_redo():
    from run import DEV_NOTES, kept_sections

    old = ("# Benchmarks\n\nWritten by `bench/run.py --only ppo sft` (what `make bench` runs) on day 2, commit abc123. "
           "Raw numbers: ...\n\n## Machine and versions\n\n- old machine\n\n## Pipeline\n\n(Measured on day 1.)\n\n"
           "| from empty | 869 s |\n\n## PPO: ours vs TRL\n\n1.86x\n\n## SFT: ours\n\n0.81x\n\n"
           f"{DEV_NOTES}\n\nnotes\n")
    new = "# Benchmarks\n\n## Machine and versions\n\n- new machine\n\n## SFT: ours\n\n1.89x\n"
    kept = kept_sections(old, new)
    # the pipeline and PPO sections come back whole, in their order, PPO with the date of the run that
    # wrote the old file (it had none of its own); the redone SFT section and the machine are the new
    # run's; the development notes are not a section to keep
    assert kept == ("\n## Pipeline\n\n(Measured on day 1.)\n\n| from empty | 869 s |\n"
                    "\n## PPO: ours vs TRL\n\n(Measured on day 2 by `bench/run.py --only ppo sft`, commit abc123.)\n"
                    "\n1.86x\n")
    assert kept_sections(new, new) == "" and DEV_NOTES not in kept


def test_a_kept_section_keeps_the_settings_it_was_measured_with():
    from run import keep_previous, settings_of

    five, two = {"grpo_runs": 5, "runs": 5}, {"grpo_runs": 2, "runs": 2}
    # day 1 measured PPO with 5 runs; day 2 redid GRPO with 2 and kept PPO; day 3 redoes SFT with 2
    day2 = {"quick": False, "date": "day 2", "settings": two, "versions": {}, "grpo": {"runs": "g"},
            "ppo": {"runs": "p", "date": "day 1"}, "section_settings": {"grpo": two, "ppo": five}}
    day3 = {"quick": False, "date": "day 3", "settings": two, "versions": {}, "sft": {"runs": "s"}}
    keep_previous(day3, day2)
    assert [settings_of(day3, k)["runs"] for k in ("sft", "grpo", "ppo")] == [2, 2, 5]
    assert day3["ppo"]["date"] == "day 1" and day3["grpo"]["date"] == "day 2"
    # results written before sections had settings of their own: the file's settings are theirs
    old = {"quick": False, "date": "day 0", "settings": five, "versions": {}, "ppo": {"runs": "p"}}
    day1 = {"quick": False, "date": "day 1", "settings": two, "versions": {}, "grpo": {"runs": "g"}}
    keep_previous(day1, old)
    assert settings_of(day1, "ppo")["runs"] == 5 and settings_of(day1, "grpo")["runs"] == 2
    # a quick run keeps nothing of a full one
    quick = {"quick": True, "date": "day 4", "settings": two, "versions": {}, "sft": {}}
    keep_previous(quick, day3)
    assert set(quick["section_settings"]) == {"sft"} and "ppo" not in quick


def test_matmul_count_counts_two_flops_per_multiply_add_and_nothing_when_off():
    import torch

    from common import MatmulCount

    a, b = torch.ones(3, 4), torch.ones(4, 5)
    with MatmulCount(True) as counted:
        (a @ b).sum()  # 3 x 5 outputs of 4 multiply-adds each: 2 * 3 * 4 * 5 = 120; the sum is not a matrix product
        torch.nn.functional.linear(a, torch.ones(6, 4))  # 2 * 3 * 4 * 6 = 144
    assert counted.gflop * 1e9 == pytest.approx(120 + 144)
    with MatmulCount(False) as off:
        a @ b
    assert off.gflop is None


def test_the_arithmetic_sentence_divides_the_speed_ratio_by_the_work_ratio():
    from run import arithmetic_line

    # 10 steps each: TRL 2000 GFLOP -> 200 a step, ours 1000 -> 100; TRL does 2x ours, the speed ratio 1.6x
    # over it is 0.8 of TRL's speed per unit of arithmetic
    section = {"arithmetic": {"steps": 10, "ours": {"gflop": 1000.0}, "trl": {"gflop": 2000.0}}}
    line = arithmetic_line(section, 1.6, "episodes")
    assert "TRL 200.0 GFLOP a step, ours 100.0" in line and "**2.00x**" in line
    assert "1.60 / 2.00 = **0.80**" in line and "episodes per second" in line and "lower share" in line
    assert "= **1.20**: ours does less work and runs its arithmetic faster" in arithmetic_line(section, 2.4, "episodes")
    assert arithmetic_line({}, 1.6, "episodes") == ""


def test_the_ratio_sentence_says_whether_the_interval_settles_the_goal():
    from run import ratio_line

    def section(ours: list[float], trl: list[float]) -> dict:
        return {"ours": [{"v": v} for v in ours], "trl": [{"v": v} for v in trl]}

    # ours 3, 4, 5 against TRL 2, 2, 2: ratio 2, s.e. 2 * (1/sqrt(3)) / 4 = 0.289 -> 1.43x to 2.57x
    line = ratio_line(section([3.0, 4.0, 5.0], [2.0, 2.0, 2.0]), "v", 2.0)
    assert "over 3 and 3 runs: **2.00x**, 95% interval **1.43x to 2.57x**" in line
    assert "the goal inside it" in line
    assert "above the goal (1.5x)" in ratio_line(section([4.0, 4.1, 4.2], [2.0, 2.0, 2.0]), "v", 1.5)
    assert "below the goal (2.5x)" in ratio_line(section([4.0, 4.1, 4.2], [2.0, 2.0, 2.0]), "v", 2.5)
    assert ratio_line(section([3.0, 4.0], [2.0, 2.0, 2.0]), "v", 2.0) == ""  # two runs say little


def test_every_result_records_the_kernels_share_and_the_report_sets_the_sides_side_by_side(tmp_path):
    import json

    from common import write_result
    from run import faults_line

    write_result(str(tmp_path / "r.json"), {"framework": "ours"})
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["framework"] == "ours" and r["minor_faults"] > 0 and r["system_s"] >= 0
    p = {"ours": [{"minor_faults": 250_000, "system_s": 2.0}, {"minor_faults": 270_000, "system_s": 3.0}],
         "trl": [{"minor_faults": 1_600_000, "system_s": 5.0}, {"minor_faults": 1_700_000, "system_s": 6.0}]}
    line = faults_line(p)
    assert "ours 0.26 million, TRL 1.65 million" in line and "ours 2.5 s, TRL 5.5 s" in line
    del p["trl"][1]["minor_faults"]  # results written before runs recorded it: no sentence
    assert faults_line(p) == ""


def ppo_results(sections: dict[str, list[float]]) -> dict:
    """bench/run.py's results with a PPO section per key of `sections` (ours' episodes/s per run; TRL's half)."""
    from run import SETTINGS

    def one(speed: float, reward: float) -> dict:
        return {"episodes_per_s": speed, "peak_rss_mib": 1000.0, "steps": 4,
                "time": {"time/step": 8.0, "time/update": 6.0},
                "eval": {"reward": reward, "gold": 0.1, "eos_rate": 0.9}}
    res = {"quick": False, "date": "day 1", "commit": "abc123", "argv": ["--only", *sections], "threads": 0,
           "settings": SETTINGS["full"],
           "machine": {"cpu": "cpu", "cores": 2, "memory_mib": 1, "os": "os", "python": "3"},
           "versions": {"ours": {"torch": "2"}}}
    for key, speeds in sections.items():
        res[key] = {"sft_eval": {"reward": 0.0, "gold": 0.0, "eos_rate": 0.5},
                    "ours": [one(v, 0.2) for v in speeds], "trl": [one(v / 2, 0.1) for v in speeds]}
    return res


def test_the_smol_ppo_section_reports_its_own_settings_beside_the_default_one():
    from run import SETTINGS, eval_args, report

    text = report(ppo_results({"ppo": [30.0, 32.0], "smol_ppo": [0.8, 0.9]}))
    default, smol = text.split("## PPO on SmolLM2-135M-Instruct")
    assert "## PPO: our stage vs TRL 1.12.0" in default and "(goal: at least 2x)" in default
    assert "30 PPO steps of 64 prompts" in default and "LoRA" not in default.split("Time per step")[0]
    hp = SETTINGS["full"]["smol_ppo"]
    assert f"{hp['steps']} PPO steps of {hp['batch']} prompts" in smol and f"LoRA r {hp['lora-r']}" in smol
    assert "| SmolLM2 (before PPO) |" in smol and "2.00x** (the goal of 2x is set on the default" in smol
    assert f"first {SETTINGS['full']['smol_ppo_eval_prompts']} prompts" in smol
    # each section's runs are scored at its own length and temperature, on its own number of prompts
    args = dict(zip(*[iter(eval_args(SETTINGS["full"], Path("rm"), "smol_ppo"))] * 2))
    assert (args["--num-prompts"], args["--response-length"], args["--temperature"]) == (
        SETTINGS["full"]["smol_ppo_eval_prompts"], hp["response-length"], hp["temperature"])
    assert dict(zip(*[iter(eval_args(SETTINGS["full"], Path("rm")))] * 2))["--num-prompts"] == 256
    # where the smol reward model is missing, the section says so under its own heading
    res = {**ppo_results({}), "smol_ppo": {"text": "Not measured: no reward model.\n", "date": "day 1"}}
    assert ("## PPO on SmolLM2-135M-Instruct: our stage vs TRL 1.12.0 `trl.experimental.ppo.PPOTrainer`\n\n"
            "Not measured: no reward model.\n") in report(res)


def test_both_sides_get_the_same_lora_from_one_pair_of_flags():
    import argparse

    from common import LORA_TARGETS, add_ppo_args, lora_block, peft_config

    p = argparse.ArgumentParser()
    add_ppo_args(p)
    base = ["--policy", "p", "--reward", "r", "--prompts", "x", "--out", "o"]
    assert lora_block(p.parse_args(base)) == {} and peft_config(p.parse_args(base)) is None
    a = p.parse_args([*base, "--lora-r", "16", "--lora-alpha", "32"])
    ours, theirs = lora_block(a)["lora"], peft_config(a)
    assert (ours["r"], ours["alpha"], ours["dropout"]) == (16, 32, 0.0)
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout) == (16, 32, 0.0)
    assert set(ours["target_modules"]) == set(theirs.target_modules) == set(LORA_TARGETS)
