"""Decode at a release shape: the sparse expert path against the dense one, with masks.

Makes (or takes) a random checkpoint of a release shape with calibrated routing (`monet
checkpoint random`), loads it (load time, peak RSS against the checkpoint's size), then
greedy decode after a prompt, per batch size, for each path (sparse: the default threshold;
dense: the factorised layer over all E experts, as the authors' release) and each mask case
(unmasked; one profile; 8 profiles mixed over the rows, each removing 5% of the
composite experts of every layer). Runs are interleaved, medians reported. Also: the
machine's streaming read bandwidth, the weight bytes a decode step reads on each path and the
achieved GB/s, the share of a step per part, and (--threshold) the sparse/dense time of one
expert layer against the share of experts in use.

    python benchmarks/bench_release.py --shape 850M --dtype bf16
    python benchmarks/bench_release.py --checkpoint DIR --engine vllm   # the vLLM engine

--engine vllm measures the same decode through the vLLM engine (server.engine requests,
greedy, eos ignored, the B requests submitted at once; time per output token from each
request's first token to its last), once with the expert layers on the sparse path and once
dense on vLLM's linear layers (VllmEngine(sparse_experts=False)), one engine after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# As monet serve: OpenMP threads sleep at barriers unless OMP_WAIT_POLICY says otherwise (read
# when torch loads its OpenMP). Spinning threads decode faster on an idle machine (850M bf16,
# batch 1: 72-76 against 86 ms per token) and 10-20x slower beside a busy core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from kernels.attention import sdpa  # noqa: E402
from monet_cli.checkpoint import release_config, write_random_checkpoint  # noqa: E402
from monet_runtime import ExpertMask, load_model  # noqa: E402
from monet_runtime.model import KVCache, _packed, set_sparse_experts  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = {"sparse": None, "dense": 0.0}  # None: the measured threshold
_LINEAR, _ATTENTION = kernels.linear, kernels.attention


def set_path(model, share) -> None:
    """The sparse path (share None: the measured threshold) with the runtime's decode linear
    layers and attention (kernels.linear, kernels.attention), or the dense one (share 0) as
    the release computes it: the factorised expert layers over all E experts, torch's
    F.linear and scaled_dot_product_attention."""
    set_sparse_experts(model, share)
    runtime = share is None or share > 0
    kernels.linear = _LINEAR if runtime else F.linear
    kernels.attention = _ATTENTION if runtime else sdpa


def rotated(items: list, r: int) -> list:
    """items starting at r (mod their number): repeat r runs them in another order, so that
    no case always runs first after a switch, nor always beside the same neighbour."""
    r %= len(items)
    return items[r:] + items[:r]


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Streaming read of a buffer far beyond the caches (torch's sum, all threads): GB/s."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(times) / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def masks_for(config, *, seed: int, count: int, fraction: float = 0.05):
    rng = np.random.default_rng(seed)
    E, L = config.moe_experts, config.num_hidden_layers
    return [ExpertMask({l: np.argwhere(rng.random((E, E)) < fraction) for l in range(L)},
                       num_experts=E) for _ in range(count)]


def _prefill(model, prompt_BT, new_tokens: int, masks):
    """(cache, prepared masks, first new ids [B, 1]) after the prompt."""
    from monet_runtime.model import MaskBatch

    B, T = prompt_BT.shape
    cache = KVCache.allocate(model.config, B, T + new_tokens, dtype=model.dtype, device="cpu")
    prepared = None if masks is None else MaskBatch.build(masks, batch=B, config=model.config,
                                                          device="cpu")
    ids = model(prompt_BT, mask=prepared, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    return cache, prepared, ids


def decode(model, prompt_BT, new_tokens: int, masks, *, during=None) -> float:
    """Greedy decode of new_tokens after a prompt; seconds per decode step (prefill apart).
    during: a context manager entered for the decode steps only."""

    with torch.no_grad():
        cache, prepared, ids = _prefill(model, prompt_BT, new_tokens, masks)
        with during or contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                logits = model(ids, mask=prepared, cache=cache).logits
                ids = logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / (new_tokens - 1)


def weight_bytes(model, prompt_BT) -> dict[str, float]:
    """Bytes of weights one decode step reads per path: everything but the embedding (B rows),
    and on the sparse path the experts at the step's active experts only (measured on the
    routing of the prompt's last position)."""
    with torch.no_grad():
        out = model(prompt_BT[:, -1:], output_router_probs=True)
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    expert = sum(size(layer.moe.parameters()) for layer in model.model.layers)
    total = size(model.parameters()) - size(model.model.embed_tokens.parameters())
    cfg, sparse_expert = model.config, 0.0
    D, M, E = cfg.hidden_size, cfg.expert_width, cfg.moe_experts
    el = model.dtype.itemsize
    g = None
    for layer in model.model.layers:
        if layer.layer in out.router_probs:
            g = [x.reshape(-1, cfg.moe_heads, E) for x in out.router_probs[layer.layer]]
            n = kernels.active_experts(*g).side1.numel()
        per_expert = M * (D + 1) + (2 * M + 1) * D // 2 if cfg.vertical else 0
        if not cfg.vertical:
            per_expert = (M * (D + 1) + (M + 1) * D) / 2
        sparse_expert += 2 * n * per_expert * el
    return {"dense": total, "sparse": total - expert + sparse_expert, "share": n / E}


