"""The real vLLM engine (CPU build) serving MONET with per-request mask profiles: what is
particular to vLLM (mask slots, the prefix cache, its scheduler's queue, its linear layers,
tcmalloc). What every engine does is in test_engine_contract.py.

Ground truth: monet_runtime generating each request alone with its mask (float32, greedy), on
a random E=512 checkpoint (the default model is the contract tests', the reference fixture
the vLLM server test's).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")

import psutil  # noqa: E402  (a vLLM dependency)

from monet_runtime import (  # noqa: E402
    GenerationRequest,
    SamplingParams,
    generate_batch,
    load_model,
)
from monet_runtime.testing import make_random_checkpoint, random_mask  # noqa: E402
from monet_runtime.vllm_engine import VllmEngine, tcmalloc_library  # noqa: E402
from server.engine import EngineRequest, MaskSpec, Sampling  # noqa: E402

pytestmark = pytest.mark.slow
SLOTS = 4
LD_PRELOAD = os.environ.get("LD_PRELOAD")  # before any engine starts
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)  # the runtime's reference
ENGINE_GREEDY = Sampling(max_tokens=12, temperature=0, ignore_eos=True)
# scripts/gpu_check.sh sets this: vLLM with torch.compile and CUDA graphs, as served on a GPU
COMPILED = os.environ.get("MONET_TEST_VLLM_COMPILED") == "1"
IDS = itertools.count()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, runtime model, event loop) on a random E=512 checkpoint."""
    path = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", seed=3,
                                  moe_experts=512, moe_topk=8)
    loop = asyncio.new_event_loop()
    engine = VllmEngine(path, mask_slots=SLOTS, max_num_seqs=16, kv_cache_bytes=64 << 20,
                        compiled=COMPILED)
    yield engine, load_model(path), loop
    loop.run_until_complete(engine.shutdown())
    for task in asyncio.all_tasks(loop):  # the engine's output handler
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0.1))
    loop.close()


def request(prompt, spec: MaskSpec | None = None, sampling=ENGINE_GREEDY) -> EngineRequest:
    return EngineRequest(f"r{next(IDS)}", prompt, sampling, spec)


def alone(model, prompt, mask, params=GREEDY) -> list[int]:
    return generate_batch(model, [GenerationRequest(prompt, params, mask)])[0].token_ids


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, size=int(rng.integers(4, 30))).tolist() for _ in range(n)]


def run(loop, *coros):
    async def gather():
        return await asyncio.gather(*coros)

    return loop.run_until_complete(gather())


def test_mixed_batch_matches_runtime_alone(served):
    engine, model, loop = served
    masks = [random_mask(model.config, f, s) for f, s in ((0.1, 1), (0.3, 2), (0.6, 3))]
    profiles = [None, *(MaskSpec(f"p{n}@1", m) for n, m in enumerate(masks))] * 3
    batch = prompts(len(profiles), seed=1)
    outs = run(loop, *(engine.generate(request(p, pr)) for p, pr in zip(batch, profiles)))
    for p, pr, out in zip(batch, profiles, outs):
        assert out.token_ids == alone(model, p, pr.mask if pr else None)
    # the masks matter: some masked request differs from its unmasked output
    assert any(out.token_ids != alone(model, p, None)
               for p, pr, out in zip(batch, profiles, outs) if pr is not None)


def test_router_on_vllm_linears_experts_on_the_sparse_path(served):
    """The router's projections run on vLLM's linear methods (oneDNN on CPU); the expert
    layers (E = 512 >= kernels.sparse.SPARSE_MIN_EXPERTS) keep torch's nn.Linear weights, which
    the sparse path reads in place (test_mixed_batch_matches_runtime_alone checks its tokens)."""
    engine, model, loop = served
    (types,) = run(loop, engine._llm.collective_rpc("monet_module_types"))[0]
    c = model.config
    per_layer = 6 if c.vertical else 2  # u1 u2 v11 v12 v21 v22, or u v
    routers = sum(map(c.is_routing_layer, range(c.num_hidden_layers)))
    assert types["Linear"] == per_layer * c.num_hidden_layers
    assert types["ReplicatedLinear"] == 2 * routers
    assert types["VerticalExperts" if c.vertical else "HorizontalExperts"] == c.num_hidden_layers


