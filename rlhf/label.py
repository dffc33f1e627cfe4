"""Human labelling in the terminal: pick the better of two responses, building a preference file.

The human-feedback path for users with real annotators. Candidates come from a JSON Lines file of
`{"prompt", "responses": [r1, r2, ...]}` rows (what `rlhf generate --samples 2` writes); each decision
is appended at once to the output as `{"prompt","chosen","rejected"}`, the reward stage's schema, so a
session can stop any time and continue later where it left off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

KEYS = "1 = first is better, 2 = second is better, s = skip (tie or both bad), q = quit"


def load_candidates(path: str) -> list[dict]:
    """Candidate rows with at least two different responses; errors name the file and line."""
    from rlhf.data import json_lines
    from rlhf.errors import DataError

    rows = []
    for number, row in json_lines(Path(path)):
        responses = row.get("responses") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(responses, list):
            raise DataError(f'{path} line {number}: expected {{"prompt": str, "responses": [str, str, ...]}}')
        distinct = list(dict.fromkeys(r.strip() for r in responses if isinstance(r, str) and r.strip()))
        if len(distinct) >= 2:
            rows.append({"prompt": row["prompt"], "a": distinct[0], "b": distinct[1]})
    return rows


def label(candidates: list[dict], out_path: str, read: Callable[[str], str] = input,
          out: TextIO = sys.stdout) -> dict[str, int]:
    """Ask for a choice on every unlabelled candidate; append each preference to `out_path` at once."""
    done = set()
    path = Path(out_path)
    if path.exists():
        done = {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()}
    todo = [c for c in candidates if c["prompt"] not in done]
    counts = {"labelled": 0, "skipped": 0, "already": len(candidates) - len(todo)}
    print(f"{len(todo)} to label ({counts['already']} already in {out_path}). {KEYS}", file=out, flush=True)
    with open(path, "a") as f:
        for i, c in enumerate(todo, start=1):
            print(f"\n[{i}/{len(todo)}] {c['prompt']}\n  1: {c['a']}\n  2: {c['b']}", file=out, flush=True)
            while True:
                try:
                    answer = read("better? [1/2/s/q] ").strip().lower()
                except EOFError:
                    answer = "q"
                if answer in ("1", "2", "s", "q"):
                    break
                print(KEYS, file=out, flush=True)
            if answer == "q":
                break
            if answer == "s":
                counts["skipped"] += 1
                continue
            chosen, rejected = (c["a"], c["b"]) if answer == "1" else (c["b"], c["a"])
            f.write(json.dumps({"prompt": c["prompt"], "chosen": chosen, "rejected": rejected}) + "\n")
            f.flush()
            counts["labelled"] += 1
    print(f"\nlabelled {counts['labelled']}, skipped {counts['skipped']}; preferences in {out_path}", file=out)
    return counts
