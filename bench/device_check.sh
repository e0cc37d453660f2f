#!/usr/bin/env bash
# One command for a GPU machine without network: what the CUDA path needs checked and measured.
#
#   bash bench/device_check.sh                  # from the repository root (or: make device-check)
#   DEVICE=cpu bash bench/device_check.sh       # a dry run on a machine without a GPU
#
# Steps, each time-boxed (timeout), each run even if an earlier one failed:
#   machine   nvidia-smi, python, torch and its CUDA build, torch.cuda.is_available(), CPU/RAM/disk
#   packages  every pin of requirements-test.txt installed? (says which are missing: no network here)
#   tests     the project's tests that need CUDA: pytest -k cuda (they skip without a device)
#   prepare   builds the benchmark models once (bench/startup.py's prepare + bench/loader.py's)
#   loader    bench/loader.py --devices $DEVICE: our loader vs its peers, hot and cold, the ceilings
#             (O_DIRECT grid; on CUDA pinned H2D, page cache -> pinned -> device, pinning cost) and,
#             on CUDA, the second load of a pack in one process
#   startup   bench/startup.py: fal run --local to /health 200 and the first image, vs the stock
#             recipes (the app picks cuda itself: fal.toml device = "auto")
#   volume-loader, volume-startup
#             the two benches again on a real JuiceFS volume (bench/volume.py), node and object
#             tiers, where the machine can mount one (root, /dev/fuse, juicefs, nginx-extras);
#             otherwise the reason is printed and they are not run
# Then $OUT/device_check.json (every step's exit code, time, output paths and results) and
# $OUT/SUMMARY.md (the same as tables; also printed). Exits non-zero if any step failed.
#
# Environment (all optional):
#   DEVICE=cuda|cpu      default cuda
#   OUT=DIR              default bench/out/device_check (its loader/, startup/, logs/ are replaced)
#   SIZE=sdxl|small|tiny the startup bench's model; default sdxl on cuda (6.9 GB), tiny on cpu
#   PYTHON=...           default .venv/bin/python if present, else python3
#   ROUNDS=1             startup bench rounds;  STARTUP_PEERS=ours,stock,flashpack,imports-only (not
#                        ours-odirect: MODEL_LOADER_MAP only changes CPU loads)
#   LOADER_RUNS          default 2 on cuda, 1 on cpu;  LOADER_SIZE_GB default 1.72 GB (SD1.5 UNet) on
#                        cuda, 0.05 on cpu;  LOADER_PEERS default: bench/loader.py's local-disk peers
#                        (not the volume bench's additions: safetensors-pread, fastsafetensors,
#                        runai-streamer, ours-staged, which would not fit the step's time)
#   BUDGET_S             default 540 (cuda) / 480 (cpu): the whole run stays under it (under 9 min);
#                        a step gets at most its own limit and what is left of the budget less
#                        RESERVE_S (default 20, for the summary); a step with under 3 s left is skipped
#
# The GPU machine has no network, so carry the wheels. On a networked Linux x86_64 machine with
# the same Python (3.11):
#     pip download -d wheels -r requirements-test.txt
# (PyPI's Linux torch wheel is the CUDA build; it pulls the nvidia-* wheels it needs. From another
# platform add: --platform manylinux_2_28_x86_64 --python-version 3.11 --only-binary=:all:)
# Copy wheels/ and the repository over, then on the GPU machine:
#     python3.11 -m venv .venv
#     .venv/bin/pip install --no-index --find-links wheels/ -r requirements-test.txt
#     bash bench/device_check.sh
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
DEVICE=${DEVICE:-cuda}
case "$DEVICE" in cuda|cpu) ;; *) echo "device_check: DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
OUT=${OUT:-bench/out/device_check}
if [ "$DEVICE" = cuda ]; then
    SIZE=${SIZE:-sdxl}; LOADER_RUNS=${LOADER_RUNS:-2}; LOADER_SIZE_GB=${LOADER_SIZE_GB:-}; BUDGET_S=${BUDGET_S:-540}
else
    SIZE=${SIZE:-tiny}; LOADER_RUNS=${LOADER_RUNS:-1}; LOADER_SIZE_GB=${LOADER_SIZE_GB:-0.05}; BUDGET_S=${BUDGET_S:-480}
fi
ROUNDS=${ROUNDS:-1}
STARTUP_PEERS=${STARTUP_PEERS:-ours,stock,flashpack,imports-only}
LOADER_PEERS=${LOADER_PEERS:-ours,flashpack,flashpack-parallel,safetensors,read-ceiling,ours-model,diffusers,diffusers-flashpack}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/logs" "$OUT/loader" "$OUT/startup" "$OUT/volume-loader" "$OUT/volume-startup"
rm -f "$OUT/steps.tsv" "$OUT/tests-junit.xml" "$OUT/machine.json" "$OUT/packages.json" "$OUT/device_check.json" "$OUT/SUMMARY.md"
mkdir -p "$OUT/logs" "$OUT/loader" "$OUT/startup"

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

now() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "$EPOCHREALTIME"; else date +%s.%N; fi; }
START=$(now)
RESERVE_S=${RESERVE_S:-20}  # kept for the summary (its time limit)
elapsed() { awk -v a="$START" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }

echo "device_check: DEVICE=$DEVICE SIZE=$SIZE OUT=$OUT PYTHON=$PYTHON budget ${BUDGET_S}s"

# step NAME LIMIT_S COMMAND...: run it under timeout, log to $OUT/logs/NAME.log, record a line in steps.tsv.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - RESERVE_S - $(elapsed)))
    [ "$left" -lt "$limit" ] && limit=$left
    local log="$OUT/logs/$name.log" t0 rc secs
    if [ "$limit" -lt 3 ]; then
        echo "skipped: no time left in the ${BUDGET_S}s budget" >"$log"
        printf '%s\t%d\t%.1f\t%d\t%s\n' "$name" -1 0 0 "$*" >>"$OUT/steps.tsv"
        echo "== $name: SKIPPED (no time left)"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    t0=$(now)
    timeout -k 10 "$limit" "$@" >"$log" 2>&1 </dev/null
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%d\t%s\t%d\t%s\n' "$name" "$rc" "$secs" "$limit" "$*" >>"$OUT/steps.tsv"
    case $rc in
        0) echo "   ok in ${secs}s" ;;
        124|137) echo "   TIMED OUT after ${secs}s; last lines of $log:"; tail -n 15 "$log" | sed 's/^/   | /' ;;
        *) echo "   FAILED (exit $rc) in ${secs}s; last lines of $log:"; tail -n 15 "$log" | sed 's/^/   | /' ;;
    esac
}

step machine 60 "$PYTHON" bench/device_check.py machine --device "$DEVICE" --out "$OUT/machine.json"
sed 's/^/   | /' "$OUT/logs/machine.log" | tail -n 30
step packages 30 "$PYTHON" bench/device_check.py packages --out "$OUT/packages.json"
grep -E '^(MISSING|version differs)' "$OUT/logs/packages.log" | sed 's/^/   | /'
step tests 120 "$PYTHON" -m pytest -q -rs -k cuda tests/ --junitxml="$OUT/tests-junit.xml"

prepare=("$PYTHON" bench/device_check.py prepare --size "$SIZE")
[ -n "$LOADER_SIZE_GB" ] && prepare+=(--loader-size-gb "$LOADER_SIZE_GB")
step prepare 180 "${prepare[@]}"

loader=("$PYTHON" bench/loader.py --devices "$DEVICE" --runs "$LOADER_RUNS" --results-dir "$OUT/loader" --timeout 120)
[ -n "$LOADER_SIZE_GB" ] && loader+=(--size-gb "$LOADER_SIZE_GB")
[ -n "$LOADER_PEERS" ] && loader+=(--peers "$LOADER_PEERS")
step loader 180 "${loader[@]}"

step startup 180 "$PYTHON" bench/startup.py --size "$SIZE" --rounds "$ROUNDS" --peers "$STARTUP_PEERS" \
    --results "$OUT/startup" --timeout 120

# The same on a real JuiceFS volume (bench/volume.py), as fal's /data: node and object tiers, where
# the machine can mount one (root, /dev/fuse, juicefs, nginx-extras); otherwise the reason is printed.
if volume_reason=$("$PYTHON" bench/volume.py check 2>&1); then
    step volume-loader 150 "$PYTHON" bench/loader.py --volume juicefs --tiers node,object --devices "$DEVICE" \
        --runs 1 --peers "${VOLUME_LOADER_PEERS:-ours,ours-staged,safetensors,safetensors-pread}" \
        --results-dir "$OUT/volume-loader" --timeout 120 ${LOADER_SIZE_GB:+--size-gb "$LOADER_SIZE_GB"}
    step volume-startup 200 "$PYTHON" bench/startup.py --volume juicefs --tiers node,object --size "$SIZE" \
        --rounds 1 --peers "${VOLUME_STARTUP_PEERS:-ours,stock,fal-preread}" --results "$OUT/volume-startup" --timeout 150
else
    echo "== volume steps: not run: $volume_reason"
fi

echo "== summary (after $(elapsed)s)"
timeout -k 5 "$((RESERVE_S > 5 ? RESERVE_S : 5))" "$PYTHON" bench/device_check.py summarize --out "$OUT" --device "$DEVICE" --size "$SIZE"
rc=$?
# The summary also checks each step's output; a step's own non-zero exit fails the check even if it could not.
failed=$(awk -F'\t' '$2 != 0 { printf "%s ", $1 }' "$OUT/steps.tsv")
if [ $rc -eq 0 ] && [ -z "$failed" ]; then
    echo "device_check: all steps passed in $(elapsed)s; summary: $OUT/SUMMARY.md"
    exit 0
fi
echo "device_check: FAILED (${failed:-see the summary}; summary exit $rc) in $(elapsed)s; summary: $OUT/SUMMARY.md"
exit 1
