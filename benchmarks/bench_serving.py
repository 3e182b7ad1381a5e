"""Serving benchmark: the vLLM engine (no masks, one profile, 8 profiles mixed) and the runtime
engine (batched, and one request at a time: the runtime's generate without batching), all
through the server's engine interface (server.engine.EngineRequest), greedy.

Two workloads, the same requests for every engine:
- burst: N requests arrive at once, one prompt length, one output length (eos ignored): the
  best case for the runtime engine, which runs one padded batch to its end;
- stream: N clients, each sending its next request as soon as its last one ends, until 4N
  requests are done; prompt lengths uniform in [16, 128], output lengths in [8, 128] (what
  stop tokens do to real requests). Continuous batching admits a request at the next step;
  a static batch holds finished rows and makes new requests wait for its end.

Reports output throughput (tokens/s over the wall time), time to first token and time per
output token (mean over requests), of the median of `--repeat` interleaved runs per case.

    .venv/bin/python benchmarks/bench_serving.py [--checkpoint DIR] [-n 32]

For scale: on CPU a decode step of this model is bound by its matrix products (router and
expert projections), the same arithmetic on both engines, so at one batch of equal requests
vLLM gains only what its linear layers (oneDNN, prepacked weights) gain over torch's; on the
stream it adds scheduling (no padding, no waiting for a batch).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from server.engine import EngineRequest, MaskSpec, Sampling


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    requests: list[tuple[list[int], int]]  # (prompt ids, output tokens), in arrival order


def workloads(n: int, vocab: int, prompt_len: int, output_len: int) -> list[Workload]:
    rng = np.random.default_rng(0)

    def prompt(length):
        return rng.integers(3, vocab, size=length).tolist()

    burst = [(prompt(prompt_len), output_len) for _ in range(n)]
    stream = [(prompt(int(rng.integers(16, 129))), int(rng.integers(8, 129)))
              for _ in range(4 * n)]
    return [Workload("burst", n, burst), Workload("stream", n, stream)]


async def run(engine, workload: Workload, masks: list[MaskSpec | None]) -> dict[str, float]:
    """Each client takes the next request off the list until none is left."""
    pending = list(enumerate(workload.requests))[::-1]
    ttft, tpot, tokens = [], [], 0

    async def client():
        nonlocal tokens
        while pending:
            k, (prompt, out_len) = pending.pop()
            request = EngineRequest(f"bench-{k}", prompt,
                                    Sampling(max_tokens=out_len, temperature=0, ignore_eos=True),
                                    masks[k % len(masks)])
            start, stamps = time.perf_counter(), []
            async for event in engine.stream(request):
                if event.token_id >= 0:
                    stamps.append(time.perf_counter())
            tokens += len(stamps)
            ttft.append(stamps[0] - start)
            tpot.append((stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(workload.clients)))
    wall = time.perf_counter() - start
    return {"tok/s": tokens / wall, "ttft": statistics.mean(ttft),
            "tpot": statistics.mean(tpot), "tokens": tokens, "wall": wall}


def report(workload: str, case: str, f: dict[str, float]) -> None:
    print(f"{workload:<7} {case:<30} {f['tok/s']:8.1f} tok/s   TTFT {1e3 * f['ttft']:7.1f} ms"
          f"   TPOT {1e3 * f['tpot']:6.2f} ms   ({f['tokens']} tokens, {f['wall']:.1f} s)",
          flush=True)


async def main(args):
    from monet_runtime import MonetConfig, load_model
    from monet_runtime.engine import RuntimeEngine
    from monet_runtime.vllm_engine import VllmEngine
    from monet_runtime.testing import make_random_checkpoint, random_mask

    path = args.checkpoint
    if path is None:
        path = make_random_checkpoint(tempfile.mkdtemp() + "/m", seed=0, moe_experts=512,
                                      moe_topk=8, hidden_size=256, num_attention_heads=8,
                                      num_key_value_heads=8, num_hidden_layers=4, moe_heads=4,
                                      moe_groups=2, max_position_embeddings=512)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, dtype=dtype, device=device) if "runtime" in args.engines else None
    config = model.config if model is not None else MonetConfig.from_file(path)
    loads = workloads(args.n, config.vocab_size, args.prompt_len, args.output_len)
    profiles = [MaskSpec(f"bench{k}@1", random_mask(config, args.mask_fraction, k))
                for k in range(8)]
    cases = {"no masks": [None], "one profile": profiles[:1], "8 profiles mixed": profiles}
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, checkpoint {path}")
    print(f"E={config.moe_experts}, D={config.hidden_size}, L={config.num_hidden_layers}; "
          f"burst: {args.n} requests, prompt {args.prompt_len}, output {args.output_len}; "
          f"stream: {args.n} clients, {4 * args.n} requests; profiles remove "
          f"{args.mask_fraction:.0%} of the composite experts")

    figures: dict[tuple[str, str], float] = {}

    async def measure(engine, name: str, case_names, repeat: int = args.repeat) -> None:
        """Every case `repeat` times, interleaved (drift hits all alike); the median run."""
        for workload in loads:
            runs: dict[str, list[dict]] = {case: [] for case in case_names}
            for _ in range(repeat):
                for case in case_names:
                    runs[case].append(await run(engine, workload, cases[case]))
            for case, results in runs.items():
                f = sorted(results, key=lambda r: r["tok/s"])[len(results) // 2]
                figures[workload.name, f"{name} {case}"] = f["tok/s"]
                report(workload.name, f"{name} {case}", f)

    if "vllm" in args.engines:
        engine = VllmEngine(path, dtype=args.dtype, mask_slots=8, max_num_seqs=max(args.n, 8),
                            kv_cache_bytes=256 << 20, enable_prefix_caching=False,
                            compiled=args.compiled)
        await run(engine, Workload("warm-up", 8, loads[0].requests[:8]), profiles)
        await measure(engine, "vllm", list(cases))
        await engine.shutdown()
    if "runtime" in args.engines:
        engine = RuntimeEngine(model, max_batch_size=args.n)
        await measure(engine, "runtime", ["no masks", "8 profiles mixed"])
        await engine.shutdown()
        # the runtime's generate one request at a time (no batching): one run, its spread is
        # small next to its distance from the others
        engine = RuntimeEngine(model, max_batch_size=1)
        await measure(engine, "runtime one at a time", ["no masks"], repeat=1)
        await engine.shutdown()
    if set(args.engines) != {"vllm", "runtime"}:
        return

    def ratio(workload: str, a: str, b: str) -> float:
        return figures[workload, a] / figures[workload, b]

    for w in (workload.name for workload in loads):
        print(f"{w}: vLLM mixed / unmasked "
              f"{ratio(w, 'vllm 8 profiles mixed', 'vllm no masks'):.2f} (target >= 0.90); "
              f"vLLM / runtime: unmasked {ratio(w, 'vllm no masks', 'runtime no masks'):.2f}, "
              f"mixed {ratio(w, 'vllm 8 profiles mixed', 'runtime 8 profiles mixed'):.2f}"
              " (target >= 3); against one request at a time "
              f"{ratio(w, 'vllm no masks', 'runtime one at a time no masks'):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: a random E=512 model")
    parser.add_argument("-n", type=int, default=32, help="concurrent requests (clients)")
    parser.add_argument("--prompt-len", type=int, default=64, help="burst prompt length")
    parser.add_argument("--output-len", type=int, default=128, help="burst output length")
    parser.add_argument("--mask-fraction", type=float, default=0.02,
                        help="share of composite experts each profile removes (paper: ~2%%)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per case; the median (by throughput) is reported")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "runtime"],
                        default=["vllm", "runtime"], help="the ratios need both")
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM with torch.compile and CUDA graphs (default: eager)")
    asyncio.run(main(parser.parse_args()))