def test_vllm_layers_are_named_by_their_module_paths(served):
    """vLLM names each layer by its prefix (quantization configs choose layers by it; the static
    forward context keys the attention layers and the mask slots by it): the module's path."""
    engine, model, loop = served
    (names,) = run(loop, engine._llm.collective_rpc("monet_layer_names"))[0]
    prefixes, L = names["prefixes"], model.config.num_hidden_layers
    u = "u1" if model.config.vertical else "u"
    last = f"model.layers.{L - 1}"
    assert {"model.embed_tokens", "lm_head", "model.layers.0.router.w1",
            f"{last}.self_attn.attn"} <= set(prefixes)
    assert f"{last}.moe.{u}" not in prefixes  # the sparse path's plain nn.Linear weights
    assert {path: path for path in prefixes} == prefixes
    assert names["forward_context"] == sorted(
        ["mask_slots", *(f"model.layers.{l}.self_attn.attn" for l in range(L))])


@pytest.mark.skipif(tcmalloc_library() is None,
                    reason="tcmalloc is not installed (scripts/setup.sh installs it)")
def test_the_engine_core_runs_on_tcmalloc(served):
    """The engine's own processes map tcmalloc; this process's environment is as it was."""
    children = psutil.Process().children(recursive=True)
    on_tcmalloc = [p.name() for p in children
                   if "tcmalloc" in Path(f"/proc/{p.pid}/maps").read_text()]
    assert any("EngineCore" in name for name in on_tcmalloc), on_tcmalloc
    assert os.environ.get("LD_PRELOAD") == LD_PRELOAD


def test_more_profiles_than_slots_are_queued_and_evicted(served):
    engine, model, loop = served
    masks = [random_mask(model.config, 0.4, 10 + n) for n in range(2 * SLOTS + 1)]
    profiles = [MaskSpec(f"many{n}@1", m) for n, m in enumerate(masks)] + [None]
    batch = prompts(len(profiles), seed=2)
    outs = run(loop, *(engine.generate(request(p, pr)) for p, pr in zip(batch, profiles)))
    for p, pr, out in zip(batch, profiles, outs):
        assert out.token_ids == alone(model, p, pr.mask if pr else None)
    run(loop, engine.generate(request(batch[0])))  # rows leave the batch on the next step
    state = run(loop, engine.slot_state())[0]
    assert len(state["resident"]) <= SLOTS and state["pins"] == [0] * SLOTS


def test_replacing_a_profile_changes_the_next_request(served):
    engine, model, loop = served
    prompt = prompts(1, seed=3)[0]
    v1, v2 = random_mask(model.config, 0.05, 20), random_mask(model.config, 0.7, 21)
    assert alone(model, prompt, v1) != alone(model, prompt, v2)
    (first,) = run(loop, engine.generate(request(prompt, MaskSpec("edit@1", v1))))
    (second,) = run(loop, engine.generate(request(prompt, MaskSpec("edit@2", v2))))
    assert first.token_ids == alone(model, prompt, v1)
    assert second.token_ids == alone(model, prompt, v2)


def test_prefix_cache_is_never_shared_between_masks(served):
    engine, model, loop = served
    prompt = (prompts(1, seed=4)[0] * 50)[:200]  # > one KV block (128 tokens on CPU)
    a = MaskSpec("cache-a@1", random_mask(model.config, 0.3, 30))
    b = MaskSpec("cache-b@1", random_mask(model.config, 0.3, 31))

    def once(profile):
        (out,) = run(loop, engine.generate(request(prompt, profile)))
        assert out.token_ids == alone(model, prompt, profile.mask if profile else None)
        return out.num_cached_tokens

    assert once(a) == 0
    assert once(a) > 0  # the same mask reuses its blocks
    assert once(b) == 0  # another mask does not
    assert once(None) == 0  # nor does the unmasked model
    assert once(None) > 0


