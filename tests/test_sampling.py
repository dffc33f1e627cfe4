"""How `rlhf.sampling.generate` draws tokens: transformers' multinomial sampling, the Gumbel-max trick, or
the inverse of the cumulative distribution.

The Gumbel-max trick: for scores s and G_i i.i.d. Gumbel(0, 1) (G = -log(-log U), U uniform),
P(argmax_i (s_i + G_i) = k) = exp(s_k) / sum_i exp(s_i) (Gumbel 1954; e.g. Maddison et al. 2014). So
greedy decoding over the warped scores plus that noise samples softmax(warped scores), the distribution
transformers' sampling draws from with `torch.multinomial`. The inverse CDF: with p = softmax(s) and
c_k = p_1 + ... + p_k, one U uniform on [0, 1) falls in [c_{k-1}, c_k) with probability c_k - c_{k-1} = p_k;
a token with p_k = 0 has an empty interval. The tests count draws against the exact
probabilities: with n draws a frequency's standard error is sqrt(p (1 - p) / n), and each test allows 5 of
them (a true sampler fails that about once in 10^6 per frequency); the seeds are fixed, so the counts are too.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.sampling import DRAWS, SAMPLERS, GumbelMax, InverseCDF, generate, generation_config, prefill_shared_prompts


def _within(freq: torch.Tensor, probs: torch.Tensor, n: int, sigmas: float = 5.0) -> bool:
    bound = sigmas * (probs * (1 - probs) / n).sqrt() + 1e-9
    return bool(((freq - probs).abs() <= bound).all())


@pytest.mark.parametrize("draw", [GumbelMax, InverseCDF])
def test_each_draw_picks_the_softmax_of_the_scores_and_never_a_removed_token(draw):
    """n rows of the same scores, one draw each, the argmax as greedy decoding takes it; removed tokens
    (-inf, as top-k / top-p leave them) first, between and last, where an inverse CDF that searched for
    c_k >= u (not > u) or let u reach c_V would land on them."""
    torch.manual_seed(0)
    inf = float("-inf")
    scores = torch.tensor([inf, 2.0, 1.0, inf, 0.0, -1.0, inf])
    n = 200_000
    picks = draw()(None, scores.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=7).double() / n
    probs = torch.softmax(scores.double(), -1)
    assert (freq[scores == inf] == 0).all()  # a token top-k / top-p removed (-inf) is never drawn
    assert _within(freq, probs, n)
    # the draw matters: without it greedy decoding would always pick token 1
    assert freq[1] < 0.7


def test_the_inverse_cdf_of_a_one_token_distribution_and_of_a_uniform_at_its_ends(monkeypatch):
    """The ends of the unit interval: u = 0 picks the first token with mass, u just below 1 the last one,
    whatever zero-probability tokens sit before and after them."""
    inf = float("-inf")
    scores = torch.tensor([[inf, 0.0, 0.0, inf], [inf, inf, 5.0, inf]])
    for u, expected in ((0.0, [1, 2]), (1 - 2 ** -24, [2, 2])):
        monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, u, **kw))
        assert InverseCDF()(None, scores.clone()).argmax(-1).tolist() == expected
    # float32 probabilities whose cumulative sum ends below that largest u: u is scaled by the sum, so it
    # still falls on a token with mass rather than past the end, onto the removed last token
    torch.manual_seed(0)
    rows = torch.cat([torch.randn(64, 50) * 3, torch.full((64, 1), inf)], dim=1)
    short = rows[torch.softmax(rows, -1).cumsum(-1)[:, -1] < 1 - 2 ** -24]
    assert len(short)  # the premise
    assert (InverseCDF()(None, short.clone()).argmax(-1) == 49).all()


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(30)} | {"<pad>": 30, "<eos>": 31}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=30,
                                         eos_token_id=31, bos_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked next-token distribution, so top-p removes tokens
    return model, tokenizer


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_every_sampler_draws_the_first_token_from_the_warped_distribution(tiny_lm, temperature, top_p):
    """The first response token of one prompt, drawn n times by each sampler, against softmax of the
    logits at `temperature` with nucleus `top_p` (transformers' TopPLogitsWarper gives the nucleus)."""
    from transformers import TopPLogitsWarper

    model, tok = tiny_lm
    n = 4000
    enc = tok(["t1 t2 t3"] * n, return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: v[:1] for k, v in enc.items()}).logits[0, -1] / temperature
    expected = torch.softmax(TopPLogitsWarper(top_p)(None, logits[None].clone())[0].double(), -1)
    config = generation_config(tok, max_new_tokens=1, temperature=temperature, top_p=top_p)
    freqs = {}
    for sampler in SAMPLERS:
        torch.manual_seed(1)
        first = generate(model, config, sampler=sampler, **enc)[:, -1]
        freqs[sampler] = torch.bincount(first, minlength=32).double() / n
        assert _within(freqs[sampler], expected, n), sampler
        assert (freqs[sampler][expected == 0] == 0).all(), sampler
    if top_p < 1:
        assert (expected == 0).sum() >= 10  # the premise: the nucleus removed tokens
    # other draws of the same distribution, not the same draws
    assert not torch.equal(freqs["gumbel"], freqs["multinomial"])
    assert not torch.equal(freqs["inverse_cdf"], freqs["gumbel"])


