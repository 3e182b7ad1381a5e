#!/usr/bin/env bash
# The GPU check: run it whenever a machine with one NVIDIA GPU is at hand (about 8 minutes).
#   scripts/gpu_check.sh [OUT_DIR]
# 1. the kernel tests natively on CUDA (no Triton interpreter);
# 2. the mixed-profile parity test on the vLLM CUDA engine with torch.compile and CUDA graphs
#    (MONET_TEST_VLLM_COMPILED=1: enforce_eager off), against the runtime generating alone;
# 3. bench_kernels.py at the 1.4B shapes (bf16; GB/s against the GPU's peak bandwidth), the
#    sparse decode path's gather-GEMV (kernels/sparse_triton.py) at T = 1, 4, 16, 32 included;
# 4. a bf16 serving benchmark on a random 1.4B-shape checkpoint (4 layers) on vLLM, compiled.
# Python: $PYTHON, else .venv/bin/python, else python3. vLLM: installed with `pip install
# vllm==0.32.0` when missing and a package index is reachable, or from wheels in
# $MONET_WHEELS (`pip install --no-index --find-links`); without it steps 2 and 4 are skipped
# and the table says so. Logs of every step land in OUT_DIR (default: a temp dir); the summary
# table is printed last and written to OUT_DIR/summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
rows=()
row() { rows+=("| $1 | $2 | $3 |"); }

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs to $out/NAME.log, returns its status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee "$out/$name.log"
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
    return $rc
}

"$py" - <<'PY' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

if ! "$py" -c "import vllm" 2>/dev/null; then
    if [ -n "${MONET_WHEELS:-}" ]; then
        "$py" -m pip install -q --no-index --find-links "$MONET_WHEELS" vllm >"$out/install.log" 2>&1
    else
        timeout 300 "$py" -m pip install -q "vllm==0.32.0" >"$out/install.log" 2>&1
    fi
fi
has_vllm=0
"$py" -c "import vllm" 2>/dev/null && has_vllm=1

# 1. kernel tests on CUDA
if step kernel-tests 240 "$py" -m pytest -q -p no:cacheprovider tests/kernels; then
    row "kernel tests, native CUDA" pass "$(grep -Eo '[0-9]+ passed[^=]*' "$out/kernel-tests.log" | tail -1)"
else
    row "kernel tests, native CUDA" FAIL "$(grep -Eo '[0-9]+ (failed|passed)[^=]*' "$out/kernel-tests.log" | tail -1); see kernel-tests.log"
fi

# 2. vLLM parity, compiled
if [ $has_vllm = 1 ]; then
    if MONET_TEST_VLLM_COMPILED=1 step vllm-parity 300 "$py" -m pytest -q -p no:cacheprovider \
        tests/monet_runtime/test_vllm_engine.py -k "mixed_batch_matches_runtime_alone"; then
        row "vLLM mixed profiles = runtime alone (compiled, CUDA graphs)" pass "$(grep -Eo '[0-9]+ passed' "$out/vllm-parity.log" | tail -1)"
    else
        row "vLLM mixed profiles = runtime alone (compiled, CUDA graphs)" FAIL "see vllm-parity.log"
    fi
else
    row "vLLM parity" skipped "vLLM not installed (see install.log)"
fi

# 3. kernels at the 1.4B shapes
if step bench-kernels 240 "$py" benchmarks/bench_kernels.py --releases 1.4B --dtype bf16 \
    --tokens 1 16 256 4096 --gather-tokens 1 4 16 32; then
    # the Triton targets: 8 mixed profiles within 10% of unmasked, >= 50% of peak at T=4096
    row "bench_kernels 1.4B bf16, triton at T=4096 (time, MB, GB/s, % peak)" done \
        "$(grep -E '^ *1\.4B +4096 .* triton ' "$out/bench-kernels.log" | sed -E 's/ +/ /g' | paste -sd ';' | cut -c1-600)"
    # gather-GEMV of the sparse decode path: triton against torch's gather + GEMM
    row "bench_kernels 1.4B bf16, gather-GEMV at T=1, 32 (time, MB, GB/s, % peak)" done \
        "$(grep -E '^ *1\.4B +(1|32) .*rows_(dot|axpy).* (triton|torch) ' "$out/bench-kernels.log" | sed -E 's/ +/ /g' | paste -sd ';' | cut -c1-900)"
else
    row "bench_kernels 1.4B bf16" FAIL "see bench-kernels.log"
fi

# 4. serving, bf16, random 1.4B-shape checkpoint (4 of its layers), vLLM compiled
if [ $has_vllm = 1 ]; then
    ckpt=$out/ckpt-1.4b
    if step checkpoint 120 "$py" -m monet_cli.main checkpoint random --shape 1.4B --layers 4 \
        --dtype bf16 --out "$ckpt" \
       && step bench-serving 300 "$py" benchmarks/bench_serving.py --checkpoint "$ckpt" \
        --dtype bfloat16 --engines vllm --compiled --repeat 1 -n 32; then
        row "bench_serving 1.4B-shape bf16, vLLM compiled" done \
            "$(grep -E '^(burst|stream) ' "$out/bench-serving.log" | sed -E 's/ +/ /g; s|(tok/s).*|\1|' | paste -sd ';')"
    else
        row "bench_serving 1.4B-shape bf16" FAIL "see checkpoint.log / bench-serving.log"
    fi
    rm -rf "$ckpt"
else
    row "bench_serving" skipped "vLLM not installed"
fi

{
    echo "GPU check, $(date -u +%F), $(cat "$out/device.txt")"
    echo
    echo "| step | result | figures |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "Logs: $out"
} | tee "$out/summary.md"
