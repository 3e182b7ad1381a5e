"""The Triton kernels compile for CUDA (sm_80, sm_90) on a machine without a GPU.

The interpreter runs the kernels' arithmetic but not Triton's compiler: types, shapes, layouts
and register allocation are only checked by compiling. This compiles each kernel once per
target in a subprocess (TRITON_INTERPRET must be unset there) down to a cubin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import mixing_triton as mt, router_triton as rt, sparse_triton as st

def compile_(fn, sig, consts, cap):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts),
                            target=GPUTarget("cuda", cap, 32), options={"num_warps": 4})
    return len(kernel.asm["cubin"])

X, F, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"
H, E, M = 12, 512, 12  # 4.1B VD
dense, sparse = mt._blocks(H, E, M)
n = dict(H="i32", E="i32", M="i32")
kernels = [
    (rt._route_kernel, dict(z_ptr=F, mean_ptr=F, var_ptr=F, g_ptr=F, R="i32", H="i32", E="i32",
                            sigma="fp32", eps="fp32"), dict(BLOCK_R=8, BLOCK_E=512)),
    (mt._active_experts_kernel, dict(g1_ptr=F, g2_ptr=F, profile_ptr=I64, I_ptr=I32, J_ptr=I32,
                                     count_ptr=I32, H="i32", E="i32"),
     dict(BLOCK_H=16, BLOCK_E=64)),
    (mt._mix_vd_kernel, dict(a_ptr=X, b_ptr=X, g1_ptr=F, g2_ptr=F, profile_ptr=I64, s_ptr=F,
                             x11_ptr=X, x12_ptr=X, x21_ptr=X, x22_ptr=X, c1_ptr=X, c2_ptr=X, **n),
     dict(HAS_MASK=True, **dense)),
    (mt._mix_vd_kernel, dict(a_ptr=F, b_ptr=F, g1_ptr=F, g2_ptr=F, profile_ptr=F, s_ptr=F,
                             x11_ptr=F, x12_ptr=F, x21_ptr=F, x22_ptr=F, c1_ptr=F, c2_ptr=F, **n),
     dict(HAS_MASK=False, **dense)),
    (mt._masked_vd_kernel, dict(a_ptr=X, b_ptr=X, g1_ptr=F, g2_ptr=F, table_ptr=I32,
                                profile_ptr=I64, I_ptr=I32, J_ptr=I32, count_ptr=I32, s_ptr=F,
                                x11_ptr=X, x12_ptr=X, x21_ptr=X, x22_ptr=X, c1_ptr=X, c2_ptr=X,
                                W="i32", **n), sparse),
    (mt._mix_hd_kernel, dict(x_ptr=X, g1_ptr=F, g2_ptr=F, profile_ptr=I32, s_ptr=F, out_ptr=X,
                             c2_ptr=X, **n), dict(HAS_MASK=True, **dense)),
    (mt._masked_hd_kernel, dict(x_ptr=X, g1_ptr=F, g2_ptr=F, table_ptr=I32, profile_ptr=I32,
                                I_ptr=I32, J_ptr=I32, count_ptr=I32, s_ptr=F, out_ptr=X,
                                c2_ptr=X, W="i32", **n), sparse),
]
# the gather-GEMV kernels at a decode step of 1 and of 32 tokens, rows of D = 2048
for w, T in (("*bf16", 1), ("*fp32", 32)):
    BT, BD, rows = st._blocks(T, 2048)
    kernels += [
        (st._rows_dot_kernel, dict(w_ptr=w, rows_ptr=I64, y_ptr=w, use_ptr="*i1", part_ptr=F,
                                   T="i32", N="i32", D="i32", d_per_split="i32"),
         dict(BLOCK_T=BT, BLOCK_N=rows, BLOCK_D=BD)),
        (st._rows_axpy_kernel, dict(w_ptr=w, rows_ptr=I64, x_ptr=w, part_ptr=F, T="i32",
                                    L="i32", D="i32", l_per_split="i32"),
         dict(BLOCK_T=BT, BLOCK_L=rows, BLOCK_D=BD)),
    ]
sizes = {}
for cap in (80, 90):
    for i, (fn, sig, consts) in enumerate(kernels):
        sizes[f"{i}:{fn.__name__}@sm{cap}"] = compile_(fn, sig, consts, cap)
print(json.dumps(sizes))
"""


def test_kernels_compile_for_cuda():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends import backends

        if "nvidia" not in backends:
            pytest.skip("triton has no NVIDIA backend here")
    except ImportError:
        pytest.skip(f"triton {triton.__version__} lacks triton.backends")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == 22 and all(size > 0 for size in sizes.values()), sizes
