"""Tracking: metrics.jsonl always; wandb offline by default, writing a local run."""

from __future__ import annotations

import json

from rlhf.schema import ExperimentConfig, TrackingConfig
from rlhf.tracking import Tracker


def test_offline_wandb_run_and_metrics_file(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = ExperimentConfig(name="exp", tracking=TrackingConfig(wandb="offline", dir=str(tmp_path / "runs")))
    t = Tracker(cfg, "pretrain", "abc123")
    t.log({"loss": 2.5, "lr": float("nan")}, step=1)
    t.log({"loss": 2.0}, step=2)
    t.close()
    run_dir = tmp_path / "runs" / "exp" / "pretrain-abc123"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0)]
    assert rows[0]["lr"] is None  # NaN is not valid JSON; it is written as null
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


def test_disabled_wandb_still_writes_metrics(tmp_path):
    cfg = ExperimentConfig(name="exp", tracking=TrackingConfig(wandb="disabled", dir=str(tmp_path / "runs")))
    t = Tracker(cfg, "sft", "k")
    t.log({"loss": 1.0}, step=3)
    t.close()
    run_dir = tmp_path / "runs" / "exp" / "sft-k"
    assert (run_dir / "metrics.jsonl").exists() and not (run_dir / "wandb").exists()


def test_a_failed_run_that_logged_nothing_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "runs" / "exp" / "sft-other").mkdir(parents=True)  # another stage's run: kept
    cfg = ExperimentConfig(name="exp", tracking=TrackingConfig(wandb="offline", dir=str(tmp_path / "runs")))
    t = Tracker(cfg, "pretrain", "abc123")
    assert (tmp_path / "runs" / "exp" / "pretrain-abc123" / "wandb").exists()
    t.close(discard_if_empty=True)
    assert [p.name for p in (tmp_path / "runs" / "exp").iterdir()] == ["sft-other"]

    cfg = ExperimentConfig(name="new", tracking=TrackingConfig(wandb="disabled", dir=str(tmp_path / "fresh" / "runs")))
    Tracker(cfg, "sft", "k").close(discard_if_empty=True)
    assert not (tmp_path / "fresh").exists()  # every directory it created is gone

    t = Tracker(cfg, "sft", "k")
    t.log({"loss": 1.0}, step=1)
    t.close(discard_if_empty=True)  # failed after logging: the metrics are kept for a look
    assert (tmp_path / "fresh" / "runs" / "new" / "sft-k" / "metrics.jsonl").exists()
