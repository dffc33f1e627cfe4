"""Data: load local files or hub datasets, validate every row, fingerprint for artifact keys.

Wherever YAML names data it may name a local file (.jsonl, .json, .parquet, .txt, optionally .gz) or a
hub dataset id (`owner/name`, with `#split` to pick a split; default `train`). Schemas (JSON Lines):

    text         {"text"}
    sft          {"prompt", "response"}  or  {"messages": [{"role", "content"}, ...]}
    preferences  {"prompt", "chosen", "rejected"}
    prompts      {"prompt"}

Errors name the file and line (or row) and say what is wrong: `data/sft.jsonl line 41: "response" is empty`.

Rows in Anthropic's HH-RLHF form, `{"chosen", "rejected"}` full transcripts ("\n\nHuman: ...\n\nAssistant:
..."), are recognised by their shape and mapped onto the schema asked for: preferences take the dialogue
before the last assistant turn as the prompt and the two last turns as chosen and rejected; sft takes the
same prompt and the chosen last turn as the response; prompts take the dialogue before the last
assistant turn. All three present a dialogue the same way (one user turn holding the labelled earlier
turns), so the reward model and PPO see prompts in the form SFT trained on. Rows the
mapping cannot use (an unparsable transcript, identical or empty answers) are dropped and counted.

A local directory is loaded like a hub dataset (`datasets.load_dataset(dir, split=...)`), so a copy of a
hub dataset on disk stands in for it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.errors import DataError

log = logging.getLogger("rlhf")

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
SCHEMAS: dict[str, tuple[tuple[str, ...], ...]] = {
    # each schema: alternative sets of required non-empty string fields
    "text": (("text",),),
    "sft": (("prompt", "response"), ("messages",)),
    "preferences": (("prompt", "chosen", "rejected"),),
    "prompts": (("prompt",),),
}


def is_local(spec: str) -> bool:
    """A data spec names a local file when it is one or carries a data-file suffix (directories and hub
    ids load through `datasets.load_dataset`)."""
    return Path(spec).is_file() or Path(spec.removesuffix(".gz")).suffix in LOCAL_SUFFIXES


# ---- Anthropic HH-RLHF transcripts ---------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_hh_row(row: Any) -> bool:
    """A row in HH-RLHF form: chosen and rejected transcripts and no prompt."""
    return (isinstance(row, dict) and "prompt" not in row and isinstance(row.get("chosen"), str)
            and isinstance(row.get("rejected"), str) and "\n\nAssistant:" in row["chosen"])


def parse_transcript(text: str) -> list[dict[str, str]] | None:
    """'\n\nHuman: a\n\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}].

    None when the text does not start with a turn marker or a turn is empty.
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():  # text before the first marker
        return None
    turns = [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    if not turns or any(not t["content"] for t in turns):
        return None
    return turns


def _dialogue_text(turns: list[dict[str, str]]) -> str:
    """The prompt string of a dialogue: a single user turn as itself, longer ones as a labelled transcript."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[t['role']]}: {t['content']}" for t in turns)


def from_hh(row: dict[str, Any], schema: str) -> dict[str, Any] | None:
    """An HH-RLHF row mapped onto `schema`, or None when it cannot be used (see the module docstring)."""
    chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
    if chosen is None or chosen[-1]["role"] != "assistant" or len(chosen) < 2:
        return None
    if schema == "text":
        return {"text": row["chosen"].strip()}
    prompt = _dialogue_text(chosen[:-1])
    if schema == "sft":
        return {"prompt": prompt, "response": chosen[-1]["content"]}
    if schema == "prompts":
        return {"prompt": prompt}
    if rejected is None or rejected[:-1] != chosen[:-1] or rejected[-1]["role"] != "assistant":
        return None
    if rejected[-1]["content"].strip() == chosen[-1]["content"].strip():
        return None
    return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _map_hh(rows, schema: str, where: str) -> list[dict[str, Any]]:
    mapped = [from_hh(dict(r), schema) for r in rows]
    kept = [r for r in mapped if r is not None]
    if len(kept) < len(mapped):
        log.warning("%s: %d of %d HH-RLHF rows dropped (unparsable transcript, or identical or empty answers)",
                    where, len(mapped) - len(kept), len(mapped))
    return kept


def fingerprint(spec: str) -> str:
    """Content hash of a local file, or the id and split of a hub dataset (the hub pins revisions)."""
    if is_local(spec):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"{spec}: file not found")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()[:16]
    folder = Path(spec.partition("#")[0])
    if folder.is_dir():  # a local stand-in for a hub dataset: its files' contents, and the split
        h = hashlib.sha256(spec.partition("#")[2].encode())
        for f in sorted(folder.rglob("*")):
            if f.is_file() and ".cache" not in f.parts:
                h.update(str(f.relative_to(folder)).encode())
                h.update(f.read_bytes())
        return "dir:" + h.hexdigest()[:16]
    return "hub:" + spec


def _open_text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoding strictly so bad bytes are reported by line."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    for number, line in enumerate(io.BytesIO(raw), start=1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} line {number}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                "re-encode the file as UTF-8"
            ) from None


def _check_row(row: Any, schema: str, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    options = SCHEMAS[schema]
    fields = next((opt for opt in options if all(k in row for k in opt)), None)
    if fields is None:
        wanted = " or ".join("{" + ", ".join(f'"{k}"' for k in opt) + "}" for opt in options)
        raise DataError(f"{where}: missing field(s); a {schema} row needs {wanted}, got keys {sorted(row)}")
    for k in fields:
        value = row[k]
        if k == "messages":
            _check_messages(value, where)
        elif not isinstance(value, str):
            raise DataError(f'{where}: "{k}" must be a string, got {type(value).__name__}')
        elif not value.strip():
            raise DataError(f'{where}: "{k}" is empty')
    if schema == "preferences" and row["chosen"].strip() == row["rejected"].strip():
        raise DataError(f'{where}: "chosen" and "rejected" are identical; a preference needs two different responses')
    return row


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON Lines file (optionally gzipped);
    malformed JSON, bad gzip and bad UTF-8 are reported by file and line."""
    for number, line in _open_text_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: malformed JSON ({e.msg} at column {e.colno})") from None


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f'{where}: messages[{i}] needs "role" system, user or assistant')
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(f'{where}: messages[{i}] "content" is empty or not a string')
    if messages[-1]["role"] != "assistant":
        raise DataError(f'{where}: the last message must be the assistant\'s response')


