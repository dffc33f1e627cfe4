"""Rebuild the default experiment's data from the Debian packages `fortunes` and `wordnet-base`.

    apt-get install fortunes wordnet-base
    python data/build.py            # or: make data

Writes gzipped JSON Lines (deterministic: same packages + seed -> byte-identical files):

    pretrain/{train,valid}.jsonl.gz      {"text"}: fortunes, "word: definition." glosses, example sentences
    sft/{train,valid}.jsonl.gz           {"prompt": 'Use the word "X" in a sentence.', "response": example}
    prompts/{train,eval}.jsonl.gz        {"prompt"} for words in no SFT training prompt (PPO and evaluation)
    preferences/{train,valid}.jsonl.gz   {"prompt","chosen","rejected"}: two human examples ranked by VADER

SFT, prompt and preference splits are disjoint by word, so held-out prompts are really unseen.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
SKIP_FORTUNES = {"art", "ascii-art"}  # pictures, not prose
PROMPT = 'Use the word "{}" in a sentence.'
MAX_EXAMPLE_CHARS = 200


def read_fortunes() -> list[str]:
    """Every fortune of the Debian package (offensive ones are not installed by it)."""
    docs = []
    for path in sorted(FORTUNES.iterdir()):
        if path.is_dir() or path.suffix in (".dat", ".u8") or path.name in SKIP_FORTUNES or path.is_symlink():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for chunk in text.split("\n%\n"):
            chunk = "\n".join(line.rstrip() for line in chunk.strip("%\n").splitlines()).strip()
            if chunk and "\ufffd" not in chunk and all(c.isprintable() or c in "\n\t" for c in chunk):
                docs.append(chunk)
    return docs


def read_wordnet() -> tuple[list[str], dict[str, list[str]]]:
    """(gloss lines "word: definition.", {lemma: [example sentences that contain it]})."""
    glosses, examples = [], defaultdict(list)
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # license header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            n_words = int(parts[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
            quoted = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split('; "')[0].split(';"')[0].strip().rstrip(";").strip()
            if definition:
                glosses.append(f"{lemmas[0]}: {definition}.")
            for sentence in quoted:
                sentence = sentence.strip()
                if not sentence or len(sentence) > MAX_EXAMPLE_CHARS:
                    continue
                for lemma in lemmas:
                    if re.search(rf"\b{re.escape(lemma)}\b", sentence, flags=re.IGNORECASE):
                        examples[lemma].append(sentence)
    return glosses, examples


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Gzip with mtime 0 and a fixed name, renamed into place: rebuilds are byte-identical and atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(raw.getvalue())
    os.replace(tmp, path)
    print(f"  {path}: {len(rows)} rows, {len(raw.getvalue()) / 1e6:.2f} MB")


def split_words(words: list[str], fraction: float, rng: random.Random) -> tuple[set[str], set[str]]:
    shuffled = sorted(words)
    rng.shuffle(shuffled)
    k = int(len(shuffled) * fraction)
    return set(shuffled[k:]), set(shuffled[:k])


def build(out: Path, seed: int) -> None:
    rng = random.Random(seed)
    print("reading fortunes and WordNet ...")
    fortunes = read_fortunes()
    glosses, examples = read_wordnet()
    sentences = sorted({s for ss in examples.values() for s in ss})

    # 1. pretraining corpus: everything, documents shuffled, 2% held out
    docs = sorted(set(fortunes) | set(glosses) | set(sentences))
    rng.shuffle(docs)
    n_valid = len(docs) // 50
    write_jsonl_gz(out / "pretrain/valid.jsonl.gz", [{"text": d} for d in docs[:n_valid]])
    write_jsonl_gz(out / "pretrain/train.jsonl.gz", [{"text": d} for d in docs[n_valid:]])

    # 2. SFT pairs, split by word; lowercase alphabetic single words make clean prompts
    usable = sorted(w for w in examples if re.fullmatch(r"[a-z]{3,14}", w))
    sft_train_words, sft_valid_words = split_words(usable, 0.03, rng)
    sft = {name: [{"prompt": PROMPT.format(w), "response": s} for w in sorted(ws) for s in sorted(set(examples[w]))]
           for name, ws in (("train", sft_train_words), ("valid", sft_valid_words))}
    for name, rows in sft.items():
        rng.shuffle(rows)
        write_jsonl_gz(out / f"sft/{name}.jsonl.gz", rows)

    # 3. prompts for PPO and evaluation: held-out SFT words plus common words WordNet has no example for
    lemmas_without_examples = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"index.{pos}").read_text(encoding="latin-1").splitlines():
            word = line.split(" ", 1)[0]
            if re.fullmatch(r"[a-z]{3,10}", word) and word not in examples:
                lemmas_without_examples.add(word)
    pool = sorted(sft_valid_words | lemmas_without_examples)
    rng.shuffle(pool)
    eval_words, ppo_words = pool[:512], pool[512:4512]
    write_jsonl_gz(out / "prompts/eval.jsonl.gz", [{"prompt": PROMPT.format(w)} for w in eval_words])
    write_jsonl_gz(out / "prompts/train.jsonl.gz", [{"prompt": PROMPT.format(w)} for w in ppo_words])

    # 4. preferences: two different human examples of one word, ranked by the gold judge (VADER)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    pairs = []
    for w in usable:
        scored = sorted({(vader.polarity_scores(s)["compound"], s) for s in set(examples[w])})
        if len(scored) >= 2 and scored[-1][0] - scored[0][0] >= 0.05:
            pairs.append({"prompt": PROMPT.format(w), "chosen": scored[-1][1], "rejected": scored[0][1], "word": w})
    pref_train_words, pref_valid_words = split_words([p["word"] for p in pairs], 0.1, rng)
    for name, ws in (("train", pref_train_words), ("valid", pref_valid_words)):
        rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs if p["word"] in ws]
        rng.shuffle(rows)
        write_jsonl_gz(out / f"preferences/{name}.jsonl.gz", rows)
    print(f"done: {len(fortunes)} fortunes, {len(glosses)} glosses, {len(sentences)} example sentences, "
          f"{len(usable)} words with examples, {len(lemmas_without_examples)} without")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory (default: data/)")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffles and splits")
    args = p.parse_args()
    for src in (FORTUNES, WORDNET):
        if not src.is_dir():
            raise SystemExit(f"{src} not found: apt-get install fortunes wordnet-base")
    build(args.out, args.seed)


if __name__ == "__main__":
    main()