def test_greedy_configs_stay_greedy_and_an_unknown_sampler_is_refused(tiny_lm):
    model, tok = tiny_lm
    enc = tok(["t1 t2 t3"] * 4, return_tensors="pt")
    greedy = generation_config(tok, max_new_tokens=3, temperature=0)
    a = generate(model, greedy, **enc)
    assert (a[:, -3:] == a[:1, -3:]).all()
    for sampler in DRAWS:
        assert torch.equal(a, generate(model, greedy, sampler=sampler, **enc)), sampler
    with pytest.raises(ValueError, match="sampler 'exponential'"):
        generate(model, greedy, sampler="exponential", **enc)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_the_logprobs_kept_while_sampling_are_those_a_forward_pass_gives(tiny_lm, sampler, temperature, top_p):
    """`generate(..., logprobs=True)` keeps each drawn token's log-probability under softmax(logits /
    temperature) (no top-p: the distribution `policy_forward` scores) from the logits it drew the token from;
    they equal a forward pass over the finished sequences to float rounding, rows left-padded to different
    prompt lengths, every token drawn (the ones after a row's EOS too, which the loop masks), and the same
    tokens come out as without keeping them."""
    from rlhf.rollout import policy_forward

    model, tok = tiny_lm
    enc = tok(["t1 t2 t3", "t4", "t5 t6", "t7 t8 t9 t10"] * 4, return_tensors="pt", padding=True, padding_side="left")
    config = generation_config(tok, max_new_tokens=6, temperature=temperature, top_p=top_p)
    torch.manual_seed(2)
    seqs, kept = generate(model, config, sampler=sampler, logprobs=True, **enc)
    torch.manual_seed(2)
    assert torch.equal(seqs, generate(model, config, sampler=sampler, **enc))
    p = enc["input_ids"].shape[1]
    response = seqs[:, p:]
    assert kept.shape == response.shape == (16, 6)
    with torch.no_grad():
        forward, _ = policy_forward(model, enc["input_ids"], enc["attention_mask"].bool(), response,
                                    torch.ones_like(response, dtype=torch.bool), temperature)
    assert torch.allclose(kept, forward, atol=1e-5), (kept - forward).abs().max()
    # the premise: at 0.7 a temperature left out (or top-p's renormalisation put in) moves them by far more
    with torch.no_grad():
        at_one, _ = policy_forward(model, enc["input_ids"], enc["attention_mask"].bool(), response,
                                   torch.ones_like(response, dtype=torch.bool), 1.0)
    assert temperature == 1.0 or (at_one - forward).abs().max() > 1e-2
    with pytest.raises(ValueError, match="bfloat16"):
        generate(model, config, sampler=sampler, logprobs=True, bf16=True, **enc)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("lora", [False, True])
def test_a_shared_prefill_runs_each_distinct_prompt_once_and_draws_the_same_tokens(tiny_lm, sampler, lora):
    """Four prompts of different lengths (left-padded), each repeated four times in mixed order: with
    `shared_prefill` the first forward sees the four distinct prompts without their last token, the next
    every row's last prompt token, and the same tokens come out as without it (same seed), the kept
    log-probabilities to float rounding. A copy assigned to the wrong row, or positions that ignore the
    padding, would change what the rows draw. Through a PEFT model too (SmolLM2's GRPO runs LoRA)."""
    model, tok = tiny_lm
    if lora:
        import copy

        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    enc = tok(["t1 t2 t3", "t4", "t5 t6", "t7 t8 t9 t10"] * 4, return_tensors="pt", padding=True, padding_side="left")
    p = enc["input_ids"].shape[1]
    config = generation_config(tok, max_new_tokens=6, temperature=0.7, top_p=0.8)
    shapes = []
    backbone = model.get_base_model().model if lora else model.model
    hook = backbone.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                              with_kwargs=True)
    try:
        torch.manual_seed(3)
        seqs, kept = generate(model, config, sampler=sampler, logprobs=True, **enc)
        assert shapes[0] == (16, p)
        shapes.clear()
        torch.manual_seed(3)
        shared, shared_kept = generate(model, config, sampler=sampler, logprobs=True, shared_prefill=True, **enc)
    finally:
        hook.remove()
    assert shapes[:2] == [(4, p - 1), (16, 1)]
    assert torch.equal(shared, seqs)
    assert torch.allclose(shared_kept, kept, atol=1e-5), (shared_kept - kept).abs().max()
    # the premise: the rows of one prompt drew different responses (more than four distinct among sixteen)
    assert len({tuple(r) for r in seqs[:, p:].tolist()}) > 4
    # nothing to share: every row distinct, or one-token prompts
    distinct = tok(["t1 t2", "t3"], return_tensors="pt", padding=True, padding_side="left")
    assert prefill_shared_prompts(model, distinct["input_ids"], distinct["attention_mask"]) is None
    single = tok(["t1", "t1"], return_tensors="pt")
    assert prefill_shared_prompts(model, single["input_ids"], single["attention_mask"]) is None
