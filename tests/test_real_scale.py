"""configs/pythia-hh.yaml against local stand-ins for the hub: the same code path, tiny sizes.

The stand-ins imitate what matters about the real ones: a GPT-NeoX causal LM whose tokenizer has no pad
token and no chat template, with BOS = EOS = <|endoftext|> (as Pythia's), and a dataset directory of
HH-RLHF rows ({"chosen","rejected"} transcripts) loaded through `datasets.load_dataset(dir, split=...)`
as a hub id would be. Only the ids in the YAML are swapped (dotted overrides) and the sizes shrunk.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import REPO, sentences, write_jsonl
from rlhf.config import load_experiment
from rlhf.data import from_hh, load_rows
from rlhf.pipeline import Pipeline

CONFIG = REPO / "configs" / "pythia-hh.yaml"


def hh_rows(n: int, seed: int) -> list[dict]:
    """HH-style transcripts: single- and two-turn dialogues, the cheerful answer chosen."""
    rng = random.Random(seed)
    rows = []
    for i, s in enumerate(sentences(n, seed)):
        question = f"Tell me about the {rng.choice(s.rstrip('.').split()).lower()}."
        history = "\n\nHuman: Hello.\n\nAssistant: Hi, how can I help?" if i % 3 == 0 else ""
        good, bad = f"Happy {s.lower()}", f"Sad {s.lower()}"
        rows.append({"chosen": f"{history}\n\nHuman: {question}\n\nAssistant: {good}",
                     "rejected": f"{history}\n\nHuman: {question}\n\nAssistant: {bad}"})
    # a row the mapping must drop: both answers the same
    rows.append({"chosen": "\n\nHuman: Hi?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Yes."})
    return rows


def make_pythia_standin(dest: Path, texts: list[str]) -> Path:
    """A 2-layer GPT-NeoX with a Pythia-like tokenizer: <|endoftext|> as BOS and EOS, no pad, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25,
                           bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    GPTNeoXForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


SMALL = [
    "tracking.wandb=disabled",
    "stages.sft.max_examples=60", "stages.sft.max_length=64", "stages.sft.max_steps=4", "stages.sft.batch_size=4",
    "stages.sft.gradient_accumulation_steps=1", "stages.sft.warmup_steps=1", "stages.sft.bf16=false",
    "stages.sft.eval_examples=8", "evaluation.num_prompts=4", "evaluation.max_new_tokens=8",
    "stages.sft.min_eos_rate=0.0", "stages.sft.save_steps=2",
    "stages.reward.max_length=64", "stages.reward.max_steps=4", "stages.reward.batch_size=4",
    "stages.reward.gradient_accumulation_steps=1", "stages.reward.warmup_steps=1", "stages.reward.bf16=false",
    "stages.reward.min_accuracy=0.0", "stages.reward.stats_samples=8", "stages.reward.save_steps=2",
    "stages.ppo.num_steps=2", "stages.ppo.rollout_batch_size=4", "stages.ppo.num_minibatches=2",
    "stages.ppo.gradient_accumulation_steps=1", "stages.ppo.ppo_epochs=1", "stages.ppo.max_new_tokens=8",
    "stages.ppo.eval_every=0", "stages.ppo.save_every=1",
]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    hh = root / "Anthropic" / "hh-rlhf"
    write_jsonl(hh / "train.jsonl", hh_rows(60, 0))
    write_jsonl(hh / "test.jsonl", hh_rows(12, 1))
    texts = [r["chosen"] + r["rejected"] for r in hh_rows(60, 0)]
    model = make_pythia_standin(root / "EleutherAI" / "pythia-160m", texts)
    return {"root": root, "model": model, "hh": hh}