def part_shares(model, prompt_BT, masks_case) -> dict[str, float]:
    """Share of a decode step's time per part (attention, router, experts, lm_head, rest),
    from forward hooks over a short decode."""
    spent = dict.fromkeys(("attention", "router", "experts", "lm_head"), 0.0)
    hooks, starts = [], {}

    def timed(module, part):
        hooks.append(module.register_forward_pre_hook(
            lambda *_: starts.__setitem__(part, time.perf_counter())))
        hooks.append(module.register_forward_hook(lambda *_: spent.__setitem__(
            part, spent[part] + time.perf_counter() - starts[part])))


    @contextlib.contextmanager
    def hooked():
        for layer in model.model.layers:
            timed(layer.self_attn, "attention")
            timed(layer.moe, "experts")
            if layer.router is not None:
                timed(layer.router, "router")
        timed(model.lm_head, "lm_head")
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    step = decode(model, prompt_BT, 9, masks_case, during=hooked()) * 8
    return {k: v / step for k, v in spent.items()}


def use_path(model, share, prompt_BT) -> None:
    """set_path, then one untimed step of the prompt's last tokens and a read of every packed
    table: the switch back from the dense path packs the v tables again (about 1 GB copied at
    850M float32) into new pages, which the sparse path would otherwise fault in during the
    first timed runs (an expert at a time: batch 1 measured 15% slower there)."""
    set_path(model, share)
    with torch.no_grad():
        model(prompt_BT[:, -1:])
        for module in model.modules():
            for key in getattr(module, "PACKED", {}):
                _packed(module, key).sum()


def threshold(model, dtype) -> None:
    """One expert layer's time, sparse against dense (packed layout, the fallback), per T."""
    layer = model.model.layers[0]
    cfg = model.config
    print("\nthreshold: one expert layer, median of 5, ms")
    print("| T | share in use | dense | sparse | dense/sparse |\n|---|---|---|---|---|")
    for T in (1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 512):
        y = torch.randn(T, cfg.hidden_size).to(dtype)
        with torch.no_grad():
            g1, g2 = layer.router(layer.post_attention_layernorm(y))
        share = kernels.active_experts(g1, g2).side1.numel() / cfg.moe_experts
        times = {}
        for _ in range(5):
            for name, s in (("dense", 0.0), ("sparse", 1.0)):
                layer.moe.sparse_max_share = s
                with torch.no_grad():
                    layer.moe(y, g1, g2, None, {})
                    t0 = time.perf_counter()
                    layer.moe(y, g1, g2, None, {})
                times.setdefault(name, []).append(time.perf_counter() - t0)
        d, s = (statistics.median(times[k]) * 1e3 for k in ("dense", "sparse"))
        print(f"| {T} | {share:.3f} | {d:.2f} | {s:.2f} | {d / s:.2f} |", flush=True)
    layer.moe.sparse_max_share = None


