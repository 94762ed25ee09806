#!/usr/bin/env bash
# GPU acceptance run for one machine with an NVIDIA GPU: build, selftest, benchmark, CUDA tests.
#
#   scripts/gpu_acceptance.sh [STAGE...]     STAGE in build, selftest, bench, tests (default: all four)
#
# Everything lands in $OUT (default ./gpu-acceptance): build.log, the built extension (so a later run on
# an identical machine can skip the build by copying it back), selftest.json/.log, bench_gpu.json/.log,
# tests.log. Each stage has its own time limit so one slow stage cannot starve the others; the limits
# (seconds) can be overridden with BUILD_S, SELFTEST_S, BENCH_S, TESTS_S.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-acceptance}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build selftest bench tests)
status=0

run_stage() {  # name, limit, command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== stage $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/stages.txt"
    [ "$rc" -ne 0 ] && status=1
}

for stage in "${stages[@]}"; do
    case "$stage" in
    build)
        if ls semanticgen/_C*.so >/dev/null 2>&1 && "$PY" -c "import semanticgen._C" 2>/dev/null; then
            echo "== stage build: semanticgen._C present and importable, not rebuilt" | tee -a "$OUT/stages.txt"
            continue
        fi
        # Build for this GPU only: sm_90a on Hopper (wgmma/TMA), its own capability elsewhere.
        arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c == (9, 0) else ''))")
        SEMANTICGEN_CUDA_ARCHS="$arch" MAX_JOBS="$(nproc)" run_stage build "${BUILD_S:-240}" \
            "$PY" -m pip install --no-build-isolation --no-deps -e .
        cp semanticgen/_C*.so "$OUT/" 2>/dev/null
        ;;
    selftest)
        run_stage selftest "${SELFTEST_S:-330}" "$PY" -m semanticgen.cli selftest --device cuda --json "$OUT/selftest.json"
        ;;
    bench)
        run_stage bench "${BENCH_S:-240}" "$PY" -m semanticgen.benchmarks.swin_attention_gpu --out "$OUT/bench_gpu.json"
        ;;
    tests)
        run_stage tests "${TESTS_S:-240}" "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider \
            tests/test_swin_attention_triton.py tests/test_swin_attention_varlen.py -k "cuda"
        ;;
    *)
        echo "unknown stage $stage (expected build, selftest, bench, tests)" >&2
        exit 2
        ;;
    esac
done
cat "$OUT/stages.txt"
exit $status
