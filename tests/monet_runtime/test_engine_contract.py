"""The server's Engine protocol, one contract over both engines: RuntimeEngine (PyTorch
runtime) and VllmEngine (vLLM's CPU build), on the bundled default model.

Ground truth: monet_runtime generating each request alone with its mask (float32, greedy).
The vLLM engine runs in this process, so tests/conftest.py runs this module last.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools

import numpy as np
import pytest
import torch

from monet_cli.serve import DEFAULT_MODEL
from monet_runtime import GenerationRequest, SamplingParams, generate_batch, load_model
from monet_runtime.engine import RuntimeEngine, top_composite_experts
from monet_runtime.testing import random_mask
from server.engine import Engine, EngineRequest, MaskSpec, Sampling, error_status

GREEDY = Sampling(max_tokens=10, temperature=0, ignore_eos=True)
IDS = itertools.count()
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module", params=[
    "runtime",
    pytest.param("vllm", marks=[pytest.mark.slow, pytest.mark.skipif(
        not HAS_VLLM, reason="vLLM is not installed (scripts/setup.sh installs it)")]),
])
def served(request, model):
    """(engine, event loop): one engine per kind for the module, on one loop."""
    loop = asyncio.new_event_loop()
    if request.param == "runtime":
        engine = RuntimeEngine(model, name="default", max_batch_size=8)
    else:
        from monet_runtime.vllm_engine import VllmEngine

        engine = VllmEngine(DEFAULT_MODEL, name="default", max_num_seqs=8, mask_slots=4,
                            kv_cache_bytes=64 << 20)
    yield engine, loop
    loop.run_until_complete(engine.shutdown())
    for task in asyncio.all_tasks(loop):  # vLLM's output handler
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0.1))
    loop.close()


def request(prompt, spec=None, sampling=GREEDY) -> EngineRequest:
    return EngineRequest(f"contract-{next(IDS)}", prompt, sampling, spec)


async def collect(engine, req) -> tuple[list[int], str | None]:
    ids, reason = [], None
    async for event in engine.stream(req):
        if event.token_id >= 0:
            ids.append(event.token_id)
        reason = event.finish_reason or reason
    return ids, reason


def run(loop, *coros):
    async def gather():
        return await asyncio.gather(*coros, return_exceptions=True)

    return loop.run_until_complete(gather())


def idle(engine, loop) -> bool:
    """Whether load() falls to (0, 0) within 5 s (an engine's worker may count a batch as
    running for a moment after its last event went out)."""
    async def wait():
        for _ in range(500):
            if engine.load() == (0, 0):
                return True
            await asyncio.sleep(0.01)
        return False

    return loop.run_until_complete(wait())


def alone(model, prompt, mask) -> list[int]:
    params = SamplingParams(max_new_tokens=GREEDY.max_tokens, ignore_eos=True)
    return generate_batch(model, [GenerationRequest(prompt, params, mask)])[0].token_ids


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


def test_implements_the_protocol(served, model):
    engine, _ = served
    assert isinstance(engine, Engine)
    c = model.config
    assert engine.model_identity == model.identity
    assert (engine.num_layers, engine.num_experts, engine.vocab_size, engine.max_model_len) == (
        c.num_hidden_layers, c.moe_experts, c.vocab_size, c.max_position_embeddings)
    assert engine.tokenizer.decode(engine.tokenizer.encode("def f(", add_bos=False)) == "def f("


def test_greedy_tokens_equal_the_runtime_alone_masked_or_not(served, model):
    """Concurrent requests, each with its own mask or none: the tokens of each alone; and
    the masks matter."""
    engine, loop = served
    masks = [random_mask(model.config, f, s) for f, s in ((0.2, 1), (0.5, 2))]
    specs = [None, MaskSpec("c1@1", masks[0]), MaskSpec("c2@1", masks[1])] * 2
    batch = prompts(len(specs), seed=1)
    outs = run(loop, *(collect(engine, request(p, s)) for p, s in zip(batch, specs)))
    for p, s, (ids, reason) in zip(batch, specs, outs):
        assert ids == alone(model, p, s.mask if s else None)
        assert reason == "length"
    assert any(ids != alone(model, p, None)
               for p, s, (ids, _) in zip(batch, specs, outs) if s is not None)


# Scores against log_softmax of the runtime's own unbatched forward in float64: the runtime is
# the same arithmetic batched (1e-5); vLLM's CPU linear layers (oneDNN) sum in another order.
LOGPROB_TOL = {"RuntimeEngine": 1e-5, "VllmEngine": 1e-3}


def test_logprobs_are_the_models_log_softmax_masked_or_not(served, model):
    """Prompt and generated-token scores (the chosen token and the top 3) of concurrent
    requests, masked and not: log_softmax of the model's logits after the mask."""
    engine, loop = served
    tol = LOGPROB_TOL[type(engine).__name__]
    mask = random_mask(model.config, 0.3, 5)
    specs = [None, MaskSpec("lp@1", mask)]
    batch = prompts(2, seed=4)
    scored = Sampling(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3,
                      prompt_logprobs=3)

    async def scores(req):
        events = [e async for e in engine.stream(req)]
        return events[0].prompt_logprobs, [e for e in events if e.token_id >= 0]

    outs = run(loop, *(scores(request(p, s, scored)) for p, s in zip(batch, specs)))
    for prompt, spec, (prompt_scores, events) in zip(batch, specs, outs):
        ids = prompt + [e.token_id for e in events]
        with torch.inference_mode():
            logits = model(torch.tensor([ids]), mask=spec.mask if spec else None).logits[0]
        want = logits.double().log_softmax(-1)  # [T, V]: position t predicts token t + 1
        assert prompt_scores[0] is None and len(prompt_scores) == len(prompt)
        got = [*prompt_scores[1:], *(e.logprobs for e in events)]
        for t, score in enumerate(got):
            assert score.token_id == ids[t + 1]
            assert abs(score.logprob - want[t, ids[t + 1]]) < tol
            top = want[t].topk(3)
            assert [i for i, _ in score.top] == top.indices.tolist()
            assert max(abs(lp - w) for (_, lp), w in zip(score.top, top.values.tolist())) < tol


