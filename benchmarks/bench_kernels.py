"""Router and masked-mixing kernels at the MONET layer shapes: time, bytes moved, bandwidth.

    .venv/bin/python benchmarks/bench_kernels.py [--releases 850M 1.4B 4.1B]
        [--tokens 1 16 256 4096] [--variants vd hd] [--naive-max-tokens N] [--peak-gbps B]
        [--threads N] [--gather-tokens 1 4 16 32]

For each release (E = 512; H and m from the spec) and T tokens: the router on logits [T, H, E],
and VD / HD mixing with no mask, one profile (every token) and 8 mixed profiles (tokens spread
over -1 and 8 profiles), each as Triton (CUDA only), the compiled CPU loops (CPU, float32),
the torch reference and the naive dense approach (G [T, E, E] per token, masked entries zeroed,
contracted; what the paper's authors describe). Masks remove 5% of the composite experts at random.

Bytes moved is the compulsory traffic: every input read once and every output written once
(router: z in, g out; VD: g1, g2, a, b in, x11, x12, x21, x22, c1, c2 out, plus the table rows
of the profiles in use). GB/s = bytes / time; its share is against the device's peak bandwidth
(table of GPUs, --peak-gbps, or on a CPU a measured large copy). The kernels are memory-bound,
so that share is the figure to push up; the naive approach does O(E^2) work per token instead.

Gather-GEMV (CUDA only; skipped with a message elsewhere): the sparse decode path's two
products at a step of T tokens (--gather-tokens) over the rows of its active experts, as
kernels.sparse runs them: `u rows_dot` (W [E*M, D] at the n*M rows of the active experts,
y [T, D]) and `v rows_axpy` (the packed v table, pack_vd's [2*E*M + E, D/2] or pack_hd's
[E*M + E, D], at the rows of kernels.sparse._expert_rows), Triton (kernels.sparse_triton)
against torch's index_select + linear and embedding_bag. Bytes: the gathered rows some token
needs (the only weight bytes the kernels read) plus y / use / x in and the output out. At
batch-1 decode that is about 1-4 MB per call, a microsecond at HBM speed: there the limit is
the launch (a few microseconds), and the row to read is the time beside torch's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from kernels.mixing import bitset_words  # noqa: E402

E = 512
RELEASES = {"850M": dict(H=6, m=12, D=1536), "1.4B": dict(H=8, m=16, D=2048),
            "4.1B": dict(H=12, m=24, D=3072)}
MASK_CASES = ("none", "one profile", "8 profiles")
DENSITY = 0.05
# Peak DRAM bandwidth in GB/s by device name (datasheets).
PEAK_GBPS = {"H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
             "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100": 1555, "L40S": 864,
             "A10G": 600, "L4": 300, "RTX 4090": 1008}


def describe_device(device: torch.device, peak_gbps: float | None) -> tuple[str, float, str]:
    """(description, peak GB/s, where the peak comes from)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory >> 30} GiB"
        if peak_gbps:
            return name, peak_gbps, "--peak-gbps"
        for key, gbps in PEAK_GBPS.items():
            if key in props.name:
                return name, gbps, "datasheet"
        return name, measured_copy_gbps(device), "measured copy"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if peak_gbps:
        return name, peak_gbps, "--peak-gbps"
    return name, measured_copy_gbps(device), "measured copy"


def measured_copy_gbps(device: torch.device) -> float:
    """Bandwidth of a 256 MiB tensor copy (read + write), best of 5."""
    src = torch.empty(1 << 26, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, min_repeat=5)
    return 2 * src.numel() * 4 / seconds / 1e9


def timed(fn, device: torch.device, *, min_repeat: int = 3, budget_s: float = 0.3) -> float:
    """Seconds per call after a warm-up, repeated until the time budget is used: the median
    of CUDA event times on a GPU, the minimum on a CPU (shared cores make the rest noise)."""
    warm_s = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times: list[float] = []
    if time.perf_counter() - warm_s > budget_s and device.type != "cuda":
        times.append(time.perf_counter() - warm_s)  # slow (the naive approach): one more run
        min_repeat = 2
    while len(times) < min_repeat or (sum(times) < budget_s and len(times) < 100):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times) if device.type == "cuda" else min(times)