def test_requests_beyond_the_batch_wait_and_report_their_queue_time(served):
    """max_num_seqs is 16: of 20 requests sent at once, 4 wait in vLLM's scheduler until rows
    free up. load() counts them as waiting, and their first tokens report longer queue times."""
    engine, _, loop = served
    batch = prompts(20, seed=8)
    loads = []

    async def queue_time(prompt):
        times = [event.queue_time async for event in engine.stream(request(prompt))]
        assert len(times) == GREEDY.max_new_tokens and times[1:] == [None] * (len(times) - 1)
        return times[0]

    async def watched():
        async def watch():
            while True:
                loads.append(engine.load())
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.gather(*(queue_time(p) for p in batch))
        finally:
            watcher.cancel()

    (times,) = run(loop, watched())
    times = sorted(times)
    assert times[0] >= 0
    assert times[-4] > times[15]  # the 4 that waited for a row, after the 16 that ran at once
    assert max(waiting for _, waiting in loads) >= 1
    assert max(running + waiting for running, waiting in loads) == 20
    assert engine.load() == (0, 0)


def test_cancelling_a_stream_aborts_it(served):
    engine, model, loop = served
    long = Sampling(max_tokens=200, temperature=0, ignore_eos=True)

    async def first_tokens():
        got = []
        stream = engine.stream(request(prompts(1, seed=5)[0],
                                       MaskSpec("abort@1", random_mask(model.config, 0.2, 40)),
                                       long))
        async for event in stream:
            got.append(event.token_id)
            if len(got) == 3:
                break
        await stream.aclose()
        return got

    (got,) = run(loop, first_tokens())
    assert len(got) == 3
    (health,) = run(loop, engine.health())
    assert health["ok"] and health["active_profiles"] == 0
    prompt = prompts(1, seed=6)[0]
    (out,) = run(loop, engine.generate(request(prompt)))
    assert out.token_ids == alone(model, prompt, None)


def test_routing_capture_matches_runtime_router(served):
    import torch

    engine, model, loop = served
    prompt = prompts(1, seed=7)[0]
    profile = MaskSpec("capture@1", random_mask(model.config, 0.3, 50))
    (out,) = run(loop, engine.generate(request(prompt, profile), capture_routing=True))
    ids = torch.tensor([prompt + out.token_ids[:-1]])
    with torch.inference_mode():
        ref = model(ids, mask=profile.mask, output_router_probs=True).router_probs
    assert sorted(out.routing) == sorted(ref)
    for layer, (g1, g2) in out.routing.items():
        torch.testing.assert_close(g1, ref[layer][0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g2, ref[layer][1][0], atol=1e-4, rtol=1e-4)


def test_bf16_engine_answers_then_refuses_after_shutdown_and_exits_quietly(tmp_path):
    """In a new process whose engine object outlives its shutdown (as an app's state does):
    a request then is EngineClosed (a 503), health is not ok, and the interpreter exits
    without vLLM's AsyncLLM.__del__ traceback (it shut down again after vLLM's globals were
    cleared). The engine is a bfloat16 one, as release checkpoints are served: its start once
    failed in kernels.prepare, under vLLM's bfloat16 default dtype. Before the shutdown it
    answers one greedy request: on CPUs with AMX its engine core once died of SIGILL there
    (vLLM's attention used AMX tiles that the process had not asked Linux for)."""
    import subprocess
    import sys

    script = tmp_path / "late.py"
    script.write_text(
        "import asyncio\n"
        "from monet_runtime.vllm_engine import VllmEngine\n"
        "from monet_runtime.serving import EngineClosed\n"
        "from server.engine import EngineRequest, Sampling\n"
        "async def main(engine):\n"
        "    steps = [s async for s in engine.stream(\n"
        "        EngineRequest('first', [1, 2, 3], Sampling(max_tokens=4, temperature=0)))]\n"
        "    print('generated', len(steps), steps[-1].finish_reason)\n"
        "    await engine.shutdown()\n"
        "    try:\n"
        "        async for _ in engine.stream(EngineRequest('late', [1, 2], Sampling())):\n"
        "            pass\n"
        "    except EngineClosed as e:\n"
        "        print('refused', e.status)\n"
        "    print('health', (await engine.health())['ok'])\n"
        "if __name__ == '__main__':\n"
        "    ENGINE = VllmEngine('monet_runtime/default_model', max_num_seqs=2,\n"
        "                        kv_cache_bytes=64 << 20, dtype='bfloat16')\n"
        "    asyncio.run(main(ENGINE))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr[-2000:]
    said = [line for line in out.stdout.splitlines() if line.startswith(("refused", "health"))]
    assert said == ["refused 503", "health False"], out.stdout[-2000:]
    assert "generated 4 length" in out.stdout.splitlines(), out.stdout[-2000:]
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, \
        out.stderr[-2000:]
