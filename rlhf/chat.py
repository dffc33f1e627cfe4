"""Talking to a model: an interactive terminal chat and batch generation from a file of prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

import torch

HELP = "Type a message. /reset clears the history, /quit (or end of input) leaves."


LANGUAGE_MODEL_KINDS = ("policy", "causal-lm")
"""Artifact kinds that `AutoModelForCausalLM` loads and that chat and generate can talk to."""


def resolve_model(ref: str, config: str | None = None) -> str:
    """A loadable path for a stage name (with a config), an alias `experiment/stage`, a key (prefix),
    a local directory or a hub id.

    A stage or artifact must hold a language model (a policy, or a pretrained causal LM): for any other
    kind (a reward model, a preference dataset) a ValueError says so and names the experiment's policies.
    """
    from rlhf.artifacts import ArtifactStore

    if Path(ref).is_dir():
        return ref
    store, experiment, policies = ArtifactStore("artifacts"), None, []
    if config:
        from rlhf.config import load_experiment

        exp = load_experiment(config)
        store, experiment = ArtifactStore.for_experiment(exp.config), exp.config.name
        policies = [name for name, spec in exp.stages.items() if spec.cls.kind == "policy"]
    candidates = [f"{experiment}/{ref}"] if experiment and "/" not in ref else []
    candidates.append(ref)
    for candidate in candidates:
        try:
            key = store.resolve(candidate)
            manifest = store.manifest(key)
        except KeyError:
            continue
        if manifest.get("kind") not in LANGUAGE_MODEL_KINDS:
            choices = f" ({', '.join(policies)} in {config})" if policies else ""
            raise ValueError(f"{ref!r}: stage {manifest.get('stage')!r} (artifact {key}) is a {manifest.get('kind')} "
                             f"artifact, not a policy; chat and generate talk to a policy stage{choices}")
        return str(store.local_dir(key))
    if "/" in ref and not ref.startswith((".", "/")) and not experiment:
        return ref  # a hub id: from_pretrained will fetch (or fail offline with its own message)
    raise KeyError(f"{ref!r} is not a stage of {config or 'the experiment'}, an alias, an artifact key in "
                   f"{store.url}, or a local model directory")


def chat_loop(model, tokenizer, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
              max_new_tokens: int = 64, temperature: float = 0.7) -> int:
    """Read user turns until /quit or end of input; stream each reply token by token. Returns turns answered."""
    from transformers import TextStreamer

    from rlhf.sampling import generate, generation_config

    history: list[dict] = []
    print(HELP, file=out, flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n",
                                                                      file=out, flush=True)
    turns = 0
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            print("(history cleared)", file=out, flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(model.device)
        print("model> ", end="", file=out, flush=True)
        with torch.no_grad():
            seq = generate(model, generation_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature),
                           **ids, streamer=streamer)
        reply = tokenizer.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        turns += 1
    return turns


def generate_file(model, tokenizer, prompts_path: str, out_path: str, *, batch_size: int, max_new_tokens: int,
                  temperature: float, samples: int = 1) -> int:
    """Answer every prompt of a prompts file in batches, written as JSON Lines.

    One sample per prompt gives {"prompt","response","ended"}; more give {"prompt","responses"}, the
    candidates `rlhf label` asks a person to rank.
    """
    from rlhf.data import load_rows
    from rlhf.sampling import sample

    prompts = load_rows(prompts_path, "prompts")["prompt"]
    repeated = [p for p in prompts for _ in range(samples)]
    out = sample(model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                 batch_size=batch_size, progress=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{out_path}.tmp")
    with open(tmp, "w") as f:
        for i, prompt in enumerate(prompts):
            group = out[i * samples : (i + 1) * samples]
            row = ({"prompt": prompt, "response": group[0].response, "ended": group[0].ended} if samples == 1
                   else {"prompt": prompt, "responses": [s.response for s in group]})
            f.write(json.dumps(row) + "\n")
    tmp.replace(out_path)
    return len(prompts)
