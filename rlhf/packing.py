"""Packed sequences: a batch's real tokens in one row, so the PPO forwards spend nothing on padding.

A rollout batch is laid out `[pad.. prompt | response ..pad]` per row (see rollout.py). On the tiny
models a quarter of those columns are padding, and more than half of the columns the LM head reads are
(a minibatch is as long as its longest prompt plus its longest response). Packing puts every row's
real tokens one after another in a single row of length L, with position ids starting again at 0 for
each sequence, so the linear layers and the LM head see real tokens only.

Attention must stay within each sequence. While a `Packed` batch is `active`, the attention function
registered here lays each sequence out as a row of its own (right-padded, so plain causal attention
is exact), runs SDPA, and packs the result back: the work of attention is that of the padded batch,
everything else is that of the real tokens. Outside a packed forward (generation, evaluation) the
function is transformers' SDPA unchanged.

A model takes part through `use_packed_attention(model)`. It works for architectures whose attention
goes through transformers' attention interface (Llama, GPT-NeoX, GPT-2 are tested); a packed forward
that never reached it raises instead of silently attending across sequences.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch

ATTENTION = "rlhf_packed_sdpa"
"""The attention implementation name models are switched to."""

_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rlhf_packed", default=None)


class Packed(NamedTuple):
    """A rollout batch (B rows) packed into one row of its L real tokens. N = real response tokens."""

    input_ids: torch.Tensor
    """(1, L) the real tokens of row 0, then of row 1, ... (prompt then response each)."""
    position_ids: torch.Tensor
    """(1, L) position of each token within its own sequence (0 at each sequence's first token)."""
    sequence: torch.Tensor
    """(L,) the row each token came from."""
    response_mask: torch.Tensor
    """(B, R) bool: where per-response-token results go back to (`unpack`)."""
    before_response: torch.Tensor
    """(N,) index of the token before each real response token, in `response_mask`'s row-major order:
    the logits and the value read there belong to that response token."""
    last: torch.Tensor
    """(B,) index of each sequence's last real token (the EOS where there is one)."""
    rows: torch.Tensor | None = None
    """(B, T) where rows share prompts (`pack(..., share_prompts=True)`): the packed index of each row's
    tokens, its prompt's then its response's (padding slots point at token 0), the rows attention runs
    over; `sequence` and `position_ids` then say which row and slot each token's output is read from
    (the first row of its prompt for a shared prompt token). None: every token is in one row only."""

    @contextlib.contextmanager
    def active(self):
        """Run a model forward on this batch inside: attention then keeps to each sequence."""
        shape = (tuple(self.rows.shape) if self.rows is not None
                 else (int(self.sequence[-1]) + 1, int(self.position_ids.max()) + 1))
        state = {"sequence": self.sequence, "position": self.position_ids[0], "rows": self.rows,
                 "shape": shape, "calls": 0}
        token = _ACTIVE.set(state)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        if state["calls"] == 0:
            raise RuntimeError(
                "a packed forward never reached the packed attention, so its sequences would attend to each "
                "other: the model's attention does not go through transformers' attention interface, or "
                "use_packed_attention was not called on it. Set the RL stage's pack_sequences=false for this model.")


def pack(query_ids, query_mask, response_ids, response_mask, share_prompts: bool = False) -> Packed:
    """Pack a left-padded prompt batch (B, P) and a right-padded response batch (B, R) into one row.

    `share_prompts`: rows with the same prompt (a GRPO group, in any order) keep one copy of it; each of
    their responses follows it with positions continuing from the prompt's, and attention runs each row
    over that copy and its own response (`Packed.rows`). The linear layers then see every prompt once,
    and the prompt's gradient sums over the responses that read it: the same numbers to float rounding.
    """
    if share_prompts:
        return _pack_shared(query_ids, query_mask, response_ids, response_mask)
    ids = torch.cat([query_ids, response_ids], dim=1)  # (B, T)
    mask = torch.cat([query_mask, response_mask], dim=1).bool()  # (B, T)
    lengths = mask.sum(dim=1)  # (B,)
    starts = lengths.cumsum(0) - lengths  # (B,) where each sequence begins in the packed row
    index = (mask.flatten().cumsum(0) - 1).view(mask.shape)  # (B, T) packed index of every real token
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths)  # (L,)
    position = torch.arange(len(sequence), device=ids.device) - starts[sequence]  # (L,)
    response_index = index[:, query_ids.shape[1]:][response_mask.bool()]  # (N,)
    return Packed(input_ids=ids[mask].unsqueeze(0), position_ids=position.unsqueeze(0), sequence=sequence,
                  response_mask=response_mask.bool(), before_response=response_index - 1,
                  last=starts + lengths - 1)


