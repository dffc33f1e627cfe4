"""Rollout machinery: sequences in, per-token logprobs / values / scores out.

Layout of every batch: prompts are LEFT-padded to P tokens, responses RIGHT-padded to R tokens, so
the sequence is `[pad.. prompt | response ..pad]` of length P + R and the response always starts at
column P. Position ids come from the attention mask, so padding never shifts a token's position.
The logits at column P - 1 + t predict response token t; the value of the state before token t is
read at the same column. With `packed=True` the forwards below run on the same batch packed into one
row of its real tokens instead (rlhf/packing.py); results come back in this layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf.ppo.core import entropy_from_logits, last_token_index, logprobs_from_logits
from rlhf.packing import Packed, pack, unpack, use_packed_attention


class Trajectory(NamedTuple):
    """One rollout batch. B = prompts in the batch, P = padded prompt length, R = padded response length."""

    query_ids: torch.Tensor
    """(B, P) left-padded prompt ids."""
    query_mask: torch.Tensor
    """(B, P) bool; True = a real prompt token."""
    response_ids: torch.Tensor
    """(B, R) generated ids, pad after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) bool; True = a real response token (up to and including the first EOS)."""
    logprobs: torch.Tensor
    """(B, R) policy logprobs of the response tokens at the sampling temperature."""
    ref_logprobs: torch.Tensor | None
    """(B, R) reference-model logprobs of the same tokens and temperature (None: no KL computed)."""
    values: torch.Tensor | None
    """(B, R) value estimates of the state before each response token (None: no value model)."""
    scores: torch.Tensor
    """(B,) reward-model score after the no-EOS penalty and normalisation."""
    raw_scores: torch.Tensor
    """(B,) the weighted sum of the rewards' raw scores (a reward model's as read at the last real token)."""
    has_eos: torch.Tensor
    """(B,) bool; True when the response ended with EOS."""
    episode_mask: torch.Tensor | None = None
    """(B, R) bool; True = a position with a reward (and a value): the response tokens, and the state
    after EOS where the stage places the score there (`with_state_after_eos`)."""
    source_scores: torch.Tensor | None = None
    """(B, S) each reward source's raw score, in the order of the stage's `rewards`."""
    token_weights: torch.Tensor | None = None
    """(B, R) importance weights trainer / sampling engine of the response tokens (None: the trainer sampled)."""

    def rows(self, index: torch.Tensor) -> "Trajectory":
        """The trajectory of rows `index` (fields that are None stay None)."""
        return Trajectory(*(t[index] if t is not None else None for t in self))


def load_rl_models(policy: str, rewards: dict[str, str], value: str | None, *, lora=None, reference: bool = True,
                   packed: bool = False):
    """The models of an RL loop: (policy, reference or None, value model or None, {name: reward model}, tokenizer).

    `policy`, each of `rewards` and `value` are paths or hub ids. The value model is a one-label
    sequence-classification model loaded from `value` (a reward model: its head starts as the reward
    head; the policy: a fresh head), None for no value model. With `lora` (`LoraSettings`, enabled) the
    policy gets adapters and there is no separate reference (the adapters-off policy is one); otherwise
    the reference is a frozen copy of the policy when `reference`. `packed`: every model runs packed
    forwards (rlhf/packing.py). Reward and value models have dropout off; reward models are frozen.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    from rlhf.models import disable_dropout, load_causal_lm, whole_models

    model, tok = load_causal_lm(policy)
    with whole_models():  # DeepSpeed partitions at prepare (rlhf.models.whole_models)
        scorers = {name: AutoModelForSequenceClassification.from_pretrained(path).requires_grad_(False).eval()
                   for name, path in rewards.items()}
        critic = None
        if value is not None:
            critic = AutoModelForSequenceClassification.from_pretrained(value, num_labels=1)
            critic.config.pad_token_id = tok.pad_token_id
    for m in (model, critic, *scorers.values()):
        if m is not None and packed:
            use_packed_attention(m)
    frozen_copy = None
    if lora is not None and lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config())
    elif reference:
        frozen_copy = copy.deepcopy(model).requires_grad_(False).eval()
    for m in (critic, *scorers.values()):
        if m is not None:
            disable_dropout(m)
    return model, frozen_copy, critic, scorers, tok


