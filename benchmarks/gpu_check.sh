#!/usr/bin/env bash
# The first check of the band's GPU path on a device: environment, the cuda tests (none skipped), copies delayed
# to widen races (with two negative controls), the full build on cuda against cpu, kernel, copy and reader rates,
# weights on the device, and bench_gpu.py reduced to 32 x 16.8M. About 3 minutes on a 16-core, one-GPU machine;
# each step has a time limit, 5 minutes in all at most.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere in the checkout
#   bash benchmarks/gpu_check.sh --dry-run    # on any machine: every step on the cpu, small (checks the check)
#
# OUT (default: a new temp folder) receives check.jsonl, one JSON object per line, each with "step" and "ok", and
# log.txt, everything printed; WORK (default: a new folder under TMPDIR or /var/tmp) must be a real disk, not tmpfs,
# for the cold figures. PYTHON defaults to python. Exit status 0 when every step is ok.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python}
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); fi
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-$(mktemp -d -p "${TMPDIR:-/var/tmp}")}
mkdir -p "$OUT" "$WORK"
: >"$OUT/check.jsonl"
failed=()

run_step() {  # run_step NAME SECONDS: gpu_check.py NAME under a time limit; JSON lines to check.jsonl
    local name=$1 limit=$2
    echo "== $name (at most ${limit}s)" | tee -a "$OUT/log.txt"
    timeout "$limit" "$PYTHON" benchmarks/gpu_check.py "$name" "${DRY[@]}" --workdir "$WORK" \
        2> >(tee -a "$OUT/log.txt" >&2) | tee -a "$OUT/log.txt" | grep '^{' | tee -a "$OUT/check.jsonl" | cut -c1-300
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        failed+=("$name")
        if [ "$rc" -eq 124 ]; then
            echo "{\"step\": \"$name\", \"ok\": false, \"error\": \"over the time limit of ${limit}s\"}" | tee -a "$OUT/check.jsonl"
        fi
    fi
}

run_step env 30
run_step tests 90
run_step device 100
run_step bench 80
rm -rf "$WORK"

if [ ${#failed[@]} -eq 0 ]; then ok=true; else ok=false; fi
steps=""
if [ ${#failed[@]} -gt 0 ]; then steps=$(printf '"%s",' "${failed[@]}"); fi
echo "{\"step\": \"summary\", \"ok\": $ok, \"failed\": [${steps%,}], \"dry_run\": $([ ${#DRY[@]} -gt 0 ] && echo true || echo false), \"out\": \"$OUT\"}" | tee -a "$OUT/check.jsonl"
[ "$ok" = true ]