async def vllm_decode(engine, prompts, new_tokens: int, masks) -> float:
    """Seconds per decode step of B requests at once (first token to last, median row)."""
    from server.engine import EngineRequest, MaskSpec, Sampling

    sampling = Sampling(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    specs = [None if m is None else MaskSpec(f"bench{id(m)}@1#{id(m)}", m) for m in masks]

    async def one(n, prompt, spec):
        stamps = []
        async for _ in engine.stream(EngineRequest(f"b{n}-{time.perf_counter()}", prompt,
                                                   sampling, spec)):
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    steps = await asyncio.gather(*(one(n, p, s) for n, (p, s) in enumerate(zip(prompts, specs))))
    return statistics.median(steps)


def run_vllm(args, ckpt: Path) -> None:
    from monet_runtime import MonetConfig
    from monet_runtime.vllm_engine import VllmEngine

    cfg = MonetConfig.from_file(ckpt)
    mask_list = masks_for(cfg, seed=1, count=8)
    gen = torch.Generator().manual_seed(0)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    rows = []
    for path, sparse in (("sparse", True), ("dense", False)):
        t0 = time.perf_counter()
        engine = VllmEngine(ckpt, dtype=dtype, max_num_seqs=max(args.batches), mask_slots=8,
                            kv_cache_bytes=1 << 30, enable_prefix_caching=False,
                            sparse_experts=sparse)
        print(f"vLLM engine ({path} experts) started in {time.perf_counter() - t0:.0f} s",
              flush=True)
        loop = asyncio.new_event_loop()
        try:
            for B in args.batches:
                prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt), generator=gen)
                prompts = prompts.tolist()
                cases = {"unmasked": [None] * B, "one": [mask_list[0]] * B,
                         "mixed": [mask_list[b % 8] for b in range(B)]}
                loop.run_until_complete(vllm_decode(engine, prompts, 4, cases["mixed"]))
                times: dict = {}
                for r in range(args.repeats):
                    for case in rotated(args.cases, r):
                        times.setdefault(case, []).append(loop.run_until_complete(
                            vllm_decode(engine, prompts, args.new_tokens, cases[case])))
                for case, ts in times.items():
                    step = statistics.median(ts)
                    rows.append((B, path, case, B / step, step * 1e3))
        finally:
            loop.run_until_complete(engine.shutdown())
            loop.close()
    print("\n| batch | experts | masks | tok/s | ms / token |\n|---|---|---|---|---|")
    dense = {(r[0], r[2]): r[3] for r in rows if r[1] == "dense"}
    unmasked = {(r[0], r[1]): r[3] for r in rows if r[2] == "unmasked"}
    for B, path, case, tps, ms in sorted(rows, key=lambda r: (r[0], r[1] != "sparse")):
        print(f"| {B} | {path} | {case} | {tps:.1f} ({tps / dense[(B, case)]:.2f}x dense, "
              f"{unmasked[(B, path)] / tps:.2f} of unmasked) | {ms:.1f} |", flush=True)


def parity(args, ckpt: Path, *, prompts: int = 4, tokens: int = 24) -> None:
    """Greedy tokens of the vLLM engine against the runtime's (each request alone), float32;
    at a divergence, the runtime's gap between its top two logits there (a near-tie when tiny)."""
    from monet_runtime import GenerationRequest, SamplingParams, generate_batch
    from monet_runtime.vllm_engine import VllmEngine
    from server.engine import EngineRequest, Sampling

    model = load_model(ckpt, dtype=torch.float32, tokenizer=False)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(3, model.config.vocab_size, (prompts, args.prompt), generator=gen)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    want = [generate_batch(model, [GenerationRequest(p, params)])[0].token_ids
            for p in batch.tolist()]
    engine = VllmEngine(ckpt, dtype="float32", max_num_seqs=prompts, kv_cache_bytes=1 << 30,
                        enable_prefix_caching=False)
    loop = asyncio.new_event_loop()
    sampling = Sampling(max_tokens=tokens, temperature=0, ignore_eos=True)
    try:
        got = [loop.run_until_complete(engine.generate(EngineRequest(f"p{n}", p, sampling)))
               .token_ids for n, p in enumerate(batch.tolist())]
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()
    for n, (p, a, b) in enumerate(zip(batch.tolist(), want, got)):
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if at is None:
            print(f"prompt {n}: the {tokens} greedy tokens agree")
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + a[:at]])).logits[0, -1]
        top = logits.topk(2).values
        print(f"prompt {n}: first difference at token {at} (runtime {a[at]}, vLLM {b[at]}); "
              f"the runtime's top-2 logit gap there {float(top[0] - top[1]):.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="850M")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint (else one in /tmp)")
    p.add_argument("--layers", type=int)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=["unmasked", "one", "mixed"])
    p.add_argument("--threshold", action="store_true", help="also the sparse/dense threshold")
    p.add_argument("--engine", choices=["runtime", "vllm"], default="runtime")
    p.add_argument("--parity", action="store_true",
                   help="only the vLLM engine's greedy tokens against the runtime's (float32)")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        tmp = Path(tempfile.mkdtemp(prefix="monet-release-", dir="/tmp"))
        ckpt = tmp / args.shape
        t0 = time.perf_counter()
        write_random_checkpoint(release_config(args.shape, layers=args.layers), ckpt,
                                dtype=dtype)
        print(f"wrote the checkpoint in {time.perf_counter() - t0:.0f} s")
    try:
        if args.parity:
            parity(args, ckpt)
        elif args.engine == "vllm":
            run_vllm(args, ckpt)
        else:
            run(args, ckpt, dtype)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)


