"""One request's failure fails only that request: sampling never empties its distribution, and
RuntimeEngine isolates a failing row (sampling, a bad mask, a forward pass that fails with it)
while the rows batched with it finish with the tokens they would have had alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from monet_runtime import ExpertMask, GenerationRequest, SamplingParams, generate_batch, load_model
from monet_runtime.engine import InvalidRequest, RuntimeEngine
from monet_runtime.generation import _sample
from server.engine import EngineRequest, MaskSpec, Sampling, error_status


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return load_model(tiny_fixture / "model", dtype=torch.float32)


async def collect(engine, request):
    ids, reason = [], None
    try:
        async for event in engine.stream(request):
            if event.token_id >= 0:
                ids.append(event.token_id)
            reason = event.finish_reason or reason
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return ids, e
    return ids, reason


def alone(model, prompt, sampling: Sampling, mask=None) -> list[int]:
    greedy = sampling.temperature == 0
    params = SamplingParams(max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                            temperature=1.0 if greedy else sampling.temperature,
                            top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                            ignore_eos=sampling.ignore_eos)
    return generate_batch(model, [GenerationRequest(prompt, params, mask)])[0].token_ids


PROMPTS = [[1, 5, 9], [1, 7, 7, 7, 2], [1, 40], [1, 99, 100]]
GREEDY = Sampling(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = Sampling(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


def run_batch(engine, requests):
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))
    return asyncio.run(main())


@pytest.mark.parametrize("top_p, top_k, temperature", [
    (1e-300, 0, 1.0), (5e-324, 0, 1.0), (1e-300, 3, 1e-5), (1.0, 1 << 20, 1e-30),
    (1e-300, 1, 100.0)])
def test_sampling_always_keeps_the_most_likely_token(top_p, top_k, temperature):
    """Every cut keeps the argmax: a top_p that is 0 in float32, a top_k above the vocabulary,
    a temperature that overflows the scaled logits."""
    logits = torch.randn(128, generator=torch.Generator().manual_seed(0)) * 30
    logits[17] = 1e35  # scaled by 1/1e-30 it overflows float32
    params = SamplingParams(do_sample=True, top_p=top_p, top_k=top_k, temperature=temperature)
    tokens = {_sample(logits, params, torch.Generator().manual_seed(s)) for s in range(5)}
    if top_p < 1e-200 or temperature < 1e-20:
        assert tokens == {17}
    else:
        assert tokens <= set(range(128))


def test_nan_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(do_sample=True, temperature=float("nan"))


def test_a_top_p_of_1e_300_is_greedy_and_fails_no_one(model):
    engine = RuntimeEngine(model, max_batch_size=8)
    tiny_p = Sampling(max_tokens=12, temperature=1.0, top_p=1e-300, seed=3, ignore_eos=True)
    samplings = [GREEDY, tiny_p, SEEDED, GREEDY]
    results = run_batch(engine, [EngineRequest(f"r{n}", p, s)
                                 for n, (p, s) in enumerate(zip(PROMPTS, samplings))])
    for (ids, reason), p, s in zip(results, PROMPTS, samplings):
        assert reason == "length" and ids == alone(model, p, s)
    assert results[1][0] == alone(model, PROMPTS[1], GREEDY)  # only the top token is left
    asyncio.run(engine.shutdown())


def test_a_row_whose_mask_cannot_be_built_fails_alone(model):
    """A mask for a layer the model lacks fails the batch's mask tables as a whole: the rows go
    on in halves, the culprit fails alone, the others get their own tokens."""
    bad = ExpertMask({9: [[1, 2]]}, num_experts=16)
    good = ExpertMask({0: [[1, 2], [3, 4]]}, num_experts=16)
    engine = RuntimeEngine(model, max_batch_size=8)
    masks = [good, None, bad, None]
    samplings = [GREEDY, SEEDED, GREEDY, SEEDED]
    results = run_batch(engine, [
        EngineRequest(f"r{n}", p, s, None if m is None else MaskSpec(f"m{n}", m))
        for n, (p, s, m) in enumerate(zip(PROMPTS, samplings, masks))])
    ids, error = results[2]
    assert ids == [] and "layer 9" in str(error)
    for n in (0, 1, 3):
        assert results[n] == (alone(model, PROMPTS[n], samplings[n], masks[n]), "length")
    assert (asyncio.run(engine.health()))["ok"]
    asyncio.run(engine.shutdown())


class FailingDecode:
    """The real model, whose decode steps raise from position 6 on while `poisoned` says so
    of the batch (a fault that no row owns): for unit tests of the engine's retries."""

    def __init__(self, model, poisoned):
        self._model, self._poisoned = model, poisoned
        self.failures = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, ids, *, mask=None, attention_mask=None, cache=None, **kw):
        if ids.shape[1] == 1 and cache.length >= 6 and self._poisoned(ids, mask):
            self.failures += 1
            raise RuntimeError("the forward pass failed")
        return self._model(ids, mask=mask, attention_mask=attention_mask, cache=cache, **kw)


def test_a_failing_decode_step_goes_on_from_where_each_row_got_to(model):
    """The forward fails mid-generation whenever a masked row is in the batch: the masked row
    fails alone after its first tokens; the others finish with their own tokens (greedy and
    seeded sampling: the generators carry on), each token delivered once."""
    poison = ExpertMask({0: [[5, 5]]}, num_experts=16)
    flaky = FailingDecode(model, lambda ids, mask: mask is not None)
    engine = RuntimeEngine(model, max_batch_size=8)
    engine.model = flaky
    masks = [None, None, poison, None]
    samplings = [GREEDY, SEEDED, GREEDY, SEEDED]
    results = run_batch(engine, [
        EngineRequest(f"r{n}", p, s, None if m is None else MaskSpec(f"m{n}", m))
        for n, (p, s, m) in enumerate(zip(PROMPTS, samplings, masks))])
    ids, error = results[2]
    assert isinstance(error, RuntimeError) and 0 < len(ids) < 12
    assert ids == alone(model, PROMPTS[2], GREEDY, poison)[:len(ids)]
    for n in (0, 1, 3):
        assert results[n] == (alone(model, PROMPTS[n], samplings[n]), "length")
    assert flaky.failures >= 2
    asyncio.run(engine.shutdown())


def test_bad_sampling_is_a_typed_client_error(model):
    engine = RuntimeEngine(model)
    request = EngineRequest("bad", [1, 2], Sampling(max_tokens=0))
    ids, error = asyncio.run(collect(engine, request))
    assert isinstance(error, InvalidRequest) and error_status(error) == (400, "max_tokens")
    ids, error = asyncio.run(collect(engine, EngineRequest("v", [1, 500], Sampling())))
    assert error_status(error) == (400, "prompt")
    asyncio.run(engine.shutdown())


def test_aborting_a_waiting_request_ends_it_at_once(model):
    """(The drain's deadline aborts requests still queued behind a batch: they ended never.)"""
    engine = RuntimeEngine(model, max_batch_size=1)
    long = Sampling(max_tokens=240, temperature=0, ignore_eos=True)

    async def main():
        running = engine.stream(EngineRequest("running", [1, 2], long))
        await running.__anext__()
        waiting = asyncio.create_task(collect(engine, EngineRequest("waiting", [1, 3], long)))
        await asyncio.sleep(0.05)
        await engine.abort("waiting")
        result = await asyncio.wait_for(waiting, 5)
        assert engine.load()[0] == 1  # the running one still runs
        await running.aclose()
        return result

    assert asyncio.run(main()) == ([], "abort")
    asyncio.run(engine.shutdown())
