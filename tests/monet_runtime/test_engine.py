"""RuntimeEngine: the server's Engine protocol on the PyTorch runtime (batches, per-row masks,
abort, routing for /inspect, shutdown)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from monet_runtime import ExpertMask, GenerationRequest, SamplingParams, generate_batch, load_model
from monet_runtime.engine import EngineClosed, RuntimeEngine, top_composite_experts
from server.engine import Engine, EngineRequest, MaskSpec, Sampling


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return load_model(tiny_fixture / "model", dtype=torch.float32)


@pytest.fixture(scope="module")
def mask(tiny_fixture):
    return ExpertMask.from_json(tiny_fixture / "mask.json")


def run(coro):
    return asyncio.run(coro)


async def collect(engine, request) -> tuple[list[int], str, list]:
    ids, reason, events = [], None, []
    async for event in engine.stream(request):
        events.append(event)
        if event.token_id >= 0:
            ids.append(event.token_id)
        reason = event.finish_reason or reason
    return ids, reason, events


def test_implements_the_server_protocol(model):
    engine = RuntimeEngine(model, name="tiny")
    assert isinstance(engine, Engine)
    assert (engine.num_layers, engine.num_experts, engine.vocab_size) == (4, 16, 128)
    assert engine.model_identity == model.identity
    run(engine.shutdown())


def test_the_engine_compiles_the_cpu_loops_before_any_request(model, monkeypatch):
    import kernels

    prepared = []
    monkeypatch.setattr(kernels, "prepare", lambda *args, **kw: prepared.append((args, kw)))
    engine = RuntimeEngine(model)
    # E = 16: below SPARSE_MIN_EXPERTS the expert layers stay dense, nothing sparse to compile
    assert prepared == [((model.device, torch.float32), {"sparse": False})]
    run(engine.shutdown())


PREPARED_RUN = """
import sys, numba, torch, kernels
from kernels import attention_cpu, gemv_cpu, mixing_cpu, router_cpu, sparse_cpu
from monet_runtime import load_model
from monet_runtime.model import set_sparse_experts
from monet_runtime.testing import make_random_checkpoint, random_mask

def compiled():
    return {f"{m.__name__}.{n}": len(d.signatures)
            for m in (attention_cpu, gemv_cpu, mixing_cpu, router_cpu, sparse_cpu)
            for n, d in vars(m).items() if isinstance(d, numba.core.registry.CPUDispatcher)}

for dtype in (torch.float32, torch.bfloat16):
    kernels.prepare("cpu", dtype, sparse=True)
before = compiled()
for n, decompose in enumerate(("vertical", "horizontal")):
    path = make_random_checkpoint(f"{sys.argv[1]}/{decompose}", seed=n, moe_decompose=decompose)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, dtype=dtype, tokenizer=False)
        set_sparse_experts(model, 1.0)  # the sparse layers at any share of experts in use
        mask = random_mask(model.config, 0.3, seed=n)
        for masks in (None, mask, [mask, None]):
            B = 2 if isinstance(masks, list) else 1
            model.generate(torch.tensor([[1, 2, 3, 4]] * B), max_new_tokens=3, mask=masks)
after = compiled()
print(sum(before.values()), {k: (before[k], v) for k, v in after.items() if v != before[k]})
"""


def test_prepare_compiles_every_cpu_loop_a_generation_runs(tmp_path):
    """In a new process: after kernels.prepare for float32 and bfloat16, generations (VD and
    HD, sparse expert layers, masked, unmasked and mixed batches, decode attention and linear
    layers) compile nothing more: no request pays for Numba."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PREPARED_RUN, str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    count, new = out.strip().split(" ", 1)
    assert int(count) >= 10 and new == "{}", out


def test_concurrent_requests_with_their_own_masks(model, mask):
    """Rows batched together, each with its own mask, equal generating each alone."""
    other = ExpertMask({0: [[1, 2], [3, 4]], 3: [[0, 0]]}, num_experts=16)
    masks = [None, mask, other, mask, None]
    prompts = [[1, 5, 9], [1, 7, 7, 7, 2], [1, 40], [1, 3, 4, 5, 6, 7], [1, 99, 100]]
    engine = RuntimeEngine(model, max_batch_size=8)

    async def main():
        return await asyncio.gather(*(collect(engine, EngineRequest(
            f"r{n}", p, Sampling(max_tokens=10, temperature=0, ignore_eos=True),
            None if m is None else MaskSpec(f"m{n}", m)))
            for n, (p, m) in enumerate(zip(prompts, masks))))

    results = run(main())
    for (ids, reason, events), p, m in zip(results, prompts, masks):
        want = generate_batch(model, [GenerationRequest(p, SamplingParams(
            max_new_tokens=10, ignore_eos=True), m)])[0]
        assert ids == want.token_ids and reason == "length"
        assert events[0].queue_time is not None and events[0].queue_time >= 0
        assert all(e.queue_time is None for e in events[1:])
    assert results[1][0] != results[0][0]  # the mask changes the output
    run(engine.shutdown())


