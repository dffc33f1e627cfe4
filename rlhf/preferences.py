"""Preference pairs as a dataset: the files a preferences stage writes and every stage that learns from
pairs (the reward model, DPO, KTO) reads.

A preference dataset is a directory:

    train.jsonl     {"prompt", "chosen", "rejected", "margin", "source"} per line
    eval.jsonl      the same, pairs of held-out prompts
    samples.jsonl   {"prompt", "responses": [...]}: every response the judge ranked (on-policy pairs only)

`source` says where a pair came from ("onpolicy": ranked by a judge; "human": a preference file or hub
dataset), so a consumer reports held-out accuracy per source; `margin` is the judge's score gap (null for
pairs no judge scored). The JSON Lines files load as they are with `datasets.load_dataset("json",
data_files=...)`. Nothing here knows a particular stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.models import LoraSettings
from rlhf.schema import checked, logging_only
from rlhf.trainers import LR_SCHEDULERS, TrainerSettings

SPLITS = ("train", "eval")
SAMPLES = "samples.jsonl"
HUMAN = "human"
"""The source of pairs read from preference files or hub datasets."""
ONPOLICY = "onpolicy"
"""The source of pairs a judge ranked among a policy's samples."""


@dataclass
class PreferenceData:
    """The pairs a stage learns from: training pairs, held-out pairs by source, and the policy samples
    the on-policy pairs were ranked from (empty when there were none)."""

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def sampled_responses(self) -> list[tuple[str, str]]:
        """Every sampled (prompt, response), prompt by prompt, in the order they were drawn."""
        return [(s["prompt"], r) for s in self.samples for r in s["responses"]]


def pair_row(row: dict[str, Any], source: str, margin: float | None = None) -> dict[str, Any]:
    """A pair in the dataset's form; a `source` or `margin` the row already carries is kept."""
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
            "margin": row.get("margin", margin), "source": row.get("source") or source}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (an empty file for no rows)."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_file(directory: str | Path, split: str) -> Path | None:
    """`<directory>/<split>.jsonl` (or `.jsonl.gz`), or None when there is neither."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """The pairs of one split file, each with a `source` ("human" where the file names none).

    Every line must hold string `prompt`, `chosen` and `rejected` fields; an empty response is allowed
    (a policy may answer with EOS at once, and preferring a real answer over it is a preference).
    """
    from rlhf.data import DataError, json_lines

    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise DataError(f'{path} line {number}: a pair needs string "prompt", "chosen" and "rejected" fields')
        rows.append(pair_row(row, HUMAN))
    return rows


def read_preferences(directory: str | Path) -> PreferenceData:
    """A preference dataset directory (see the module docstring): its train and eval pairs and samples."""
    from rlhf.data import DataError

    train_file = split_file(directory, "train")
    if train_file is None:
        raise DataError(f"{directory}: no train.jsonl; a preference dataset is a directory with train.jsonl "
                        "(and eval.jsonl) of {\"prompt\",\"chosen\",\"rejected\"} rows, as a preferences stage writes")
    data = PreferenceData(train=read_pairs(train_file))
    eval_file = split_file(directory, "eval")
    if eval_file is not None:
        data.evals = by_source(read_pairs(eval_file))
    samples = Path(directory) / SAMPLES
    if samples.is_file():
        data.samples = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return data


def by_source(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Pairs grouped by their source, sources in the order they first appear."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["source"], []).append(row)
    return out


def load_preferences(directory: str | None, train_data: str | None, eval_data: str | None) -> PreferenceData:
    """What a stage that learns from pairs reads: a preference dataset directory (a preferences stage's
    artifact, or a copy of one) and preference files or hub datasets (source "human"), merged. Files
    come first, as the preferences stage merges them."""
    from rlhf.data import load_rows

    data = PreferenceData()
    if train_data:
        data.train += [pair_row(r, HUMAN) for r in load_rows(train_data, "preferences").to_list()]
    if eval_data:
        data.evals = by_source([pair_row(r, HUMAN) for r in load_rows(eval_data, "preferences").to_list()])
    if directory is not None:
        found = read_preferences(directory)
        data.train += found.train
        for source, rows in found.evals.items():
            data.evals.setdefault(source, []).extend(rows)
        data.samples = found.samples
    return data


def conversational(row: dict[str, Any]) -> dict[str, Any]:
    """A pair as chat turns, so TRL renders it through the tokenizer's chat template."""
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


# ---- a stage input that names preferences --------------------------------------------------------------


def outside_data_files(stage: Any, field: str = "preferences") -> dict[str, str]:
    """`Stage.data_files` entries for a preferences input from outside the experiment: the directory, so
    its files' contents (not only their names and sizes) are part of the stage's key."""
    ref = stage.input_refs.get(field)
    return {field: ref.external} if ref is not None and ref.external else {}