def run(args, ckpt: Path, dtype) -> None:
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    model = load_model(ckpt, dtype=dtype, tokenizer=False)
    load_s = time.perf_counter() - t0
    rss = peak_rss_gb()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
    print(f"load {load_s:.1f} s; peak RSS {rss:.2f} GiB, {rss - rss0:.2f} over the {rss0:.2f} "
          f"before: {(rss - rss0) / weights:.2f}x the weights in memory ({weights:.2f} GiB; "
          f"the checkpoint {size:.2f} GiB)")
    bandwidth = read_bandwidth_gbs()
    print(f"streaming read bandwidth: {bandwidth:.1f} GB/s")
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    mask_list = masks_for(cfg, seed=1, count=8)
    if args.threshold:
        threshold(model, dtype)
    rows = []
    for B in args.batches:
        prompt = torch.randint(3, cfg.vocab_size, (B, args.prompt), generator=gen)
        cases = {"unmasked": None, "one": [mask_list[0]] * B,
                 "mixed": [mask_list[b % 8] for b in range(B)]}
        times: dict = {}
        for path, share in PATHS.items():  # warm-up: compiled loops, first-touch of pages
            set_path(model, share)
            decode(model, prompt, 3, cases["mixed"])
        for r in range(args.repeats):
            for path, share in rotated(list(PATHS.items()), r):
                use_path(model, share, prompt)
                for case in rotated(args.cases, r):
                    s = decode(model, prompt, args.new_tokens, cases[case])
                    times.setdefault((path, case), []).append(s)
        set_path(model, PATHS["sparse"])
        nbytes = weight_bytes(model, prompt)
        for (path, case), ts in times.items():
            step = statistics.median(ts)
            gbs = nbytes[path] / step / 1e9
            rows.append((B, path, case, B / step, step * 1e3, nbytes[path] / 1e9, gbs,
                         nbytes["share"]))
        for path, share in PATHS.items():
            set_path(model, share)
            parts = part_shares(model, prompt, None)
            print(f"B={B} {path}: share of a step: " + ", ".join(
                f"{k} {v:.0%}" for k, v in parts.items()), flush=True)
        print_rows(rows, bandwidth, args)
        rows = []
        print(f"peak RSS so far {peak_rss_gb():.2f} GiB (every weight page touched)")


def print_rows(rows, bandwidth, args) -> None:
    print(f"\n| batch | path | masks | tok/s | ms / token | GB read / step | GB/s (of "
          f"{bandwidth:.0f}) | experts in use |\n|---|---|---|---|---|---|---|---|")
    base = {(r[0], r[2]): r[3] for r in rows if r[1] == "dense"}
    unmasked = {(r[0], r[1]): r[3] for r in rows if r[2] == "unmasked"}
    for B, path, case, tps, ms, gb, gbs, share in rows:
        extra = f" ({tps / base[(B, case)]:.2f}x dense" if (B, case) in base else " ("
        extra += f", {unmasked[(B, path)] / tps:.2f} of unmasked)" if (B, path) in unmasked else ")"
        print(f"| {B} | {path} | {case} | {tps:.1f}{extra} | {ms:.1f} | {gb:.3f} | {gbs:.1f} | "
              f"{share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
