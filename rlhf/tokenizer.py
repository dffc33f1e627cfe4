"""Train or load a tokenizer: byte-level BPE, distinct special tokens, and a chat template.

The chat template marks assistant turns with `{% generation %}` so TRL can put the loss on assistant
tokens only, and ends every assistant turn with EOS so the policy learns to stop. BOS, EOS and PAD are
three different tokens: PPO tells "the response ended" (EOS) from "nothing here" (PAD).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from rlhf.artifacts import digest
from rlhf.schema import checked

log = logging.getLogger("rlhf")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class TokenizerConfig:
    vocab_size: int = checked(4096, ge=256 + len(ROLE_TOKENS) + 3,
                              hint="the 256 byte symbols and the special tokens come first")
    """BPE vocabulary size, special tokens included."""
    min_frequency: int = checked(2, ge=1)
    """A pair must occur this often in the corpus to be merged."""
    max_documents: int | None = checked(None, ge=1)
    """Train the tokenizer on at most this many documents (None: the whole pretraining corpus)."""


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig):
    """Train a byte-level BPE tokenizer on `texts` and wrap it for `AutoTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable (no unknown token), and decoding is exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def load_tokenizer(path: str):
    """Load a tokenizer (artifact directory, local HF directory or hub id) and check it fits the pipeline.

    Released models often share EOS and PAD or have no pad token at all; PPO needs them distinct,
    so a missing pad token is added here and callers resize embeddings when the vocabulary grew.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token; set one before training")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        had = "no pad token" if tok.pad_token_id is None else f"pad = EOS ({tok.eos_token!r})"
        tok.add_special_tokens({"pad_token": PAD})
        log.info("%s: the tokenizer had %s; added %s (id %d), distinct from EOS", path, had, PAD, tok.pad_token_id)
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
        log.info("%s: the tokenizer had no chat template; using the pipeline's (rlhf/tokenizer.py)", path)
    return tok


def tokenizer_digest(tok) -> str:
    """Digest of what maps text to ids (vocabulary, merges, added tokens, pre/post-processing).

    Padding and truncation settings are left out: trainers change them at run time without changing
    which id a piece of text gets.
    """
    if hasattr(tok, "backend_tokenizer"):
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        return digest(json.dumps(spec, sort_keys=True))
    return digest(json.dumps(tok.get_vocab(), sort_keys=True))


def tokenizer_facts(tok) -> dict:
    """Digests and ids that downstream stages compare to refuse mismatched models."""
    return {
        "tokenizer_digest": tokenizer_digest(tok),
        "chat_template_digest": digest(tok.chat_template),
        "special_token_ids": {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "pad": tok.pad_token_id,
        },
        "vocab_size": len(tok),
    }