def check_input(stage: Any, field: str = "preferences") -> None:
    """A preferences input from outside the experiment must be a directory holding train.jsonl."""
    from rlhf.errors import StageError

    ref = stage.input_refs.get(field)
    if ref is not None and ref.external and split_file(ref.external, "train") is None:
        raise StageError(
            f"{stage.stage_name}: stages.{stage.stage_name}.{field} = {ref.external!r} is neither a stage of this "
            "experiment nor a directory holding train.jsonl; name a preferences stage or such a directory, or give "
            f"preference files and hub datasets as stages.{stage.stage_name}.train_data / eval_data"
        )


@dataclass
class PairPolicySettings(TrainerSettings):
    """The settings every policy stage that learns from preference pairs with a Trainer has alike (DPO, KTO):
    the policy and its pairs, the schedule, LoRA, the EOS floor and the periodic evaluation; the Trainer's
    (`batch_size`, `bf16`, ...) come from `TrainerSettings`. A method's config adds its own loss's."""

    policy: str = "sft"
    """Policy to optimise, and the reference it is held near: an upstream stage, a hub id or a local HF directory."""
    preferences: str | None = "preferences"
    """Pairs: a preferences stage, or a directory of its files (train.jsonl, eval.jsonl); None: only `train_data`."""
    train_data: str | None = None
    """More preference pairs ({"prompt","chosen","rejected"}; a local file or hub dataset, source "human")."""
    eval_data: str | None = None
    """More held-out preference pairs (source "human")."""
    max_length: int = checked(128, ge=2)
    """Longest tokenized prompt + answer; longer ones are truncated (DPO drops a pair whose prompt alone fills it)."""
    max_steps: int = checked(200, ge=1)
    """Optimizer steps."""
    learning_rate: float = checked(1e-4, gt=0)
    """Peak learning rate."""
    warmup_steps: int = checked(10, ge=0)
    """Linear warmup steps before the learning-rate schedule."""
    lr_scheduler_type: str = checked("cosine", choices=LR_SCHEDULERS)
    """Learning-rate schedule after warmup, a transformers `SchedulerType` (cosine, linear, constant, ...)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Train LoRA adapters instead of all weights (merged into the artifact; the reference is then the
    policy with its adapters disabled)."""
    min_eos_rate: float = checked(0.8, ge=0, le=1)
    """Fail the stage when fewer of the evaluation's sampled responses than this end with EOS."""
    fused_lm_head: bool | None = None
    """TRL's fused LM head for the log-probabilities, which never builds the whole logits tensor: None uses it
    on GPUs only. Without Triton (CPU) it scores every position, prompt and padding included, in tiles; the
    model's own logits from the first answer token on (`rlhf.trainers.plain_lm_head`) give the same numbers to
    float rounding: configs/compare.yaml's DPO stage took 88 s against 134 s with TRL's head and its KTO stage
    113 s against 182 s on 2 cores, every metric the same but KL, margins and loss in the 7th digit."""
    eval_every: int = logging_only(50, ge=0)
    """Run the experiment's evaluation (sampled responses only) every N steps, for the report's curves (0: never)."""


class LearnsFromPairs:
    """What a stage that learns from preference pairs shares (the reward model, DPO, KTO), as a mixin
    before its base class (`class KTOStage(LearnsFromPairs, TrainerStage, PolicyStage)`).

    Its config has `preferences` (an input: a preferences stage, or a directory like its artifact),
    `train_data` and `eval_data` (preference files or hub datasets, source "human"), at least one of the
    first two set. `read_pairs` merges them; `pair_datasets` turns pairs into TRL's conversational form.
    """

    def data_files(self) -> dict[str, str | None]:
        c = self.config
        return {"train": c.train_data, "eval": c.eval_data, **outside_data_files(self)}

    def check(self) -> None:
        """The base checks, and preferences from somewhere."""
        super().check()
        self.require_preferences()

    def validate_inputs(self) -> None:
        super().validate_inputs()
        self.require_preferences()
        check_input(self)

    def require_preferences(self) -> None:
        from rlhf.errors import StageError

        if self.config.train_data is None and "preferences" not in self.input_refs:
            raise StageError(f"{self.where('preferences')}: no preferences: set stages.{self.stage_name}.preferences "
                             f"(a preferences stage) or stages.{self.stage_name}.train_data (a preference file)")

    def read_pairs(self) -> PreferenceData:
        """The stage's pairs: the preferences input's and the files', merged (`load_preferences`)."""
        from rlhf.errors import StageError

        c = self.config
        data = load_preferences(self.input_path("preferences") if "preferences" in self.input_refs else None,
                                c.train_data, c.eval_data)
        if not data.train:
            raise StageError(f"{self.stage_name}: no training pairs in stages.{self.stage_name}.preferences or "
                             f"stages.{self.stage_name}.train_data; point one of them at pairs")
        return data

    def pair_datasets(self, data: PreferenceData, shuffle: bool = False) -> tuple[Any, dict[str, Any]]:
        """(train, {source: held-out}) `datasets.Dataset`s of conversational pairs (`conversational`); the
        training pairs shuffled with the stage's seed when `shuffle`."""
        import datasets

        train = datasets.Dataset.from_list([conversational(r) for r in data.train])
        if shuffle:
            train = train.shuffle(seed=self.seed)
        return train, {k: datasets.Dataset.from_list([conversational(r) for r in v]) for k, v in data.evals.items()}