def _packed(packed: bool | Packed, query_ids, query_mask, response_ids, response_mask) -> Packed:
    """The batch's packed layout: the one given, or made now."""
    return packed if isinstance(packed, Packed) else pack(query_ids, query_mask, response_ids, response_mask)


def sequence_inputs(query_ids, query_mask, response_ids, response_mask):
    """(input_ids, attention_mask, position_ids) of the whole sequence, each (B, P + R)."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def policy_forward(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                   with_entropy: bool = False, entropy_grad: bool = True, packed: bool | Packed = False):
    """Logprobs (B, R) of the response tokens under `model` at `temperature` (and entropy if asked).

    With `entropy_grad=False` the entropy is a statistic only: computed without autograd, so none of
    its (B, R, V) intermediates are kept for a backward pass that would never use them.
    With `packed=True` the forward runs on the batch's real tokens only (rlhf/packing.py; the model
    must have `use_packed_attention`); padding positions of the results are 0. `packed` may also be the
    batch's `Packed` layout already made (one packing for every forward over a rollout batch).
    """
    if packed:
        batch = _packed(packed, query_ids, query_mask, response_ids, response_mask)
        # logits only where a response token is predicted: (1, N, V). A shared prompt's last token predicts
        # the first token of every response to it; the model keeps its logits once and they are copied with
        # index_select, whose backward sums the copies' gradients in a fixed order (indexing with repeated
        # positions inside the model would add them atomically from several threads on CPU, in an order that
        # changes from run to run, and a seeded run would not repeat to the bit)
        keep, copies = torch.unique(batch.before_response, return_inverse=True)
        repeated = len(keep) < len(batch.before_response)
        with batch.active():
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                           logits_to_keep=keep if repeated else batch.before_response).logits
        if repeated:
            logits = logits.index_select(1, copies)
        tokens = response_ids[batch.response_mask].unsqueeze(0)  # (1, N)
    else:
        input_ids, attention_mask, position_ids = sequence_inputs(query_ids, query_mask, response_ids, response_mask)
        # Only the last R + 1 columns' logits are read: the LM head (a large share of a small model's work,
        # forward and backward) is not run over the prompt.
        r = response_ids.shape[1]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=r + 1).logits
        logits = logits[:, :-1]  # (B, R, V): column p-1+t of the sequence predicts response token t
        tokens = response_ids
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits, temperature)
    if packed:
        logprobs = unpack(logprobs[0], response_mask)
        entropy = unpack(entropy[0], response_mask) if entropy is not None else None
    return logprobs, entropy


def head_per_token(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A sequence-classification model's scalar head applied at every position: (B, T).

    The reward model is trained on the head's output at the last real token; the value model reuses the
    same architecture and reads the head at every position. `model` may also be a `PerTokenHead`
    (possibly inside a DDP or DeepSpeed wrapper), whose forward is this function.
    """
    if not hasattr(model, "base_model_prefix"):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


class PerTokenHead(torch.nn.Module):
    """A sequence-classification model whose forward is `head_per_token`.

    Under several processes the value model is wrapped (DDP, DeepSpeed) and the wrapper synchronises
    gradients only for computation that runs through its own forward; reading the backbone and head
    directly would bypass it. Wrapped in this module, the per-token forward goes through the wrapper.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):
        """The wrapped model's transformer blocks, which FSDP's auto-wrap policy shards by."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return head_per_token(self.model, input_ids, attention_mask, position_ids)


def packed_heads(model, batch: Packed) -> torch.Tensor:
    """The head's output (value or reward) at every token of a packed batch: (L,)."""
    with batch.active():
        return head_per_token(model, batch.input_ids, None, batch.position_ids)[0]


