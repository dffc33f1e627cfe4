"""Packed sequences (rlhf/packing.py): the PPO forwards on a batch's real tokens only must give the
padded forwards' numbers, keep each sequence to itself, and refuse to run where they cannot be exact."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf.ppo import with_state_after_eos
from rlhf.packing import pack, unpack, use_packed_attention
from rlhf.rollout import PerTokenHead, policy_forward, score_at_eos, value_forward

VOCAB = 64


def test_pack_golden():
    # row 0: prompt 2 of 3 columns, response 2 of 3; row 1: prompt 3, response 1
    q_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    q_mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    r_ids = torch.tensor([[10, 11, 0], [12, 0, 0]])
    r_mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    b = pack(q_ids, q_mask, r_ids, r_mask)
    assert b.input_ids.tolist() == [[5, 6, 10, 11, 7, 8, 9, 12]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert b.sequence.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert b.before_response.tolist() == [1, 2, 6]  # the tokens that predict 10, 11 and 12
    assert b.last.tolist() == [3, 7]


def test_unpack_puts_values_back_with_zero_padding_and_passes_gradients():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    flat = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = unpack(flat, mask)
    assert out.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    (out * torch.tensor([[1.0, 10.0, 100.0], [1000.0, 0.0, 0.0]])).sum().backward()
    assert flat.grad.tolist() == [1.0, 10.0, 1000.0]


def _models(arch: str):
    """(causal LM, sequence-classification model) of a 2-layer `arch`, fp32, dropout off."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":  # with grouped-query attention, which packed attention must repeat like SDPA does
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        lm, cls = tf.LlamaForCausalLM, tf.LlamaForSequenceClassification
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64)
        lm, cls = tf.GPTNeoXForCausalLM, tf.GPTNeoXForSequenceClassification
    else:
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        lm, cls = tf.GPT2LMHeadModel, tf.GPT2ForSequenceClassification
    cfg.num_labels, cfg.pad_token_id = 1, 0
    return lm(cfg).eval(), cls(cfg).eval()


def _batch(seed: int = 0):
    """Prompts of 2-7 tokens left-padded to 7, responses of 1-6 tokens right-padded to 6."""
    g = torch.Generator().manual_seed(seed)
    b, p, r = 5, 7, 6
    q_len, r_len = torch.tensor([7, 2, 5, 3, 6]), torch.tensor([1, 6, 3, 6, 2])
    q_mask = torch.arange(p).unsqueeze(0) >= (p - q_len).unsqueeze(1)
    r_mask = torch.arange(r).unsqueeze(0) < r_len.unsqueeze(1)
    q_ids = torch.where(q_mask, torch.randint(1, VOCAB, (b, p), generator=g), 0)
    r_ids = torch.where(r_mask, torch.randint(1, VOCAB, (b, r), generator=g), 0)
    return q_ids, q_mask, r_ids, r_mask


def _grouped_batch():
    """`_batch`'s rows with two prompts shared, as GRPO groups are, in no particular order: rows 0, 2, 4
    ask prompt 0's, rows 1 and 3 prompt 1's (responses of 1-6 tokens, as there)."""
    q_ids, q_mask, r_ids, r_mask = _batch()
    shared = torch.tensor([0, 1, 0, 1, 0])
    return q_ids[shared], q_mask[shared], r_ids, r_mask


def test_shared_prompts_pack_once_golden():
    # rows 0 and 2 ask the same prompt (2 real tokens), row 1 another (3 tokens)
    q_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6]])
    q_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    r_ids = torch.tensor([[10, 11, 0], [12, 0, 0], [13, 14, 15]])
    r_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    b = pack(q_ids, q_mask, r_ids, r_mask, share_prompts=True)
    assert b.input_ids.tolist() == [[5, 6, 10, 11, 13, 14, 15, 7, 8, 9, 12]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3]]
    assert b.sequence.tolist() == [0, 0, 0, 0, 2, 2, 2, 1, 1, 1, 1]  # the prompt's output: its first row's
    assert b.rows.tolist() == [[0, 1, 2, 3, 0], [7, 8, 9, 10, 0], [0, 1, 4, 5, 6]]
    assert b.before_response.tolist() == [1, 2, 9, 1, 4, 5]  # the tokens that predict 10 11 | 12 | 13 14 15
    assert b.last.tolist() == [3, 10, 6]


@pytest.mark.parametrize("arch, layout", [("llama", "rows"), ("gpt_neox", "rows"), ("gpt2", "rows"),
                                          ("llama", "shared"), ("gpt_neox", "shared"), ("gpt2", "shared")])
def test_packed_forwards_equal_padded_ones_with_their_gradients(arch, layout):
    """Packed forwards (and with `share_prompts` on a batch whose rows share prompts, each prompt once)
    give the padded forwards' logprobs, entropies, values, scores and gradients."""
    lm, cls = _models(arch)
    packed_lm, packed_cls = copy.deepcopy(lm), copy.deepcopy(cls)
    use_packed_attention(packed_lm)
    use_packed_attention(packed_cls)
    batch = _batch() if layout == "rows" else _grouped_batch()
    m = batch[3]
    weights = torch.randn(m.shape, generator=torch.Generator().manual_seed(1))
    results = []
    packed_layout = True  # each forward packs the batch itself
    if layout == "shared":
        packed_layout = pack(*batch, share_prompts=True)
        assert packed_layout.input_ids.shape[1] == pack(*batch).input_ids.shape[1] - 2 * 7 - 2  # prompt copies left out
    for model, head, packed in ((lm, cls, False), (packed_lm, packed_cls, packed_layout)):
        logp, ent = policy_forward(model, *batch, 0.7, with_entropy=True, packed=packed)
        values = value_forward(head, *batch, packed=packed)
        scores = score_at_eos(head, *batch, packed=packed)
        ((logp * weights * m).sum() + (values * weights * m).sum()).backward()
        grads = {n: p.grad.clone() for n, p in list(model.named_parameters()) + list(head.named_parameters())
                 if p.grad is not None}
        results.append((logp[m], ent[m], values[m], scores, grads))
    (*padded, g_padded), (*packed, g_packed) = results
    for name, a, b in zip(("logprobs", "entropy", "values", "scores"), padded, packed):
        assert torch.allclose(a, b, atol=2e-5), (name, (a - b).abs().max())
    assert g_padded.keys() == g_packed.keys() and len(g_padded) > 10
    for n in g_padded:
        assert torch.allclose(g_padded[n], g_packed[n], rtol=1e-3, atol=1e-6), n