def make_layer(T: int, H: int, M: int, *, dtype, device, seed: int = 0) -> dict:
    """Router logits and stats, g1 / g2 from the reference router, activations, mask table."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, T, H, E, generator=gen)
    mean, var = torch.zeros(H), torch.ones(H)
    sigma = kernels.router_sigma(8, E)
    g1, g2 = (kernels.route_reference(z[s], mean, var, sigma=sigma) for s in range(2))
    a = torch.randn(T, E, M, generator=gen).clamp_min(0).square()
    b = torch.randn(T, E, M, generator=gen).clamp_min(0).square()
    removed_PEE = torch.rand(8, E, E, generator=gen) < DENSITY
    bits = torch.zeros(8, bitset_words(E) * 32, dtype=torch.int64)
    bits[:, : E * E] = removed_PEE.flatten(1).long()
    words = (bits.view(8, -1, 32) << torch.arange(32)).sum(-1)
    table = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    profiles = {
        "none": None,
        "one profile": torch.zeros(T, dtype=torch.int32),
        # token t gets profile t % 9, where 8 stands for -1 (no mask): token 0 is masked
        "8 profiles": torch.where(torch.arange(T) % 9 == 8, -1, torch.arange(T) % 9).int(),
    }
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    return {
        "z": on(z[0]), "mean": on(mean), "var": on(var), "sigma": sigma,
        "g1": on(g1), "g2": on(g2), "a": on(a.to(dtype)), "b": on(b.to(dtype)),
        "table": on(table), "removed": on(removed_PEE),
        "profiles": {k: on(v) for k, v in profiles.items()},
    }


def naive_mix(x1, x2, g1, g2, removed_PEE, profile_T, *, vd: bool, chunk_bytes: int = 1 << 28):
    """Dense masked mixing: G [t, E, E] per chunk of tokens, masked entries zeroed, contracted."""
    T, _, M = x1.shape
    step = max(1, chunk_bytes // (E * E * 4))
    outs = []
    for s in range(0, T, step):
        sl = slice(s, s + step)
        G = torch.einsum("thi,thj->tij", g1[sl].to(x1.dtype), g2[sl].to(x1.dtype))
        if profile_T is not None:
            prof = profile_T[sl].long()
            G = G.masked_fill(removed_PEE[prof.clamp_min(0)] & (prof >= 0)[:, None, None], 0)
        c1, c2 = G.sum(2), G.sum(1)
        if vd:
            outs.append((x1[sl] * c1[..., None], torch.bmm(G, x2[sl]),
                         torch.bmm(G.transpose(1, 2), x1[sl]), x2[sl] * c2[..., None], c1, c2))
        else:
            outs.append((torch.bmm(G.transpose(1, 2), x1[sl]), c2))
    return [torch.cat(parts) for parts in zip(*outs)]


def mixing_call(L: dict, impl: str, table, profile_T, *, vd: bool):
    """A no-argument call of one mixing implementation on the layer L."""
    if impl == "naive":
        x2 = L["b"] if vd else None
        return lambda: naive_mix(L["a"], x2, L["g1"], L["g2"], L["removed"], profile_T, vd=vd)
    if vd:
        return lambda: kernels.mix_vd(L["a"], L["b"], L["g1"], L["g2"], table, profile_T,
                                      impl=impl)
    return lambda: kernels.mix_hd(L["a"], L["g1"], L["g2"], table, profile_T, impl=impl)


def mix_bytes(T: int, H: int, M: int, *, vd: bool, act_bytes: int, profile_T) -> int:
    g = 2 * T * H * E * 4
    x = (2 if vd else 1) * T * E * M * act_bytes
    out = (4 if vd else 1) * T * E * M * act_bytes + (2 if vd else 1) * T * E * act_bytes
    masks = 0
    if profile_T is not None:
        rows = min(T, int(profile_T.max().item()) + 1)
        masks = T * 4 + rows * bitset_words(E) * 4
    return g + x + out + masks


def run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_dtype = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or default_dtype]
    name, peak, source = describe_device(device, args.peak_gbps)
    impls = (["triton"] if device.type == "cuda" and kernels.triton_available() else [])
    impls += ["cpu"] if device.type == "cpu" and dtype == torch.float32 else []
    impls += ["reference", "naive"]
    print(f"device: {name}")
    print(f"peak bandwidth: {peak:.0f} GB/s ({source}); activations {dtype}; E={E}; "
          f"mask density {DENSITY}; implementations: {', '.join(impls)}")
    if device.type != "cuda":
        print("no CUDA device: the Triton kernels are not timed (the interpreter is no measure)")
    print("small working sets stay in cache, so their GB/s can pass the DRAM peak")
    header = (f"{'release':>7} {'T':>5} {'op':<22} {'impl':<9} {'time':>10} {'MB':>9} "
              f"{'GB/s':>8} {'% peak':>7}")
    print(header)
    print("-" * len(header))

    def row(release, T, op, impl, seconds, nbytes):
        if seconds is None:
            print(f"{release:>7} {T:>5} {op:<22} {impl:<9} {'skipped':>10}")
            return
        gbps = nbytes / seconds / 1e9
        print(f"{release:>7} {T:>5} {op:<22} {impl:<9} {seconds * 1e6:>8.1f}us "
              f"{nbytes / 1e6:>9.2f} {gbps:>8.2f} {100 * gbps / peak:>6.1f}%")

    for release in args.releases:
        H, m = RELEASES[release]["H"], RELEASES[release]["m"]
        for T in args.tokens:
            for variant in args.variants:
                vd = variant == "vd"
                M = m // 2 if vd else m
                L = make_layer(T, H, M, dtype=dtype, device=device)
                if variant == args.variants[0]:
                    route_bytes = 2 * T * H * E * 4
                    for impl in [i for i in impls if i in ("triton", "reference")]:
                        def fn(impl=impl):
                            kernels.route(L["z"], L["mean"], L["var"], sigma=L["sigma"],
                                          impl=impl)
                        row(release, T, "router", impl, timed(fn, device), route_bytes)
                for case in MASK_CASES:
                    prof = L["profiles"][case]
                    table = None if prof is None else L["table"]
                    nbytes = mix_bytes(T, H, M, vd=vd, act_bytes=L["a"].element_size(),
                                       profile_T=prof)
                    op = f"{variant} {case}"
                    for impl in impls:
                        if impl == "naive" and T > args.naive_max_tokens:
                            row(release, T, op, impl, None, nbytes)
                            continue
                        fn = mixing_call(L, impl, table, prof, vd=vd)
                        row(release, T, op, impl, timed(fn, device), nbytes)
    if args.gather_tokens:
        run_gather(args, device, row)


def gather_layer(T: int, H: int, M: int, D: int, *, vd: bool, dtype, device, seed: int = 0):
    """A decode step's gather-GEMV operands: (u weight, u rows, y, use), (table, v rows, x)."""
    from kernels.sparse import _expert_rows

    gen = torch.Generator().manual_seed(seed)
    sigma = kernels.router_sigma(8, E)
    g1, g2 = (kernels.route_reference(torch.randn(T, H, E, generator=gen), torch.zeros(H),
                                      torch.ones(H), sigma=sigma) for _ in range(2))
    active = kernels.active_experts(g1, g2)
    n = active.side1.numel()
    W = torch.randn(E * M, D, generator=gen).to(dtype)
    rows = (active.side1[:, None] * M + torch.arange(M)).reshape(-1)  # [n*M]
    use = (active.g1 != 0).any(1).repeat_interleave(M, dim=1)  # [T, n*M]
    y = torch.randn(T, D, generator=gen).to(dtype)
    Dv = D // 2 if vd else D
    starts = (0, E * M, 2 * E * M) if vd else (0, E * M)
    table = torch.randn(starts[-1] + E, Dv, generator=gen).to(dtype)
    v_rows = _expert_rows(active.side2, M, starts, E)
    x = torch.randn(T, v_rows.numel(), generator=gen)
    x = (x * torch.cat([active.g2.sum(1).ne(0).repeat_interleave(M, 1)] * (len(starts) - 1)
                       + [active.g2.sum(1).ne(0)], 1)).to(dtype)  # zero at unused experts
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return on(W, rows, y, use), on(table, v_rows, x), n


