"""Data loading: every schema, every local format, and errors that name the file and line."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import write_jsonl
from rlhf.data import DataError, fingerprint, load_rows, pack_texts


def test_jsonl_json_txt_gz_parquet(tmp_path):
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "a.json"
    js.write_text(json.dumps(rows))
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    for path in (jl, js, gz):
        assert load_rows(str(path), "sft").to_list() == rows
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert load_rows(str(txt), "text")["text"] == ["first doc", "second doc"]
    import datasets

    pq = tmp_path / "a.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    assert load_rows(str(pq), "sft").to_list() == rows
    assert len(load_rows(str(jl), "sft", limit=1)) == 1


def test_messages_schema(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p = write_jsonl(tmp_path / "m.jsonl", [good])
    assert load_rows(str(p), "sft")[0]["messages"][1]["content"] == "hello"
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    p = write_jsonl(tmp_path / "m2.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"m2.jsonl line 2: the last message must be the assistant"):
        load_rows(str(p), "sft")


@pytest.mark.parametrize(
    "content, schema, pattern",
    [
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": ""}\n', "sft", r'line 2: "response" is empty'),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"\n', "sft", r"line 2: malformed JSON"),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n', "prompts", r"line 2: not valid UTF-8 \(byte 0xff"),
        (b"", "text", r"file is empty"),
        (b"\n\n", "text", r"file is empty"),
        (b'{"prompt": "a"}\n', "sft", r'line 1: missing field\(s\); a sft row needs \{"prompt", "response"\}'),
        (b'{"prompt": "a", "chosen": "x", "rejected": "x"}\n', "preferences", r'line 1: "chosen" and "rejected" are identical'),
        (b'{"prompt": "a", "chosen": "", "rejected": "x"}\n', "preferences", r'line 1: "chosen" is empty'),
        (b'{"prompt": 3}\n', "prompts", r'line 1: "prompt" must be a string'),
        (b'["a"]\n', "prompts", r"line 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, schema, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.jsonl.*" + pattern if "line" in pattern else pattern) as e:
        load_rows(str(p), schema)
    assert str(p) in str(e.value)


def test_missing_file_and_unreachable_hub_dataset(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(str(tmp_path / "nope.jsonl"), "text")
    with pytest.raises(DataError, match=r"no-such-owner/no-such-dataset: not a local file"):
        load_rows("no-such-owner/no-such-dataset", "text")


def test_fingerprint_follows_content(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    f1 = fingerprint(str(p))
    assert fingerprint(str(p)) == f1
    write_jsonl(p, [{"text": "two"}])
    assert fingerprint(str(p)) != f1
    assert fingerprint("owner/name#test") == "hub:owner/name#test"


class CharTokenizer:
    """A character tokenizer for pack_texts: keeps the arithmetic visible."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_pack_texts_joins_with_eos_and_drops_tail():
    import datasets

    ds = datasets.Dataset.from_list([{"text": "abc"}, {"text": "de"}, {"text": "f"}])
    packed = pack_texts(ds, CharTokenizer(), block_size=4)
    # stream: a b c EOS d e EOS f EOS (9 tokens) -> two full blocks of 4, the last token dropped
    assert packed["input_ids"] == [[97, 98, 99, 0], [100, 101, 0, 102]]


def test_pack_texts_in_two_processes_packs_the_same_blocks():
    import datasets

    # 2,500 documents of uneven length: more than one 1,000-row packing batch, so a process boundary in
    # the packing would move block boundaries and drop tails
    ds = datasets.Dataset.from_list([{"text": "xyz"[: 1 + i % 3] * (1 + i % 5)} for i in range(2500)])
    one = pack_texts(ds, CharTokenizer(), block_size=7)["input_ids"]
    assert len(one) > 1000
    assert pack_texts(ds, CharTokenizer(), block_size=7, num_proc=2)["input_ids"] == one
