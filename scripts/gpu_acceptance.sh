#!/usr/bin/env bash
# GPU acceptance run for one machine with an NVIDIA GPU: build, selftest, CUDA tests, benchmark.
#
#   scripts/gpu_acceptance.sh [STAGE...]     STAGE in build, selftest, tests, bench (default: all four, in that order)
#
# Time: the whole script stays within TOTAL_S (default 540) seconds of command time, so it fits a 15-minute
# device lease that also pays for starting the machine and copying files. Stages run in order of value:
#   build     only when semanticgen._C is missing or lacks kernels for this GPU (the flow checks need them);
#   selftest  the verdict (semanticgen selftest --device cuda: its sections' budgets add up to 270 s);
#   tests     the CUDA parametrizations of the flow-op and attention tests, flow ops first (fast);
#   bench     the GPU attention benchmark (about 2.5 min), last, and only if a whole BENCH_S is left: a benchmark
#             cut short writes nothing, so in a 15-minute lease it usually needs a run of its own
#             (scripts/gpu_acceptance.sh bench).
# Each stage's limit is the smaller of its own (BUILD_S 150, SELFTEST_S 320, TESTS_S 100, BENCH_S 150) and what
# is left of TOTAL_S less KILL_S (15 s: timeout's grace between SIGINT and SIGKILL); a stage with less than
# MIN_STAGE_S (30) left, or the benchmark without its whole limit, is not started and is reported as not run.
# build + selftest + tests at their limits take 570 s; the deadline trims the tests stage when a build ran.
#
# Everything lands in $OUT (default ./gpu-acceptance): build.log, the built extension (so a later run on an
# identical machine can skip the build by copying it back), selftest.json/.log, tests.log, bench_gpu.json/.log,
# and stages.txt (one line per stage: exit status, seconds, limit).
#
# Exit status: 0 every stage ran and passed; 1 a stage failed; 3 nothing failed, but a stage timed out, was not
# run for lack of time, or the selftest's verdict was INCOMPLETE (its exit 3: checks cut by a time budget).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-acceptance}"
mkdir -p "$OUT"
: >"$OUT/stages.txt"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-540}"
KILL_S=15
MIN_STAGE_S="${MIN_STAGE_S:-30}"
deadline=$((SECONDS + TOTAL_S))
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build selftest tests bench)
failed=0
incomplete=0

note() {
    echo "$1" | tee -a "$OUT/stages.txt"
}

run_stage() {  # name, own limit, least time worth starting with, command...
    local name=$1 limit=$2 least=$3
    shift 3
    local left=$((deadline - SECONDS - KILL_S))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "$least" ]; then
        note "== stage $name: NOT RUN, ${left} s left of TOTAL_S=$TOTAL_S"
        incomplete=1
        return
    fi
    local t0=$SECONDS
    timeout --signal=INT --kill-after="$KILL_S" "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local what=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT"
        incomplete=1
    elif [ "$name" = selftest ] && [ "$rc" -eq 3 ]; then
        what="INCOMPLETE (checks cut by a time budget)"
        incomplete=1
    elif [ "$rc" -ne 0 ]; then
        what=FAILED
        failed=1
    fi
    note "== stage $name: $what, rc=$rc in $((SECONDS - t0)) s (limit $limit s)"
}

for stage in "${stages[@]}"; do
    case "$stage" in
    build)
        # Skip only when _C imports and was built for this GPU's compute capability (a CPU-only or other-arch
        # build would fail every CUDA flow check).
        if ls semanticgen/_C*.so >/dev/null 2>&1 && "$PY" - <<'EOF' 2>/dev/null
import sys
import torch
import semanticgen._C  # noqa: F401
from semanticgen._extension import built_cuda_archs

cap = "{}.{}".format(*torch.cuda.get_device_capability())
sys.exit(0 if any(a.rstrip("a") == cap for a in built_cuda_archs()) else 1)
EOF
        then
            note "== stage build: semanticgen._C present with kernels for this GPU, not rebuilt"
            continue
        fi
        # Build for this GPU only: sm_90a on Hopper (wgmma/TMA), its own capability elsewhere.
        arch=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c == (9, 0) else ''))")
        SEMANTICGEN_CUDA_ARCHS="$arch" MAX_JOBS="$(nproc)" run_stage build "${BUILD_S:-150}" "$MIN_STAGE_S" \
            "$PY" -m pip install --no-build-isolation --no-deps -e .
        cp semanticgen/_C*.so "$OUT/" 2>/dev/null
        ;;
    selftest)
        run_stage selftest "${SELFTEST_S:-320}" "$MIN_STAGE_S" "$PY" -m semanticgen.cli selftest --device cuda --json "$OUT/selftest.json"
        ;;
    tests)
        # On a GPU a missing or CPU-only _C is a failure, not a row of skips (tests/conftest.py).
        SEMANTICGEN_REQUIRE_EXTENSION=1 run_stage tests "${TESTS_S:-100}" "$MIN_STAGE_S" \
            "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider -k "cuda" \
            tests/test_flow_ops.py tests/test_flow_ops_shapes.py \
            tests/test_swin_attention_triton.py tests/test_swin_attention_varlen.py
        ;;
    bench)
        run_stage bench "${BENCH_S:-150}" "${BENCH_S:-150}" \
            "$PY" -m semanticgen.benchmarks.swin_attention_gpu --out "$OUT/bench_gpu.json"
        ;;
    *)
        echo "unknown stage $stage (expected build, selftest, tests, bench)" >&2
        exit 2
        ;;
    esac
done
cat "$OUT/stages.txt"
if [ "$failed" -ne 0 ]; then
    exit 1
elif [ "$incomplete" -ne 0 ]; then
    exit 3
fi
exit 0