def gather_bytes(W, rows, y, use, *, dot: bool) -> int:
    """Weight rows some token needs, plus the small operands in and the float32 out."""
    needed = (use if dot else use != 0).any(0).sum().item()
    out = y.shape[0] * (rows.numel() if dot else W.shape[1]) * 4
    return needed * W.shape[1] * W.element_size() + y.numel() * y.element_size() + \
        use.numel() * use.element_size() + rows.numel() * 8 + out


def run_gather(args, device: torch.device, row) -> None:
    """The gather-GEMV rows of the table (Triton and torch), CUDA only."""
    if device.type != "cuda" or not kernels.triton_available():
        print("gather-GEMV: skipped, no CUDA device (or no triton): the Triton kernels are "
              "timed on a GPU only")
        return
    import torch.nn.functional as F

    from kernels import sparse_triton

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "bf16"]
    for release in args.releases:
        H, m = RELEASES[release]["H"], RELEASES[release]["m"]
        D = RELEASES[release]["D"]
        for T in args.gather_tokens:
            for variant in args.variants:
                vd = variant == "vd"
                M = m // 2 if vd else m
                (W, rows, y, use), (table, v_rows, x), n = gather_layer(
                    T, H, M, D, vd=vd, dtype=dtype, device=device)
                u_bytes = gather_bytes(W, rows, y, use, dot=True)
                v_bytes = gather_bytes(table, v_rows, x, x, dot=False)
                calls = {
                    f"{variant} u rows_dot n={n}": (u_bytes, {
                        "triton": lambda: sparse_triton.rows_dot(W, rows, y, use),
                        "torch": lambda: F.linear(y, W.index_select(0, rows))}),
                    f"{variant} v rows_axpy": (v_bytes, {
                        "triton": lambda: sparse_triton.rows_axpy(table, v_rows, x),
                        "torch": lambda: F.embedding_bag(v_rows.expand(T, -1), table,
                                                         mode="sum", per_sample_weights=x)}),
                }
                for op, (nbytes, impls) in calls.items():
                    for impl, fn in impls.items():
                        row(release, T, op, impl, timed(fn, device), nbytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--releases", nargs="+", default=list(RELEASES), choices=list(RELEASES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 4096])
    parser.add_argument("--variants", nargs="+", default=["vd", "hd"], choices=["vd", "hd"])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="activations (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--naive-max-tokens", type=int, default=None,
                        help="skip the naive approach above this T (default: 4096 on CUDA, "
                             "256 on CPU)")
    parser.add_argument("--gather-tokens", nargs="*", type=int, default=[1, 4, 16, 32],
                        help="decode steps for the gather-GEMV rows (CUDA only; none: skip)")
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on shared cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.naive_max_tokens is None:
        args.naive_max_tokens = 4096 if torch.cuda.is_available() else 256
    with torch.inference_mode():
        run(args)


if __name__ == "__main__":
    main()