def test_hh_rows_map_onto_each_schema():
    row = {"chosen": "\n\nHuman: Hello.\n\nAssistant: Hi.\n\nHuman: A joke?\n\nAssistant: Knock knock.",
           "rejected": "\n\nHuman: Hello.\n\nAssistant: Hi.\n\nHuman: A joke?\n\nAssistant: No."}
    # the dialogue before the last answer is the prompt; a labelled transcript when it has several turns
    prompt = "Human: Hello.\n\nAssistant: Hi.\n\nHuman: A joke?"
    assert from_hh(row, "preferences") == {"prompt": prompt, "chosen": "Knock knock.", "rejected": "No."}
    assert from_hh(row, "prompts") == {"prompt": prompt}
    # SFT sees the prompt exactly as the reward model and PPO will (not as separate chat turns)
    assert from_hh(row, "sft") == {"prompt": prompt, "response": "Knock knock."}
    single = {"chosen": "\n\nHuman: Why?\n\nAssistant: Because.", "rejected": "\n\nHuman: Why?\n\nAssistant: No."}
    assert from_hh(single, "prompts") == {"prompt": "Why?"}  # one user turn: the text itself
    assert from_hh({"chosen": "no markers", "rejected": "x"}, "sft") is None
    diverging = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"}
    assert from_hh(diverging, "preferences") is None  # different dialogues are not a preference pair


def test_a_local_dataset_directory_loads_like_a_hub_dataset(standins):
    spec = f"{standins['hh']}#test"
    pairs = load_rows(spec, "preferences")
    assert len(pairs) == 12  # 13 rows, the identical pair dropped
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected"}
    assert pairs[0]["prompt"].startswith("Human: Hello.") and pairs[0]["chosen"].startswith("Happy")
    assert len(load_rows(spec, "sft")) == 13  # an SFT row needs only the chosen transcript


def test_pythia_hh_config_runs_on_local_standins(standins, workdir):
    model, hh = str(standins["model"]), str(standins["hh"])
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(model)
    assert raw.pad_token is None and raw.chat_template is None and raw.bos_token_id == raw.eos_token_id
    overrides = [
        f"store={workdir / 'store'}", f"tracking.dir={workdir / 'runs'}", f"stages.sft.model={model}",
        f"stages.sft.train_data={hh}#train", f"stages.sft.eval_data={hh}#test", f"evaluation.prompts={hh}#test",
        f"stages.reward.train_data={hh}#train", f"stages.reward.eval_data={hh}#test",
        f"stages.reward.stats_prompts={hh}#train",
        f"stages.ppo.prompts={hh}#train", *SMALL,
    ]
    pipe = Pipeline(load_experiment(CONFIG, overrides))
    assert pipe.order == ["sft", "reward", "ppo"]  # no pretraining
    results = {r.name: r for r in pipe.run()}
    assert all(r.ran for r in results.values())
    store = pipe.store
    sft = store.manifest(results["sft"].key)
    assert sft["inputs"]["model"]["external"] == model and sft["inputs"]["model"]["key"].startswith("dir:")
    assert sft["data"]["train"].startswith("dir:")  # the local stand-in is fingerprinted by content
    reward = store.manifest(results["reward"].key)
    assert reward["metrics"]["eval_pairs_human"] == 12
    # the published policy: a distinct pad token, our chat template, embeddings grown to the vocabulary
    from transformers import AutoModelForCausalLM

    out = store.local_dir(results["ppo"].key)
    tok = AutoTokenizer.from_pretrained(out)
    policy = AutoModelForCausalLM.from_pretrained(out)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template is not None and "{% generation %}" in tok.chat_template
    assert len(tok) == len(raw) + 1 == policy.get_input_embeddings().num_embeddings
    assert policy.config.model_type == "gpt_neox" and policy.generation_config.pad_token_id == tok.pad_token_id
    ppo = store.manifest(results["ppo"].key)
    assert ppo["metrics"]["train_steps"] == 2
    assert ppo["special_token_ids"]["pad"] == tok.pad_token_id
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 2]  # two steps, then the final evaluation
