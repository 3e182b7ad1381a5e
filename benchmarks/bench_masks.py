"""Mask profile benchmarks at the size of the released models (E = 512: 262,144 composite
experts per layer, 24 layers, H = 8 routing heads, k = 8, G = 4 so 6 routing layers).

  forms       a profile removing 20% of every layer (1.26M experts): binary, compact JSON,
              local and Redis store round trips (the issue asks: well under a second)
  accumulate  routing statistics from synthetic router weights: tokens/s of the dense
              (matmul) and sparse (scatter of kept pairs) accumulations, extrapolated to 1M
              tokens, or run on --tokens of them through LabelAccumulator
  build       profiles from statistics of 1M tokens (14 labels): specificity, coverage,
              Pearson, then store; the part of a build that does not route text

    .venv/bin/python benchmarks/bench_masks.py [--tokens 1000000] [--skip-redis]
Prints the machine and, for each figure, the limit set by memory bandwidth or peak flops.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from masks.builders import specificity_profile, toxicity_profile  # noqa: E402
from masks.local_store import LocalMaskStore  # noqa: E402
from masks.schema import MaskProfile, Provenance  # noqa: E402
from masks.statistics import (  # noqa: E402
    CorrelationStatistics,
    LabelAccumulator,
    LabelStatistics,
    composite_square_sums,
    composite_sums,
)
from masks.testing import random_router_probs  # noqa: E402
from monet_runtime import ExpertMask  # noqa: E402

E, L, H, K, G = 512, 24, 8, 8, 4
ROUTING = list(range(0, L, G))
LABELS = 14  # MMLU-Pro categories, as in the paper


def timed(fn, repeat: int = 3):
    """(best seconds, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, load average {load:.1f}")


def limits() -> tuple[float, float]:
    """Measured copy bandwidth (bytes/s) and float32 matmul rate (flop/s) on this machine."""
    x = torch.rand(64 * 2**20 // 4)
    copy_s, _ = timed(lambda: x.clone())
    a = torch.rand(1024, 1024)
    mm_s, _ = timed(lambda: a @ a)
    return 2 * x.numel() * 4 / copy_s, 2 * 1024**3 / mm_s


# ---- forms -------------------------------------------------------------------------------
def big_profile(share: float = 0.2) -> MaskProfile:
    rng = np.random.default_rng(0)
    layers = {l: rng.choice(E * E, int(share * E * E), replace=False) for l in range(L)}
    mask = ExpertMask({l: np.stack(np.divmod(k, E), 1) for l, k in layers.items()},
                      num_experts=E)
    return MaskProfile(name="big", kind="manual", model_id="monet-bench", num_layers=L,
                       num_experts=E, experts=mask, provenance=Provenance(builder="bench"))


def start_redis(directory: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(directory), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.terminate()
    return None, None


def bench_forms(skip_redis: bool) -> None:
    print("\n== forms: 20% of 262,144 experts in each of 24 layers ==")
    start = time.perf_counter()
    profile = big_profile()
    print(f"  ExpertMask from {profile.size:,} pairs: {time.perf_counter() - start:.3f} s")
    raw_bits = L * E * E / 8
    for name, dump, load in (("binary", MaskProfile.to_bytes, MaskProfile.from_bytes),
                             ("compact JSON", MaskProfile.to_json, MaskProfile.from_json)):
        dump_s, data = timed(lambda: dump(profile))
        load_s, back = timed(lambda: load(data))
        assert back.experts == profile.experts
        print(f"  {name:13s} {len(data) / 1e6:5.2f} MB  dump {dump_s * 1e3:6.1f} ms  "
              f"load {load_s * 1e3:6.1f} ms   (bitsets: {raw_bits / 1e6:.2f} MB)")
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("local store", LocalMaskStore(Path(tmp) / "store"))]
        proc = None
        if not skip_redis:
            proc, url = start_redis(Path(tmp))
            if url:
                from masks.redis_store import RedisMaskStore

                stores.append(("Redis store", RedisMaskStore.from_url(url)))
        for name, store in stores:
            put_s, _ = timed(lambda: store.put(profile))
            get_s, back = timed(lambda: store.get("big"))
            assert back.experts == profile.experts
            print(f"  {name:13s} put {put_s * 1e3:6.1f} ms  get {get_s * 1e3:6.1f} ms")
            store.close()
        if proc is not None:
            proc.terminate()
            proc.wait()


# ---- accumulation ------------------------------------------------------------------------
def bench_accumulate(tokens: int, batch: int, bandwidth: float, flops: float) -> None:
    print(f"\n== accumulate: E={E}, H={H}, k={K}, {len(ROUTING)} routing layers ==")
    gen = torch.Generator().manual_seed(0)
    g1 = random_router_probs(batch, H, E, K, generator=gen)
    g2 = random_router_probs(batch, H, E, K, generator=gen)
    kept = float((g1 > 0).sum(-1).float().mean())
    per_million = 1e6 / batch * len(ROUTING)
    read_limit = 2 * g1.numel() * 4 / bandwidth * per_million
    flop_limit = 2 * batch * H * E * E / flops * per_million
    print(f"  {kept:.1f} experts kept per head and side on average; times per 1M tokens, "
          f"all routing layers")
    print(f"  limits: reading g1, g2 once {read_limit:.0f} s; dense matmul at the measured "
          f"{flops / 1e9:.0f} GFLOP/s {flop_limit:.0f} s")
    for method in ("dense", "sparse"):
        sums_s, _ = timed(lambda: composite_sums(g1, g2, method=method), repeat=2)
        print(f"  sum g_ij        {method:6s} {sums_s * per_million:7.0f} s  "
              f"({batch / sums_s / 1e3:.1f}k tokens/s per routing layer)")
    square_s, _ = timed(lambda: composite_square_sums(g1, g2, method="sparse"), repeat=1)
    print(f"  sum g_ij^2      sparse {square_s * per_million:7.0f} s  (toxicity adds this and "
          f"a weighted sum g_ij)")
    if tokens:
        accumulate_tokens(tokens, batch, gen)


def accumulate_tokens(tokens: int, batch: int, gen: torch.Generator) -> None:
    """LabelAccumulator over `tokens` tokens of 14 labels, then a profile from the result.
    Routing comes from one pre-made label-biased batch per label, reused across routing
    layers and batches: the accumulation's cost does not depend on the values."""
    pool = LABELS
    bias = torch.randn(pool, H, E, generator=gen)
    made = [(random_router_probs(batch, H, E, K, generator=gen, bias_HE=bias[p]),
             random_router_probs(batch, H, E, K, generator=gen, bias_HE=bias[p]))
            for p in range(pool)]
    acc = LabelAccumulator(routing_layers=ROUTING, num_layers=L, num_experts=E, num_heads=H,
                           groups=G)
    start = time.perf_counter()
    done = n = 0
    while done < tokens:
        T = min(batch, tokens - done)
        g1, g2 = made[n % pool]
        probs = {l: (g1[:T], g2[:T]) for l in ROUTING}
        acc.add(probs, [f"label{n % LABELS:02d}"] * T)
        done, n = done + T, n + 1
    added = time.perf_counter() - start
    start = time.perf_counter()
    stats = acc.result(model_id="monet-bench")
    profile = specificity_profile(stats, "label03", name="no-3")
    built = time.perf_counter() - start
    print(f"  {tokens:,} tokens through LabelAccumulator ({LABELS} labels, {len(ROUTING)} routing "
          f"layers): accumulate {added:.1f} s ({tokens / added / 1e3:.1f}k tokens/s), then the "
          f"profile {built:.2f} s ({profile.size:,} experts over {L} layers)")


# ---- build from statistics ---------------------------------------------------------------
def synthetic_label_statistics(tokens: int = 1_000_000) -> LabelStatistics:
    """Statistics of `tokens` tokens over 14 labels: shared usage, 2% of experts per label
    used 4x more by it."""
    rng = np.random.default_rng(0)
    R = len(ROUTING)
    usage = rng.gamma(1.0, H / E**2, size=(R, E, E))
    mass = np.empty((LABELS, R, E, E))
    per_label = tokens // LABELS
    for n in range(LABELS):
        boost = np.where(rng.random((R, E, E)) < 0.02, 4.0, 1.0)
        mass[n] = usage * boost * rng.uniform(0.8, 1.2, size=(R, E, E)) * per_label
    return LabelStatistics(labels=[f"label{n:02d}" for n in range(LABELS)], routing_layers=ROUTING,
                           num_layers=L, num_experts=E, num_heads=H, groups=G, mass=mass,
                           tokens=np.full(LABELS, per_label), model_id="monet-bench",
                           corpus_fingerprint="synthetic")


def synthetic_correlation_statistics(tokens: int = 1_000_000) -> CorrelationStatistics:
    rng = np.random.default_rng(1)
    R = len(ROUTING)
    mean = rng.gamma(1.0, H / E**2, size=(R, E, E))
    sum_x = mean * tokens
    sum_x2 = sum_x * mean * rng.uniform(5, 50, size=(R, E, E))
    s_mean = 0.2
    r = np.clip(rng.normal(0.0, 0.06, size=(R, E, E)), -1, 1)
    sd_x = np.sqrt(sum_x2 / tokens - mean**2)
    sd_s = 0.25
    sum_xs = tokens * (r * sd_x * sd_s + mean * s_mean)
    return CorrelationStatistics(
        routing_layers=ROUTING, num_layers=L, num_experts=E, num_heads=H, groups=G, n=tokens,
        sum_s=s_mean * tokens, sum_s2=tokens * (sd_s**2 + s_mean**2), sum_x=sum_x,
        sum_x2=sum_x2, sum_xs=sum_xs, model_id="monet-bench", corpus_fingerprint="synthetic")


def bench_build() -> None:
    print("\n== build: 262,144 experts x 24 layers from statistics of 1M tokens ==")
    stats = synthetic_label_statistics()
    one_s, profile = timed(lambda: specificity_profile(stats, "label03", name="no-3"))
    print(f"  specificity (factor 2), one label      {one_s:6.2f} s  "
          f"{profile.size:,} experts ({100 * profile.size / (L * E * E):.1f}%)")
    all_s, _ = timed(lambda: [specificity_profile(stats, t, name=f"no-{n}")
                              for n, t in enumerate(stats.labels)], repeat=1)
    print(f"  specificity, all {LABELS} labels             {all_s:6.2f} s")
    cov_s, profile = timed(lambda: specificity_profile(stats, "label03", name="c", factor=None,
                                                      coverage=0.3))
    print(f"  coverage 0.3, one label                {cov_s:6.2f} s  {profile.size:,} experts")
    tox = synthetic_correlation_statistics()
    tox_s, profile = timed(lambda: toxicity_profile(tox, name="detox", threshold=0.1))
    print(f"  Pearson > 0.1                          {tox_s:6.2f} s  {profile.size:,} experts "
          f"({100 * profile.size / (L * E * E):.1f}%)")
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalMaskStore(tmp)
        put_s, _ = timed(lambda: store.put(profile))
        print(f"  store it (local)                       {put_s:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=0,
                        help="also accumulate this many synthetic tokens (e.g. 1000000)")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--skip-redis", action="store_true")
    parser.add_argument("--only", choices=["forms", "accumulate", "build"])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    bandwidth, flops = limits()
    print(f"measured: copy {bandwidth / 1e9:.1f} GB/s, float32 matmul {flops / 1e9:.0f} GFLOP/s")
    if args.only in (None, "forms"):
        bench_forms(args.skip_redis)
    if args.only in (None, "accumulate"):
        bench_accumulate(args.tokens, args.batch, bandwidth, flops)
    if args.only in (None, "build"):
        bench_build()


if __name__ == "__main__":
    main()