def read_local(path: Path, schema: str) -> list[dict[str, Any]]:
    """Read and validate every row of a local .jsonl/.json/.txt file (optionally gzipped)."""
    kind = Path(str(path).removesuffix(".gz")).suffix
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if kind == ".txt":
        if schema != "text":
            raise DataError(f"{path}: a .txt file holds plain text (one document per line), not {schema} rows")
        rows = [{"text": line.rstrip("\n")} for _, line in _open_text_lines(path) if line.strip()]
    elif kind == ".json":
        text = "".join(line for _, line in _open_text_lines(path))
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
        rows = [_check_row(r, schema, f"{path} item {i}") for i, r in enumerate(data)]
    else:
        rows = []
        for number, row in json_lines(path):
            if is_hh_row(row):
                row = from_hh(row, schema)
                if row is None:
                    continue
            rows.append(_check_row(row, schema, f"{path} line {number}"))
    if not rows:
        raise DataError(f"{path}: file is empty; it needs at least one {schema} row")
    return rows


def load_rows(spec: str, schema: str, limit: int | None = None):
    """Load a local file or hub dataset as a `datasets.Dataset`, every row validated against `schema`."""
    import datasets

    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; one of {sorted(SCHEMAS)}")
    if is_local(spec):
        path = Path(spec)
        if Path(spec.removesuffix(".gz")).suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            _validate_dataset(ds, schema, spec)
        else:
            ds = datasets.Dataset.from_list(read_local(path, schema))
    else:
        name, _, split = spec.partition("#")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # the hub client raises many types; the message is what matters
            raise DataError(
                f"{spec}: not a local file and could not be loaded as a hub dataset ({type(e).__name__}: {e}). "
                "Check the path, or the dataset id and network access (HF_HUB_OFFLINE)."
            ) from None
        if len(ds) and is_hh_row(ds[0]):
            ds = datasets.Dataset.from_list(_map_hh(ds, schema, spec))
        _validate_dataset(ds, schema, spec)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


CHECKS_VERSION = 1
"""Part of the name under which a file that passed `check_data` is remembered: bump it when the row
checks change, so files checked by the old rules are checked again."""

_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(#[\w.\[\]:%+-]+)?$")


def check_data(spec: str, schema: str, cache_dir: Path | None = None) -> None:
    """Check every row of the data `spec` names against `schema`, without building a dataset.

    What `Stage.check` runs before anything trains. A local file is parsed whole; once it passed, a marker
    named by its content fingerprint and schema under `cache_dir/checked-data/` lets later checks skip
    the parse (the default pretraining corpus takes about 2 s), until its content changes. A directory
    (a hub dataset on disk) must exist; a hub dataset id must look like `owner/name[#split]`: the hub
    is not asked, so plans run offline.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; one of {sorted(SCHEMAS)}")
    if not is_local(spec):
        if Path(spec.partition("#")[0]).is_dir():
            return
        if spec.startswith(("/", ".", "~")) or not _HUB_DATASET.match(spec):
            raise DataError(f"{spec}: no such file or directory, and not a hub dataset id (owner/name, "
                            "optionally #split); check the path")
        return
    marker = None
    if cache_dir is not None:
        marker = Path(cache_dir) / "checked-data" / f"{schema}-{fingerprint(spec).replace(':', '-')}-v{CHECKS_VERSION}"
        if marker.is_file():
            return
    if Path(spec.removesuffix(".gz")).suffix == ".parquet":
        load_rows(spec, schema)
    else:
        read_local(Path(spec), schema)
    if marker is not None:
        try:  # best effort: an unwritable cache only means the next check parses again
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f"{marker.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(spec + "\n")
            os.replace(tmp, marker)
        except OSError:
            pass


def sample_rows(spec: str, schema: str, n: int) -> list[dict[str, Any]] | None:
    """The first `n` rows of a local data file (other fields included), None for a hub dataset or a
    directory, which are not read before training."""
    if not is_local(spec):
        return None
    if Path(spec.removesuffix(".gz")).suffix == ".parquet":
        return load_rows(spec, schema, limit=n).to_list()
    return read_local(Path(spec), schema)[:n]


def _validate_dataset(ds, schema: str, spec: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{spec}: dataset is empty; it needs at least one {schema} row")
    for i, row in enumerate(ds):
        _check_row(row, schema, f"{spec} row {i}")


def to_messages(row: dict[str, Any]) -> dict[str, Any]:
    """An sft row as chat messages: {"prompt","response"} becomes one user and one assistant turn."""
    if row.get("messages"):
        return {"messages": row["messages"]}
    return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]}


def pack_texts(ds, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenize documents, join them with EOS and cut into `block_size` blocks (causal-LM packing).

    Every block is full, so no padding and no attention mask are needed; the tail shorter than a
    block is dropped. `num_proc` processes tokenize; the packing runs in this one, since a process
    boundary would move the blocks' boundaries (and drop a tail per process).
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = (len(flat) // block_size) * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize")
    return tokenized.map(group, batched=True, batch_size=1000, desc=f"pack into {block_size}-token blocks")
