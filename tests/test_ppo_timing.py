"""The per-phase timing the PPO stage logs (`time/*`), which the benchmarks in bench/ read."""

from __future__ import annotations

import time

import pytest

from conftest import ppo_config, seeded_store, write_config
from rlhf.config import load_experiment
from rlhf.pipeline import Pipeline
from rlhf.launch import PhaseTimer

PHASES = ["rollout", "policy_forward", "reference_forward", "value_forward", "score", "update"]


def test_phase_timer_sums_repeated_phases_and_pop_starts_afresh():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("a"):
            time.sleep(0.01)
    with timer("b"):
        pass
    first = timer.pop()
    assert set(first) == {"time/a", "time/b"}
    assert first["time/a"] >= 0.02 > first["time/b"] >= 0.0
    assert timer.pop() == {}


def test_phase_timer_counts_a_phase_that_raises():
    timer = PhaseTimer()
    with pytest.raises(ValueError):
        with timer("a"):
            raise ValueError
    assert "time/a" in timer.pop()


class _Recorder:
    def __init__(self):
        self.rows = []

    def log(self, stats, step):
        self.rows.append(dict(stats))


def test_every_step_logs_each_phase_within_the_step_time(shared_data, upstream_store, tmp_path):
    path = write_config(tmp_path / "exp.yaml", ppo_config(shared_data, str(seeded_store(upstream_store, tmp_path)),
                                                          save_every=0))
    pipe = Pipeline(load_experiment(path))
    pipe.run(until="reward")
    stage = pipe.stages["ppo"]
    stage.work_dir = stage.store.work_dir(stage.key)
    stage.tracker = _Recorder()
    stage.setup()
    stage.train()
    assert len(stage.tracker.rows) == stage.config.num_steps
    # the sampler keeps the rollout's logprobs (`sampler_logprobs`, the default here): no policy forward runs
    assert stage.config.sampler_logprobs
    ran = [p for p in PHASES if p != "policy_forward"]
    for row in stage.tracker.rows:
        assert "time/policy_forward" not in row
        phases = [row[f"time/{p}"] for p in ran]
        assert all(t > 0 for t in phases)
        assert sum(phases) <= row["time/step"]
