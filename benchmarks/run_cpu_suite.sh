#!/usr/bin/env bash
# The full CPU benchmark run (2 gloo ranks, fp32, the three *-small presets), in one go:
#   1. ours (filled, padded, recompute="experts", torch.compile), both floors, DeepSpeed's MoE and
#      AutoEP at capacity factor 1.25, with every runtime's memory
#   2. the same with skewed routing (Zipf, alpha 1.0), without our two variants
#   3. the capacity-factor sweep 1.0 / 1.25 / 2.0 (no phase breakdown, no memory)
#   4. the plots
# Results go to $OUT (default benchmarks/results/); docs/benchmarks.md says what each file holds.
# Run it on a quiet machine: 5 min 59 s on 2 quiet cores; 34 min 34 s on the same 2 cores under a
# load average of 10-17 (docs/benchmarks.md).
#
#   benchmarks/run_cpu_suite.sh                      # the real run
#   OUT=/tmp/smoke benchmarks/run_cpu_suite.sh --tokens 128 --repeat 2 --warmup 1   # a smoke test
#
# Arguments are appended to every `layer` command (later flags win in argparse).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results}
PRESETS=(mixtral-small fine-grained-small switch-small)
COMMON=(--preset "${PRESETS[@]}" --ranks 2 --warmup 3 --repeat 15 --out "$OUT")
STEPS=4
START=$SECONDS
echo "CPU suite: 15 runs in $STEPS steps, about 6 minutes on 2 quiet cores; results in $OUT"

step() {  # step <n> <what> <command...>: run it, saying where the suite is and how long it has run
    local n=$1 what=$2
    shift 2
    printf '\n=== [%d/%d] %s (%dm%02ds in) ===\n%s\n' "$n" "$STEPS" "$what" $(((SECONDS - START) / 60)) \
        $(((SECONDS - START) % 60)) "$*"
    "$@"
}

step 1 "three presets, capacity factor 1.25, DeepSpeed MoE + AutoEP, recompute + compiled variants" \
    python -m benchmarks layer "${COMMON[@]}" --capacity-factor 1.25 --variants "$@"
step 2 "skewed routing (Zipf, alpha 1.0), capacity factor 1.25" \
    python -m benchmarks layer "${COMMON[@]}" --capacity-factor 1.25 --skew 1.0 "$@"
step 3 "capacity-factor sweep 1.0 / 1.25 / 2.0" \
    python -m benchmarks layer "${COMMON[@]}" --capacity-factor 1.0 1.25 2.0 --no-phases --no-memory "$@"
step 4 "plots" python -m benchmarks plot --out "$OUT"
printf '\nCPU suite done in %dm%02ds; results in %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$OUT"