def test_requests_arriving_during_a_batch_wait_for_the_next(model):
    engine = RuntimeEngine(model, max_batch_size=8)
    long = Sampling(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        first = engine.stream(EngineRequest("long", [1, 2, 3], long))
        await first.__anext__()  # the first batch is running
        second = asyncio.create_task(collect(engine, EngineRequest(
            "short", [1, 4], Sampling(max_tokens=3, temperature=0))))
        await asyncio.sleep(0.05)
        seen = engine.load()
        n = 1 + len([e async for e in first])
        ids, _, events = await second
        return seen, n, events

    seen, n, events = run(main())
    assert seen == (1, 1)  # one running, one waiting
    assert n == 200 and events[0].queue_time > 0
    run(engine.shutdown())


def test_closing_the_stream_aborts(model):
    engine = RuntimeEngine(model)

    async def main():
        events = engine.stream(EngineRequest("a", [1, 2], Sampling(max_tokens=250,
                                                                    ignore_eos=True)))
        for _ in range(3):
            await events.__anext__()
        await events.aclose()
        for _ in range(200):
            if engine.load() == (0, 0):
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(main())
    run(engine.shutdown())


def test_abort_by_id(model):
    engine = RuntimeEngine(model)

    async def main():
        stream = engine.stream(EngineRequest("x", [1, 2], Sampling(max_tokens=250,
                                                                    ignore_eos=True)))
        first = await stream.__anext__()
        await engine.abort("x")
        rest = [e async for e in stream]
        return first, rest

    first, rest = run(main())
    assert rest[-1].finish_reason == "abort" and rest[-1].token_id == -1
    assert len(rest) < 249
    run(engine.shutdown())


@pytest.mark.parametrize("prompt, max_tokens, match", [
    ([], 4, "empty"), ([1, 500], 4, "vocabulary"), ([1] * 250, 10, "positions")])
def test_bad_requests(model, prompt, max_tokens, match):
    engine = RuntimeEngine(model)
    with pytest.raises(ValueError, match=match):
        run(collect(engine, EngineRequest("bad", prompt, Sampling(max_tokens=max_tokens))))
    run(engine.shutdown())


def test_shutdown_drains_then_refuses(model):
    engine = RuntimeEngine(model)

    async def main():
        task = asyncio.create_task(collect(engine, EngineRequest(
            "d", [1, 2], Sampling(max_tokens=50, ignore_eos=True))))
        await asyncio.sleep(0.01)
        await engine.shutdown()
        ids, reason, _ = await task
        with pytest.raises(EngineClosed):
            await collect(engine, EngineRequest("late", [1], Sampling(max_tokens=1)))
        return len(ids), reason, await engine.health()

    n, reason, health = run(main())
    assert (n, reason) == (50, "length") and health["ok"] is False


def test_routing_top_experts(model):
    engine = RuntimeEngine(model)
    ids = [1, 10, 20, 30]
    routing = run(engine.routing(ids, top_k=4))
    with torch.inference_mode():
        probs = model(torch.tensor([ids]), output_router_probs=True).router_probs
    assert len(routing) == len(ids)
    for t, experts in enumerate(routing):
        assert [e.layer for e in experts] == [0] * 4 + [2] * 4
        for e in experts:
            g1, g2 = probs[e.layer]
            want = float((g1[0, t, :, e.i] * g2[0, t, :, e.j]).sum())
            assert e.weight == pytest.approx(want, rel=1e-5)
            assert e.layers == (e.layer, e.layer + 1)
    run(engine.shutdown())


def test_top_composite_experts_against_naive():
    gen = torch.Generator().manual_seed(0)
    T, H, E = 5, 3, 7
    g1 = torch.rand(T, H, E, generator=gen).softmax(-1)
    g2 = torch.rand(T, H, E, generator=gen).softmax(-1)
    out = top_composite_experts({0: (g1, g2)}, groups=2, num_layers=3, top_k=6,
                                chunk_bytes=4 * E * E * 2)  # two tokens per chunk
    for t in range(T):
        naive = sorted(((float(sum(g1[t, h, i] * g2[t, h, j] for h in range(H))), i, j)
                        for i in range(E) for j in range(E)), reverse=True)[:6]
        got = [(e.weight, e.i, e.j) for e in out[t]]
        assert [(i, j) for _, i, j in got] == [(i, j) for _, i, j in naive]
        assert [w for w, _, _ in got] == pytest.approx([w for w, _, _ in naive], rel=1e-5)