def _pack_shared(query_ids, query_mask, response_ids, response_mask) -> Packed:
    """`pack` with each distinct prompt once: [prompt a | its responses | prompt b | its responses ...]."""
    q_mask, r_mask = query_mask.bool(), response_mask.bool()
    _, group = torch.unique(torch.where(q_mask, query_ids, -1), dim=0, return_inverse=True)  # (B,)
    device, n = query_ids.device, len(group)
    row_index = torch.zeros(n, int((q_mask.sum(1) + r_mask.sum(1)).max()), dtype=torch.long, device=device)
    before: list[torch.Tensor | None] = [None] * n  # per row: the tokens that predict its response's
    last = torch.empty(n, dtype=torch.long, device=device)
    ids, positions, sequence = [], [], []
    offset = 0
    for g in dict.fromkeys(group.tolist()):  # groups in the order of their first row
        members = (group == g).nonzero().flatten().tolist()
        prompt = query_ids[members[0]][q_mask[members[0]]]
        length = len(prompt)
        prompt_slots = torch.arange(offset, offset + length, device=device)
        ids.append(prompt)
        positions.append(torch.arange(length, device=device))
        sequence.append(torch.full((length,), members[0], device=device))
        offset += length
        for b in members:
            response = response_ids[b][r_mask[b]]
            k = len(response)
            own = torch.arange(offset, offset + k, device=device)
            ids.append(response)
            positions.append(torch.arange(length, length + k, device=device))
            sequence.append(torch.full((k,), b, device=device))
            row_index[b, : length + k] = torch.cat([prompt_slots, own])
            before[b] = torch.cat([prompt_slots[-1:], own[:-1]])[:k]
            last[b] = own[-1] if k else prompt_slots[-1]
            offset += k
    return Packed(input_ids=torch.cat(ids).unsqueeze(0), position_ids=torch.cat(positions).unsqueeze(0),
                  sequence=torch.cat(sequence), response_mask=r_mask, before_response=torch.cat(before), last=last,
                  rows=row_index)


def unpack(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-response-token values (N,) back to the batch layout (B, R); 0 at padding. Differentiable."""
    out = values.new_zeros(response_mask.shape)
    return out.masked_scatter(response_mask.bool(), values)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """SDPA with each packed sequence as its own row; transformers' SDPA outside a packed forward.

    query/key/value are (1, heads, L, head_dim) in a packed forward; returns (1, L, heads, head_dim)
    like `sdpa_attention_forward`.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    state = _ACTIVE.get()
    if state is None:
        positions = kwargs.get("position_ids")
        if attention_mask is None and positions is not None and query.shape[2] > 1 and bool((positions[:, 1:] == 0).any()):
            # a packed row outside `Packed.active`: e.g. a gradient-checkpointing recompute in the backward
            raise RuntimeError("packed sequences reached attention outside a packed forward (gradient "
                               "checkpointing is not supported with the RL stage's pack_sequences)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2] or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError("packed attention supports one packed row of full causal self-attention; "
                           "set the RL stage's pack_sequences=false for this model")
    state["calls"] += 1
    sequence, position, (n, t), shared = state["sequence"], state["position"], state["shape"], state["rows"]

    def by_sequence(x):  # (1, H, L, D) -> (n, H, t, D), each sequence a row from column 0
        if shared is not None:  # a shared prompt's tokens in every row that reads it (gradients sum)
            # index_select, not x[0][:, shared]: its backward (index_add_) sums a token's gradients in a fixed
            # order, where indexing's (index_put_ with accumulate) adds them atomically from several threads
            # on CPU, in an order that changes from run to run (a seeded run would not repeat to the bit)
            return x[0].index_select(1, shared.flatten()).unflatten(1, shared.shape).transpose(0, 1)
        rows = x.new_zeros(n, t, x.shape[1], x.shape[3])
        rows[sequence, position] = x[0].transpose(0, 1)
        return rows.transpose(1, 2)

    groups = getattr(module, "num_key_value_groups", 1)
    q = by_sequence(query)
    k, v = repeat_kv(by_sequence(key), groups), repeat_kv(by_sequence(value), groups)
    # Right-padded rows: causal attention never lets a real token see the padding after it.
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
    return out.transpose(1, 2)[sequence, position].unsqueeze(0), None  # (1, L, H, D)


def packed_mask(*args, **kwargs):
    """No mask in a packed forward (`packed_attention` makes its own rows); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if _ACTIVE.get() is not None else sdpa_mask(*args, **kwargs)


def use_packed_attention(model) -> None:
    """Switch `model` (a transformers model) to the packed attention; identical to SDPA when not packed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, packed_mask)
    model.set_attn_implementation(ATTENTION)