def value_forward(model, query_ids, query_mask, response_ids, response_mask, packed: bool | Packed = False,
                  value_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Values (B, R) of the states before each response token (0 at padding when `packed`).

    `value_mask` (`with_state_after_eos`) also asks for the state after EOS, one column past a row's
    last token: the head at the EOS token. Padded forwards compute it anyway; packed ones read it at
    each sequence's last token.
    """
    if packed:
        batch = _packed(packed, query_ids, query_mask, response_ids, response_mask)
        heads = packed_heads(model, batch)  # (L,)
        # index_select: a shared prompt's last token is read once per response, its gradients summed in a
        # fixed order (as in `policy_forward`)
        values = unpack(heads.index_select(0, batch.before_response), response_mask)  # (B, R)
        if value_mask is None:
            return values
        after_eos = value_mask.bool() & ~response_mask.bool()  # (B, R), at most one column per row
        return torch.where(after_eos, heads[batch.last].unsqueeze(1), values)
    seq = sequence_inputs(query_ids, query_mask, response_ids, response_mask)
    p = query_ids.shape[1]
    return head_per_token(model, *seq)[:, p - 1 : -1]


def score_at_eos(model, query_ids, query_mask, response_ids, response_mask,
                 packed: bool | Packed = False) -> torch.Tensor:
    """Reward-model score (B,) read at the last real response token: the EOS when there is one."""
    if packed:
        batch = _packed(packed, query_ids, query_mask, response_ids, response_mask)
        return packed_heads(model, batch)[batch.last]
    seq = sequence_inputs(query_ids, query_mask, response_ids, response_mask)
    per_token = head_per_token(model, *seq)
    index = query_ids.shape[1] + last_token_index(response_mask)
    return per_token.gather(1, index.unsqueeze(1)).squeeze(1)


def trim_padding(traj: Trajectory, *per_token: torch.Tensor | None) -> tuple[Trajectory, ...]:
    """`traj` (a slice of a rollout batch) without the columns that are padding in every row.

    A minibatch holds fewer rows than the rollout it came from, so its longest prompt and response are
    often shorter than the batch's: the leading prompt columns and trailing response columns that no
    row uses are dropped, from `traj` and from each (B, R) tensor in `per_token` (advantages, returns;
    None stays None). Nothing any loss reads changes: those columns are masked out everywhere, and
    positions come from the mask. The response columns kept are those of `traj.episode_mask` (the state
    after EOS included) where it is set. Returns (trimmed traj, *trimmed per_token).
    """
    used_p = traj.query_mask.any(dim=0).nonzero()
    used = traj.response_mask if traj.episode_mask is None else traj.episode_mask
    used_r = used.any(dim=0).nonzero()
    start = int(used_p[0]) if len(used_p) else 0  # (P,) left padding: drop columns before the first used
    end = int(used_r[-1]) + 1 if len(used_r) else 1  # (R,) right padding: drop columns after the last used
    p_cols = {"query_ids", "query_mask"}
    r_cols = {"response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "episode_mask", "token_weights"}
    trimmed = traj._replace(**{k: getattr(traj, k)[:, start:] for k in p_cols},
                            **{k: getattr(traj, k)[:, :end] for k in r_cols if getattr(traj, k) is not None})
    return (trimmed, *(t[:, :end] if t is not None else None for t in per_token))


def cat_trajectories(trajs: list[Trajectory], pad_token_id: int) -> Trajectory:
    """Rollout batches stacked into one (rows in order): prompts left-padded to the longest prompt, responses
    right-padded to the longest response (pad ids, False masks, 0 elsewhere), per-sequence fields as they are."""
    p = max(t.query_ids.shape[1] for t in trajs)
    r = max(t.response_ids.shape[1] for t in trajs)

    def padded(name: str, t: torch.Tensor) -> torch.Tensor:
        fill = pad_token_id if name in ("query_ids", "response_ids") else 0
        if name.startswith("query"):
            return torch.nn.functional.pad(t, (p - t.shape[1], 0), value=fill)
        if t.dim() == 2 and name != "source_scores":
            return torch.nn.functional.pad(t, (0, r - t.shape[1]), value=fill)
        return t

    fields = {}
    for name in Trajectory._fields:
        parts = [getattr(t, name) for t in trajs]
        fields[name] = None if any(x is None for x in parts) else torch.cat([padded(name, x) for x in parts])
    return Trajectory(**fields)
