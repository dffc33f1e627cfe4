"""Rebuild the default experiment's data from the Debian packages `fortunes` and `wordnet-base`.

    apt-get install fortunes wordnet-base
    python data/build.py            # or: make data

Writes gzipped JSON Lines (deterministic: same packages + seed -> byte-identical files):

    pretrain/{train,valid}.jsonl.gz      {"text"}: fortunes, "word: definition." glosses, example sentences
    sft/{train,valid}.jsonl.gz           {"prompt": "Use the word X in a sentence.", "response": example, phrases in a frame}
    prompts/{train,eval}.jsonl.gz        {"prompt", "word"} for words in no SFT training prompt (RL and evaluation)
    preferences/{train,valid}.jsonl.gz   {"prompt","chosen","rejected"}: human examples ranked by the gold judge

The words with example sentences are split at random into evaluation, RL and SFT words, so held-out
prompts are really unseen and come from the same distribution as the training prompts.
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
# No quotes around the word: the byte-level tokenizer would split `"firm"` into pieces (`f ir m`) unlike
# the space-led `Ġfirm` of a sentence, leaving nothing to copy from the prompt into the answer.
PROMPT = "Use the word {} in a sentence."
MAX_EXAMPLE_CHARS = 200
EVAL_WORDS, RL_WORDS = 512, 3000


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


def read_wordnet() -> tuple[list[str], dict[str, list[str]], dict[str, str], set[str]]:
    """(gloss lines "word: definition.", {lemma: [example sentences that contain it]}, {example: the part of
    speech of the first synset that gives it}, the verb lemmas)."""
    glosses, examples, pos_of, verbs = [], defaultdict(list), {}, set()
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
            if pos == "verb":
                verbs.update(lemma.lower() for lemma in lemmas)
            for sentence in quoted:
                sentence = sentence.strip()
                if not sentence or len(sentence) > MAX_EXAMPLE_CHARS:
                    continue
                pos_of.setdefault(sentence, pos)
                for lemma in lemmas:
                    if re.search(rf"\b{re.escape(lemma)}\b", sentence, flags=re.IGNORECASE):
                        examples[lemma].append(sentence)
    return glosses, examples, pos_of, verbs


# Most WordNet examples are phrases ("a jealous lover", "seek an education"); asked for a sentence, SFT
# would learn to answer with a phrase. A phrase whose shape its part of speech tells is set into a
# tone-neutral sentence frame (VADER scores every frame 0, so the gold judge's tone is the example's
# own); examples that already read as sentences, and phrases of other shapes, are kept as they are.
DETERMINERS = frozenset("a an the his her my their our your its this that these those some no every each".split())
NOUN_PHRASE_FRAMES = ("It was {}.", "I saw {}.", "We talked about {}.", "They found {}.")
BARE_NOUN_PHRASE_FRAMES = ("I saw {}.", "We talked about {}.", "They found {}.")
VERB_PHRASE_FRAMES = ("I wanted to {}.", "They will {}.", "We had to {}.")


def as_sentence(example: str, word: str, pos: str, verbs: set[str], rng: random.Random) -> str:
    """The example itself if it reads as a sentence (tasks.words.reads_as_sentence) or has no shape that a
    frame fits; else the example in a frame drawn from `rng`: a noun or adjective example opening with a
    determiner ("a jealous lover" -> "It was a jealous lover."), an adjective example opening with the
    adjective `word` ("livid bruises" -> "I saw livid bruises."), a verb example opening with a verb lemma
    ("seek an education" -> "I wanted to seek an education.")."""
    from tasks.words import reads_as_sentence

    if reads_as_sentence(example):
        return example
    first = example.split()[0]
    lowered = first.lower()
    if pos in ("noun", "adj") and lowered in DETERMINERS:
        frames = NOUN_PHRASE_FRAMES
    elif pos == "adj" and first == word:
        frames = BARE_NOUN_PHRASE_FRAMES
    elif pos == "verb" and first.islower() and first in verbs:
        frames = VERB_PHRASE_FRAMES
    else:
        return example
    phrase = example.rstrip(".!?;,")
    if first[0].isupper() and first[1:].islower() and lowered in DETERMINERS:
        phrase = lowered + phrase[len(first):]  # "The generic name" inside a frame is "the generic name"
    return rng.choice(frames).format(phrase)


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
    glosses, examples, pos_of, verbs = read_wordnet()
    sentences = sorted({s for ss in examples.values() for s in ss})

    # 1. pretraining corpus: everything, documents shuffled, 2% held out
    docs = sorted(set(fortunes) | set(glosses) | set(sentences))
    rng.shuffle(docs)
    n_valid = len(docs) // 50
    write_jsonl_gz(out / "pretrain/valid.jsonl.gz", [{"text": d} for d in docs[:n_valid]])
    write_jsonl_gz(out / "pretrain/train.jsonl.gz", [{"text": d} for d in docs[n_valid:]])

    # 2. words: a random split of the words that have example sentences into evaluation, RL and SFT words
    usable = sorted(w for w in examples if re.fullmatch(r"[a-z]{3,14}", w))
    shuffled = sorted(usable)
    rng.shuffle(shuffled)
    eval_words, rl_words, rest = shuffled[:EVAL_WORDS], shuffled[EVAL_WORDS:EVAL_WORDS + RL_WORDS], shuffled[EVAL_WORDS + RL_WORDS:]
    sft_train_words, sft_valid_words = split_words(rest, 0.03, rng)

    # 3. SFT pairs: every example sentence of a word, for the SFT words, phrases set into sentence frames
    # (`as_sentence`; the frames are drawn from their own generator, so every other file and split stays
    # what it was without them)
    frame_rng = random.Random(seed + 1)
    sft = {name: [{"prompt": PROMPT.format(w), "response": as_sentence(s, w, pos_of[s], verbs, frame_rng)}
                  for w in sorted(ws) for s in sorted(set(examples[w]))]
           for name, ws in (("train", sft_train_words), ("valid", sft_valid_words))}
    for name, rows in sft.items():
        rng.shuffle(rows)
        write_jsonl_gz(out / f"sft/{name}.jsonl.gz", rows)

    # 4. prompts for RL and evaluation, with the requested word as a column for the task judge
    write_jsonl_gz(out / "prompts/eval.jsonl.gz", [{"prompt": PROMPT.format(w), "word": w} for w in eval_words])
    write_jsonl_gz(out / "prompts/train.jsonl.gz", [{"prompt": PROMPT.format(w), "word": w} for w in rl_words])

    # 5. preferences on the SFT words, ranked by the gold judge (tasks.words.word_vader: VADER's tone of a
    # response that uses the word, -1 for one that does not): tone pairs (two examples of the word) and
    # task pairs (an example of the word against an example of another word that lacks it)
    from tasks.words import word_vader

    all_sentences = sorted({s for w in usable for s in examples[w]})
    pairs = []
    for w in sorted(sft_train_words | sft_valid_words):
        own = sorted(set(examples[w]))
        prompt = PROMPT.format(w)
        if len(own) >= 2:
            scores = word_vader([prompt] * len(own), own, word=[w] * len(own))
            ranked = sorted(zip(scores, own))
            if ranked[-1][0] - ranked[0][0] >= 0.05:
                pairs.append({"prompt": prompt, "chosen": ranked[-1][1], "rejected": ranked[0][1], "word": w})
        if rng.random() < 0.5:
            other = rng.choice(all_sentences)
            mine = rng.choice(own)
            good, bad = word_vader([prompt] * 2, [mine, other], word=[w] * 2)
            if good - bad >= 0.05:
                pairs.append({"prompt": prompt, "chosen": mine, "rejected": other, "word": w})
            elif bad - good >= 0.05:  # the other sentence happens to use the word too, in a better tone
                pairs.append({"prompt": prompt, "chosen": other, "rejected": mine, "word": w})
    for name, ws in (("train", sft_train_words), ("valid", sft_valid_words)):
        rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs if p["word"] in ws]
        rng.shuffle(rows)
        write_jsonl_gz(out / f"preferences/{name}.jsonl.gz", rows)
    print(f"done: {len(fortunes)} fortunes, {len(glosses)} glosses, {len(sentences)} example sentences, "
          f"{len(usable)} words with examples: {len(sft_train_words)} SFT, {len(sft_valid_words)} SFT held out, "
          f"{len(rl_words)} RL, {len(eval_words)} evaluation")


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
