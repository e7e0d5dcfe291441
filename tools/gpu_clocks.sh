#!/bin/bash
# Sample the GPU's SM clock and power (nvidia-smi, every 200 ms) while benchmark rows run one after another, each its
# own `run --budget strict8` invocation between BEGIN/END marks; then summarise with tools/gpu_clocks.py.
#   bash tools/gpu_clocks.sh <twin folder> <out dir> <row> [<row> ...]
# MAX_SECONDS (default: none): start no new row after that many seconds. Writes <out>/smi.csv, <out>/marks.txt and
# each row's benchmark JSON <out>/row_<name>.json.
set -u
TWIN=${1:?usage: bash tools/gpu_clocks.sh <twin folder> <out dir> <row> [<row> ...]}
DIR=${2:?usage: bash tools/gpu_clocks.sh <twin folder> <out dir> <row> [<row> ...]}
shift 2
[ $# -ge 1 ] || { echo "give at least one benchmark row (python -m utils.speed.benchmark list)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this samples an NVIDIA GPU" >&2; exit 2; }
mkdir -p "$DIR"
export TZ=UTC  # nvidia-smi's timestamps and the marks on one clock
T0=$(date +%s)
F=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$F --format=csv >/dev/null 2>&1 || F=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu
nvidia-smi --query-gpu=$F --format=csv -lms 200 > "$DIR/smi.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT
for r in "$@"; do
  if [ -n "${MAX_SECONDS:-}" ] && [ $(( $(date +%s) - T0 )) -gt "$MAX_SECONDS" ]; then
    echo "MAX_SECONDS=$MAX_SECONDS reached: $r and the rows after it not run" >> "$DIR/marks.txt"; break
  fi
  echo "BEGIN $r $(date -u '+%Y/%m/%d %H:%M:%S.%3N')" >> "$DIR/marks.txt"
  python -m utils.speed.benchmark run --budget strict8 --only "$r" --twin-folder "$TWIN" --out "$DIR/row_$r.json" \
    --no-figure 2>&1 | grep -a "tokens/s" >> "$DIR/marks.txt"
  echo "END $r $(date -u '+%Y/%m/%d %H:%M:%S.%3N')" >> "$DIR/marks.txt"
done
cat "$DIR/marks.txt"
