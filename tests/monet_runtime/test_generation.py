"""Generation: batching with per-row masks, KV cache, sampling, stop conditions."""

import pytest
import torch

from monet_runtime import (
    ExpertMask,
    GenerationRequest,
    KVCache,
    SamplingParams,
    generate_batch,
    load_model,
)
from monet_runtime.testing import random_model

GREEDY = SamplingParams(max_new_tokens=12, stop_token_ids=())


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return load_model(tiny_fixture / "model")


@pytest.fixture(scope="module")
def mask(tiny_fixture):
    return ExpertMask.from_json(tiny_fixture / "mask.json")


def prompts(n, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 14, (), generator=gen)),),
                          generator=gen).tolist() for _ in range(n)]


@pytest.mark.parametrize("source", ["fixture", "random-hd-E512"])
def test_batch_equals_each_alone(source, model, mask):
    if source == "fixture":
        m, masks = model, [mask, None, mask, mask | ExpertMask({1: [[0, 0]]}), None]
    else:
        m = random_model(seed=2, moe_decompose="horizontal", moe_experts=512, moe_topk=8,
                         hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=2, moe_groups=1)
        E = 512
        gen = torch.Generator().manual_seed(9)
        masks = [ExpertMask({l: (torch.rand(E, E, generator=gen) < 0.3).nonzero().tolist()
                             for l in range(2)}) for _ in range(2)] + [None, None, None]
    batch = [GenerationRequest(p, GREEDY, mk)
             for p, mk in zip(prompts(5, m.config.vocab_size), masks)]
    together = generate_batch(m, batch)
    for request, result in zip(batch, together):
        alone = generate_batch(m, [request])[0]
        assert result.token_ids == alone.token_ids
        assert len(result.token_ids) == 12 and result.finish_reason == "length"
    # the masks matter: the same prompt with and without a mask differ
    p = batch[0].prompt_ids
    with_mask = generate_batch(m, [GenerationRequest(p, GREEDY, masks[0])])[0].token_ids
    without = generate_batch(m, [GenerationRequest(p, GREEDY, None)])[0].token_ids
    assert with_mask != without


def test_kv_cache_matches_full_recompute(model, mask):
    ids = torch.tensor([prompts(1, 128, seed=4)[0] + [7, 8, 9, 10]])
    full = model(ids, mask=mask).logits
    cache = KVCache.allocate(model.config, 1, ids.shape[1], dtype=model.dtype, device="cpu")
    n = ids.shape[1] - 4
    step_logits = [model(ids[:, :n], mask=mask, cache=cache).logits[:, -1]]
    for t in range(n, ids.shape[1]):
        step_logits.append(model(ids[:, t:t + 1], mask=mask, cache=cache).logits[:, -1])
    for k, logits in enumerate(step_logits):
        assert (logits - full[:, n - 1 + k]).abs().max() < 1e-4


def test_left_padded_tensor_generate(model):
    a, b = [5, 6, 7, 8, 9], [11, 12]
    padded = torch.tensor([a, [0, 0, 0] + b])
    attention = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    out = model.generate(padded, max_new_tokens=5, attention_mask=attention,
                         stop_token_ids=[])
    assert out[0].tolist() == model.generate(torch.tensor([a]), max_new_tokens=5,
                                             stop_token_ids=[])[0].tolist()
    assert out[1, 5:].tolist() == model.generate(torch.tensor([b]), max_new_tokens=5,
                                                 stop_token_ids=[])[0, 2:].tolist()


def test_sampling_is_seeded(model):
    p = prompts(1, 128, seed=5)[0]
    params = lambda seed, **kw: SamplingParams(max_new_tokens=10, do_sample=True,  # noqa: E731
                                               seed=seed, stop_token_ids=(), **kw)
    run = lambda params: generate_batch(model, [GenerationRequest(p, params)])[0].token_ids  # noqa: E731
    assert run(params(1)) == run(params(1))
    assert run(params(1)) != run(params(2))
    greedy = run(SamplingParams(max_new_tokens=10, stop_token_ids=()))
    assert run(params(3, top_k=1)) == greedy
    assert run(params(3, temperature=0.0)) == greedy
    assert run(params(3, top_p=1e-6)) == greedy
    # in one batch each row keeps its own generator
    both = generate_batch(model, [GenerationRequest(p, params(1)), GenerationRequest(p, params(1))])
    assert both[0].token_ids == both[1].token_ids == run(params(1))


def test_top_k_limits_choices(model):
    p = [1, 20, 30]
    logits = model(torch.tensor([p])).logits[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    for seed in range(20):
        params = SamplingParams(max_new_tokens=1, do_sample=True, top_k=3, seed=seed,
                                temperature=5.0, stop_token_ids=())
        token = generate_batch(model, [GenerationRequest(p, params)])[0].token_ids[0]
        assert token in allowed


def test_stop_tokens_and_strings(model):
    p = [1, 17, 37, 24]
    free = generate_batch(model, [GenerationRequest(p, GREEDY)])[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    stopped = generate_batch(model, [GenerationRequest(
        p, SamplingParams(max_new_tokens=12, stop_token_ids=(stop_at,)))])[0]
    assert stopped.token_ids == free[:first + 1] and stopped.finish_reason == "stop"

    tok = model.tokenizer
    text = tok.decode(free)
    stop = text[3:5]
    assert stop
    result = generate_batch(model, [GenerationRequest(
        p, SamplingParams(max_new_tokens=12, stop_token_ids=(), stop=(stop,)))],
        decode=tok.decode)[0]
    assert result.finish_reason == "stop"
    assert result.text == text[:text.find(stop)]
    assert stop not in result.text


def test_bad_requests(model):
    with pytest.raises(ValueError, match="empty"):
        generate_batch(model, [GenerationRequest([], GREEDY)])
    with pytest.raises(ValueError, match="vocabulary"):
        generate_batch(model, [GenerationRequest([1, 500], GREEDY)])
    with pytest.raises(ValueError, match="positions"):
        generate_batch(model, [GenerationRequest([1] * 250, GREEDY)])
    with pytest.raises(ValueError, match="stop strings need"):
        generate_batch(model, [GenerationRequest([1], SamplingParams(stop=("x",)))])
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