def test_the_value_after_eos_is_the_head_at_eos_packed_or_padded():
    _, cls = _models("llama")
    packed_cls = copy.deepcopy(cls)
    use_packed_attention(packed_cls)
    batch = _batch()
    m = batch[3]
    episode = with_state_after_eos(m, torch.ones(m.shape[0], dtype=torch.bool))
    after = episode & ~m
    assert after.sum() == 3  # the rows of 1, 3 and 2 tokens; the two of 6 fill every column
    weights = torch.randn(m.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for head, packed in ((cls, False), (packed_cls, True)):
        values = value_forward(head, *batch, packed=packed, value_mask=episode)
        (values * weights * episode).sum().backward()
        results.append((values[episode], {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}))
        # the state after EOS is read where the reward model reads its score: the EOS token
        with torch.no_grad():
            at_eos = score_at_eos(head, *batch, packed=packed)
        assert torch.allclose(values[after], at_eos[after.any(dim=1)], atol=1e-6)
    (padded, g_padded), (packed, g_packed) = results
    assert torch.allclose(padded, packed, atol=2e-5)
    assert g_padded.keys() == g_packed.keys() and g_padded
    for n in g_padded:
        assert torch.allclose(g_padded[n], g_packed[n], rtol=1e-3, atol=1e-6), n


def test_a_packed_sequence_does_not_see_its_neighbours():
    lm, _ = _models("llama")
    use_packed_attention(lm)
    q_ids, q_mask, r_ids, r_mask = _batch()
    before = policy_forward(lm, q_ids, q_mask, r_ids, r_mask, 1.0, packed=True)[0]
    # new tokens everywhere except row 2, same lengths: row 2's logprobs must not move
    q2, r2 = _batch(seed=7)[0], _batch(seed=7)[2]
    q2[2], r2[2] = q_ids[2], r_ids[2]
    after = policy_forward(lm, q2, q_mask, r2, r_mask, 1.0, packed=True)[0]
    assert torch.allclose(before[2], after[2], atol=1e-6)
    assert not torch.allclose(before[1], after[1], atol=1e-2)


def test_packed_attention_outside_a_packed_forward_is_sdpa():
    lm, _ = _models("llama")
    packed = copy.deepcopy(lm)
    use_packed_attention(packed)
    q_ids, q_mask, _, _ = _batch()
    kwargs = dict(input_ids=q_ids, attention_mask=q_mask.long(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(**kwargs), packed.generate(**kwargs))
    padded = policy_forward(lm, *_batch(), 1.0)[0]
    assert torch.equal(padded, policy_forward(packed, *_batch(), 1.0)[0])


def test_a_model_without_packed_attention_is_refused():
    lm, cls = _models("llama")  # SDPA: would attend across the packed sequences
    with pytest.raises(RuntimeError, match="pack_sequences=false"):
        policy_forward(lm, *_batch(), 1.0, packed=True)
    with pytest.raises(RuntimeError, match="pack_sequences=false"):
        value_forward(PerTokenHead(cls), *_batch(), packed=True)


def test_gradient_checkpointing_recompute_is_refused():
    lm, _ = _models("llama")
    use_packed_attention(lm)
    lm.train()
    lm.gradient_checkpointing_enable()
    logp = policy_forward(lm, *_batch(), 1.0, packed=True)[0]
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        logp.sum().backward()


def test_shared_prompts_give_the_same_gradients_to_the_bit_on_two_threads():
    """A shared prompt's tokens are read by every response to it, so their gradients sum several copies:
    on CPU, indexing with repeated positions sums them with atomic adds from several threads, in an order
    that changes from call to call (a seeded GRPO run then does not repeat itself: its weights drift by
    ~1e-8 and, within a few steps, the inverse-CDF sampler draws other tokens). `packed_attention` and
    `policy_forward` gather with index_select, whose backward sums in a fixed order. One group of 64
    responses (the bench's GRPO sizes otherwise), so that both threads add to the prompt's gradients all
    along; five backward passes, equal."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    use_packed_attention(model)
    g = torch.Generator().manual_seed(0)
    q_ids = torch.randint(1, VOCAB, (1, 19), generator=g).expand(64, -1)  # one prompt, 64 responses to it
    q_mask = torch.ones_like(q_ids, dtype=torch.bool)
    r_ids = torch.randint(1, VOCAB, (64, 20), generator=g)
    r_mask = torch.arange(20) < torch.randint(4, 21, (64, 1), generator=g)  # responses of 4-20 tokens
    batch = pack(q_ids, q_mask, r_ids, r_mask, share_prompts=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(5):
            model.zero_grad()
            logp, _ = policy_forward(model, q_ids, q_mask, r_ids, r_mask, 1.0, packed=batch)
            (logp * torch.linspace(-1, 1, 20) * r_mask).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
