#!/usr/bin/env bash
# The series on a GPU (issues #17 and #18): every run started at once, detached, on one GPU machine.
#
#   bash tools/gpu_campaign/series.sh launch [JOB...]  # start the runs (default all), each in its own session
#   bash tools/gpu_campaign/series.sh status      # one line per run: running / exit code, last log line
#   bash tools/gpu_campaign/series.sh publish     # copy each finished run to results/<run>/ and figures/<run>/
#
# Runs (logs in $CAMPAIGN_DIR, default /tmp/campaign):
#   gpu-early    notebooks 01-03 of the `gpu` profile          \ together: the `gpu` run (fast path auto, seed 42)
#   gpu          notebooks 04-05 of the `gpu` profile          /
#   gpu-tuned    notebooks 04-05, the recipe chosen on validation (results/04_recipe_sweep_gpu.json)
#   gpu-off-s42, gpu-auto-s43, gpu-off-s43
#                notebooks 04-05 of `gpu` with fast_path off/auto and seeds 42/43 (05 without the baselines, which
#                do not depend on the adapter): the fast path against PEFT's own forward, within seed noise?
#   gpu-05, gpu-auto-s43-05, gpu-off-s42-05, gpu-off-s43-05
#                notebook 05 alone for that run, whose notebook 04 finished in an earlier session
#                (runs/<run>/ with its 04_adapter carried to this machine)
#   turing       tools/turing_path.py: a compute-7.5 card emulated, fast path on / off / PyTorch kernels
#   turing-off   its two fast-path-off runs alone (the summary keeps the earlier runs of results/gpu/)
#   thesis-twin  notebooks 02-03 and 04-05 (together) on the random-weight Llama-3.2-3B twin under an 8 GB card's
#                allocator cap (thesis-twin-late: notebooks 04-05 only)
#
# The runs share the GPU (the embedded model needs under 1 GiB each, the capped twin 8 GiB) and the machine's
# CPU cores, so each notebook's wall time is measured under that load: the published PROVENANCE.json says so.
# Environment: PYTHONPATH must reach the wheels the GPU machine lacks (bitsandbytes, TRL, datasets, papermill...).
set -u
DIR=${CAMPAIGN_DIR:-/tmp/campaign}
mkdir -p "$DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 QLORA_CONCURRENT_RUNS=${QLORA_CONCURRENT_RUNS:-8}
PY=${PYTHON:-python3}

start() {  # start NAME COMMAND...: detached, log and exit code in $DIR
    local name=$1; shift
    setsid nohup bash -c 'd=$0 n=$1; shift; "$@" > "$d/$n.log" 2>&1; echo $? > "$d/$n.rc"' "$DIR" "$name" "$@" \
        < /dev/null > /dev/null 2>&1 &
    echo "$name started: $*"
}

launch_one() {  # launch_one JOB: one job of the list above
    case $1 in
    gpu-early)    start gpu-early $PY -m utils.runner --profile gpu --only 01 02 03 ;;
    gpu)          start gpu $PY -m utils.runner --profile gpu --only 04 05 ;;
    gpu-tuned)    start gpu-tuned $PY -m utils.runner --profile gpu-tuned --only 04 05 ;;
    gpu-off-s42)  start gpu-off-s42 $PY -m utils.runner --profile gpu --only 04 05 --run-name gpu-off-s42 \
                      --set 04.fast_path=off --set 05.baselines=[] --set 05.export_gguf=false ;;
    gpu-auto-s43) start gpu-auto-s43 $PY -m utils.runner --profile gpu --only 04 05 --run-name gpu-auto-s43 \
                      --set 04.seed=43 --set 05.baselines=[] --set 05.export_gguf=false ;;
    gpu-off-s43)  start gpu-off-s43 $PY -m utils.runner --profile gpu --only 04 05 --run-name gpu-off-s43 \
                      --set 04.fast_path=off --set 04.seed=43 --set 05.baselines=[] --set 05.export_gguf=false ;;
    # notebook 05 alone, on a run whose notebook 04 finished in an earlier session (its runs/<run>/ carried back)
    gpu-05)       start gpu-05 $PY -m utils.runner --profile gpu --only 05 ;;
    gpu-auto-s43-05) start gpu-auto-s43-05 $PY -m utils.runner --profile gpu --only 05 --run-name gpu-auto-s43 \
                      --set 04.seed=43 --set 05.baselines=[] --set 05.export_gguf=false ;;
    gpu-off-s42-05) start gpu-off-s42-05 $PY -m utils.runner --profile gpu --only 05 --run-name gpu-off-s42 \
                      --set 04.fast_path=off --set 05.baselines=[] --set 05.export_gguf=false ;;
    gpu-off-s43-05) start gpu-off-s43-05 $PY -m utils.runner --profile gpu --only 05 --run-name gpu-off-s43 \
                      --set 04.fast_path=off --set 04.seed=43 --set 05.baselines=[] --set 05.export_gguf=false ;;
    turing)       start turing $PY tools/turing_path.py ;;
    turing-off)   start turing-off $PY tools/turing_path.py --only off_s42,off_s43 ;;
    # the twin's random weights are written once (150 s, 6.4 GB) before its two halves start together
    thesis-twin)  start thesis-twin bash -c "$PY -c 'from utils.modeling import materialize_twin; materialize_twin()' \
                      && { $PY -m utils.runner --profile thesis-twin --only 02 03 & p=\$!; \
                      $PY -m utils.runner --profile thesis-twin --only 04 05; s=\$?; wait \$p && exit \$s; }" ;;
    thesis-twin-late) start thesis-twin-late bash -c "$PY -c 'from utils.modeling import materialize_twin; \
                      materialize_twin()' && $PY -m utils.runner --profile thesis-twin --only 04 05" ;;
    *) echo "unknown job $1; the jobs: $ALL_JOBS thesis-twin-late turing-off, and RUN-05 (notebook 05" \
            "alone) for gpu, gpu-auto-s43, gpu-off-s42, gpu-off-s43" >&2; return 2 ;;
    esac
}
ALL_JOBS="gpu-early gpu gpu-tuned gpu-off-s42 gpu-auto-s43 gpu-off-s43 turing thesis-twin"

case ${1:-} in
launch)  # launch [JOB...]: the named jobs (default all of ALL_JOBS)
    shift
    for job in ${@:-$ALL_JOBS}; do launch_one "$job" || exit 2; done
    ;;
status)
    for log in "$DIR"/*.log; do
        name=$(basename "$log" .log)
        rc=$(cat "$DIR/$name.rc" 2>/dev/null || echo running)
        echo "$name [$rc] $(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -1 | cut -c1-160)"
    done
    ;;
publish)
    $PY - <<'EOF'
from utils.paths import run_dir
from utils.publishing import publish_run

for profile, run in [("gpu", "gpu"), ("gpu-tuned", "gpu-tuned"), ("gpu", "gpu-off-s42"), ("gpu", "gpu-auto-s43"),
                     ("gpu", "gpu-off-s43"), ("thesis-twin", "thesis-twin")]:  # a publication adds to the earlier one
    if not any(run_dir(run).glob("[0-9][0-9]_run.json")):
        print(f"{run}: no notebook finished, nothing published")
        continue
    try:
        print(run, "->", ", ".join(str(p) for p in publish_run(profile, run)))
    except Exception as exc:  # noqa: BLE001 - report every run, publish the others
        print(f"{run}: not published: {exc}")
EOF
    ;;
*)
    echo "usage: $0 launch|status|publish" >&2
    exit 2
    ;;
esac
