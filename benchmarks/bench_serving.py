"""Serving benchmark: vLLM engine with no masks, one profile, 8 mixed profiles; runtime generate.

N concurrent requests (random prompts, greedy, fixed output length, eos ignored). Reports output
throughput (tokens/s over the wall time), time to first token and time per output token
(mean over requests). The runtime baseline is monet_runtime.stream_generate over the same
requests in one padded batch per `--runtime-batch` requests (what the runtime engine does).

    .venv-vllm/bin/python benchmarks/bench_serving.py [--checkpoint DIR] [-n 32]

Physical limit, for scale: on CPU a decode step is bound by reading the weights once per step
(model bytes / memory bandwidth) plus per-token expert work; small models are instead bound by
per-step Python overhead, which is what batching amortises.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch


def random_mask(config, fraction: float, seed: int):
    from monet_runtime import ExpertMask

    rng = np.random.default_rng(seed)
    E = config.moe_experts
    return ExpertMask({l: np.argwhere(rng.random((E, E)) < fraction)
                       for l in range(config.num_hidden_layers)}, num_experts=E)


def summarise(name: str, wall: float, ttft: list[float], tpot: list[float], tokens: int) -> str:
    return (f"{name:<22} {tokens / wall:9.1f} tok/s   TTFT {1e3 * statistics.mean(ttft):8.1f} ms"
            f"   TPOT {1e3 * statistics.mean(tpot):7.2f} ms   ({tokens} tokens, {wall:.2f} s)")


async def run_vllm(engine, prompts, params, profiles):
    async def one(prompt, profile):
        start = time.perf_counter()
        stamps = []
        async for _ in engine.stream(prompt, params, profile=profile):
            stamps.append(time.perf_counter())
        tpot = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        return stamps[0] - start, tpot, len(stamps)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p, pr) for p, pr in zip(prompts, profiles)))
    wall = time.perf_counter() - start
    return wall, [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results)


def run_runtime(model, prompts, params, batch: int):
    from monet_runtime import GenerationRequest, stream_generate

    ttft, tpot, tokens = [], [], 0
    start = time.perf_counter()
    for b in range(0, len(prompts), batch):
        requests = [GenerationRequest(p, params) for p in prompts[b:b + batch]]
        stamps = []
        for events in stream_generate(model, requests):
            stamps.append(time.perf_counter())
            tokens += sum(e.token_id >= 0 for e in events)
        ttft += [stamps[0] - start] * len(requests)  # queued requests wait for earlier batches
        tpot += [(stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)] * len(requests)
    return time.perf_counter() - start, ttft, tpot, tokens


async def main(args):
    from monet_runtime import SamplingParams, load_model
    from monet_runtime.testing import make_random_checkpoint
    from monet_runtime.vllm_engine import MaskProfileRef, VllmEngine

    path = args.checkpoint
    if path is None:
        path = make_random_checkpoint(tempfile.mkdtemp() + "/m", seed=0, moe_experts=512,
                                      moe_topk=8, hidden_size=256, num_attention_heads=8,
                                      num_key_value_heads=8, num_hidden_layers=4, moe_heads=4,
                                      moe_groups=2, max_position_embeddings=512)
    model = load_model(path)
    config = model.config
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, size=args.prompt_len).tolist()
               for _ in range(args.n)]
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, checkpoint {path}")
    print(f"{args.n} concurrent requests, prompt {args.prompt_len}, output {args.output_len}, "
          f"E={config.moe_experts}, D={config.hidden_size}, L={config.num_hidden_layers}")

    engine = VllmEngine(path, mask_slots=8, max_num_seqs=max(args.n, 8),
                        kv_cache_bytes=256 << 20, enable_prefix_caching=False)
    masks = [MaskProfileRef(f"bench{k}", 1, random_mask(config, args.mask_fraction, k))
             for k in range(8)]
    await engine.generate(prompts[0], params)  # warm-up
    cases = {
        "vllm no masks": [None] * args.n,
        "vllm one profile": [masks[0]] * args.n,
        "vllm 8 profiles mixed": [masks[k % 8] for k in range(args.n)],
    }
    figures = {}
    for name, profiles in cases.items():
        wall, ttft, tpot, tokens = await run_vllm(engine, prompts, params, profiles)
        figures[name] = tokens / wall
        print(summarise(name, wall, ttft, tpot, tokens), flush=True)
    engine.shutdown()

    wall, ttft, tpot, tokens = run_runtime(model, prompts, params, args.runtime_batch)
    figures["runtime"] = tokens / wall
    print(summarise(f"runtime (batch {args.runtime_batch})", wall, ttft, tpot, tokens))
    print(f"mixed / unmasked throughput: {figures['vllm 8 profiles mixed'] / figures['vllm no masks']:.2f}"
          f" (target >= 0.90)")
    print(f"vLLM unmasked / runtime:     {figures['vllm no masks'] / figures['runtime']:.2f}"
          f" (target >= 3)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: a random E=512 model")
    parser.add_argument("-n", type=int, default=32, help="concurrent requests")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--mask-fraction", type=float, default=0.02,
                        help="share of composite experts each profile removes (paper: ~2%%)")
    parser.add_argument("--runtime-batch", type=int, default=1,
                        help="requests per runtime generate call (1: one at a time)")
    asyncio.run(main(parser.parse_args()))
