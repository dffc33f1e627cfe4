"""The prompts an RL stage trains on: the rows of its prompts file, the other columns that reach its reward
functions, the prompts too long to keep, and which rows each step samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlhf.data import load_rows
from rlhf.errors import StageError
from rlhf.sampling import chat_prompt

log = logging.getLogger("rlhf")


@dataclass
class Prompts:
    """A prompts file's `prompt` column (`texts`) and its other columns by name (`columns`), row-aligned."""

    texts: list[str]
    columns: dict[str, list]

    @classmethod
    def load(cls, path: str) -> Prompts:
        rows = load_rows(path, "prompts")
        return cls(rows["prompt"], {name: rows[name] for name in rows.column_names if name != "prompt"})

    def select(self, rows: list[int]) -> Prompts:
        """Rows `rows`, in that order (repeats allowed)."""
        return Prompts([self.texts[i] for i in rows], {k: [v[i] for i in rows] for k, v in self.columns.items()})


def within_length(tokenizer, prompts: list[str], limit: int | None, what: str, setting: str) -> list[str]:
    """`prompts` without those whose chat rendering is longer than `limit` tokens (all of them for None).

    `what` names the prompts (a field and its file) and `setting` the limit's dotted key, for the log line
    and for the error when no prompt is left.
    """
    if limit is None:
        return prompts
    lengths = [len(ids) for ids in tokenizer([chat_prompt(tokenizer, p) for p in prompts],
                                             add_special_tokens=False)["input_ids"]]
    kept = [p for p, n in zip(prompts, lengths) if n <= limit]
    if not kept:
        raise StageError(f"every prompt of {what} is longer than {setting}={limit} tokens (shortest {min(lengths)}); "
                         "raise the limit")
    if len(kept) < len(prompts):
        log.info("%d of %d %s longer than %s=%d dropped", len(prompts) - len(kept), len(prompts), what, setting, limit)
    return kept


def step_rows(step: int, batch_size: int, group_size: int, num_prompts: int, seed: int) -> list[int]:
    """Row indices of `step`'s rollout: batch_size / group_size prompts, each repeated group_size times in a
    row (a group). A seeded shuffle per pass over the prompts, so resuming at any step is exact."""
    per_step, out = batch_size // group_size, []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, num_prompts)
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out += [int(order[pos])] * group_size
    return out