def test_closing_a_stream_or_abort_ends_the_request(served):
    engine, loop = served
    long = Sampling(max_tokens=500, temperature=0, ignore_eos=True)

    async def closed_early():
        stream = engine.stream(request(prompts(1, seed=2)[0], sampling=long))
        got = [event.token_id async for event in _first(stream, 3)]
        await stream.aclose()
        return got

    async def aborted():
        req = request(prompts(1, seed=3)[0], sampling=long)
        events = []
        async for event in engine.stream(req):
            events.append(event)
            if len(events) == 3:
                await engine.abort(req.request_id)
        return events

    (got,) = run(loop, closed_early())
    assert len(got) == 3
    (events,) = run(loop, aborted())
    assert 3 <= len(events) < long.max_tokens and events[-1].finish_reason == "abort"
    assert idle(engine, loop)
    prompt = prompts(1, seed=4)[0]
    (out,) = run(loop, collect(engine, request(prompt)))
    assert out[1] == "length" and len(out[0]) == GREEDY.max_tokens


async def _first(stream, n: int):
    async for event in stream:
        yield event
        n -= 1
        if n == 0:
            return


@pytest.mark.parametrize("prompt, sampling, param", [
    ([], GREEDY, "prompt"),
    ([5, 260], GREEDY, "prompt"),  # vocab 260
    ([5] * 1020, GREEDY, "max_tokens"),  # 1024 positions
    ([5] * 1025, Sampling(max_tokens=1), "prompt"),
    ([5, 6], Sampling(top_p=0.0), "top_p"),
    ([5, 6], Sampling(temperature=-1.0), "temperature"),
    ([5, 6], Sampling(top_k=-3), "top_k"),
])
def test_bad_input_is_a_typed_400_naming_the_field(served, prompt, sampling, param):
    engine, loop = served
    (error,) = run(loop, collect(engine, request(prompt, sampling=sampling)))
    assert isinstance(error, ValueError), error
    assert error_status(error) == (400, param), error
    assert idle(engine, loop)


def test_routing_matches_the_runtime_router(served, model):
    engine, loop = served
    prompt = prompts(1, seed=5)[0]
    (routed,) = run(loop, engine.routing(prompt, top_k=4))
    with torch.inference_mode():
        probs = model(torch.tensor([prompt]), output_router_probs=True).router_probs
    ref = top_composite_experts({l: (g1[0], g2[0]) for l, (g1, g2) in probs.items()},
                                groups=model.config.moe_groups,
                                num_layers=model.config.num_hidden_layers, top_k=4)
    assert len(routed) == len(prompt) == len(ref)
    for got, want in zip(routed, ref):
        assert [(e.layer, e.layers) for e in got] == [(e.layer, e.layers) for e in want]
        torch.testing.assert_close(torch.tensor([e.weight for e in got]),
                                   torch.tensor([e.weight for e in want]), atol=1e-4, rtol=1e-4)
        # the same experts, up to a near-tie at the top_k cut
        weights = {(e.layer, e.i, e.j): e.weight for e in want}
        for e in got:
            if (e.layer, e.i, e.j) not in weights:
                cut = min(w for (layer, _, _), w in weights.items() if layer == e.layer)
                assert e.weight <= cut + 1e-4, e
