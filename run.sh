#!/usr/bin/env bash
# Driver: build the data -> run the lottery-ticket comparison -> plot it -> export the winning ticket.
# Edit the variables below. Every step skips work that is already done, so re-running this
# script after an interruption (Ctrl-C, kill -9, power cut) continues where it stopped.
#
# Default: the built-in synthetic demo: every method, both controls and the dense baseline, one seed,
# 3 rounds of 75 % to 64x, 2 workers (README.md gives its measured time).
# Real CinC 2017 data: a shipped configuration (configs/cinc2017-cpu.sh, configs/cinc2017-gpu.sh)
# as the first argument, or set DATASET=cinc2017 and SOURCE (or DOWNLOAD=1) below.
set -euo pipefail
cd "$(dirname "$0")"

# --- data
DATASET=synthetic          # synthetic | cinc2017
SYNTHETIC_RECORDS=640      # records of the synthetic demo set
SOURCE=${SOURCE:-../shared/data/cinc2017/training2017}   # CinC 2017 .mat/.hea folder (or from the environment)
DOWNLOAD=${DOWNLOAD:-0}    # 1: fetch training2017.zip from PhysioNet into data/raw first (or from the environment)
SPLIT_SEED=0               # seed of the stratified train/val/test split
# --- network and dense training (train.py)
WIDTH=0.25                 # filter multiplier: 1 = the published 10.47 M-parameter network
BLOCKS=8                   # residual blocks: 16 = the published 34-layer network
CROP=512                   # train on random windows of this many samples (0 = whole records)
EPOCHS=6                   # dense schedule length T; every pruning round retrains steps [k, T)
BATCH=16
LR=0.003
MILESTONES=0.7             # fractions of T where the LR drops x0.1 (published recipe: 0.5,0.75)
DEVICE=auto                # auto | cpu | cuda
# --- pruning rounds (run_experiments.py -> train.py --retrain)
# methods in the order they run, and the baseline dense_equal_steps (the dense network retrained
# like lr_rewind's tickets: the same cumulative steps, nothing pruned)
METHODS=lr_rewind,dense_equal_steps,weight_rewind,late_reset,finetune
CONTROLS=random_reinit,random_prune
CONTROL_METHODS=weight_rewind   # whose tickets the controls test ('all' for every method)
CONTROL_EVERY=2            # run the controls at every n-th round (and the last)
SEEDS=0                    # seeds (comma-separated); one is a demo, a claim needs several
FRACTION=0.75              # share of surviving weights pruned per round (0.75: 4x, 16x, 64x)
TARGET=64                  # stop at this compression ratio
REWIND_TO=1ep              # k for late_reset / lr_rewind / finetune ('500it' or '2ep'); weight_rewind uses 0
GOAL=0                     # 1: over-pruning guard: redo a round at FRACTION/ALPHA when val F1 < dense x (1 - TOLERANCE)
ALPHA=2
TOLERANCE=0.01
MIN_FRACTION=0.01          # GOAL: stop when the fraction would fall below this
MAX_RETRIES=0              # GOAL: stop after this many redos of one round (0: no limit)
EXTRA=""                   # more train.py flags, e.g. "--eval-batch-size 256 --step-mode graph"
# --- where the grid runs
EXECUTOR=local             # local: this process walks the grid | slurm: one SLURM array job per stage
WORKERS=2                  # local: grid workers side by side, the cores shared out (a small network
                           # uses 2 cores poorly: 2 one-thread workers train ~2x as fast; 1 for a GPU)
SBATCH_OPTIONS="--time=04:00:00 --mem=16G"   # slurm: options of every job, e.g. add --partition=gpu --gres=gpu:1
SLURM_WAIT=1               # slurm: 1 = wait for the jobs, then plot; 0 = return once submitted
EXP=results/demo           # experiment folder
DENSE_FROM=""               # another experiment whose finished dense runs this one reuses (same data and dense flags)
DATA_DIR=""                # built data set folder (default data/$DATASET)
# --- the winning ticket's export (export_ticket.py)
LATENCY_THREADS=1          # thread counts of its CPU latency table (the real-data configs: 1,2)
LATENCY_SECONDS=0.5        # seconds spent timing each latency (the real-data configs: 2)

# a configuration file given as the first argument overrides the variables above, e.g.
#   bash run.sh configs/cinc2017-cpu.sh     (real data, CPU scale)
#   bash run.sh configs/cinc2017-gpu.sh     (real data, the full network on a GPU)
# and --dry-run after it prints the commands instead of running them (gpu_sitting.py reads them).
if [ $# -ge 1 ] && { [ "$1" = --help ] || [ "$1" = -h ]; }; then
    cat <<'USAGE'
usage: bash run.sh [CONFIG] [--dry-run]

Builds the data, runs the lottery-ticket grid (every method, its controls and the dense
baseline, over the seeds), plots it and exports the winning ticket. Every step skips work
already done: re-running continues where an interruption stopped it.

  CONFIG     a bash file that sets some of the variables below (configs/*.sh), e.g.
             configs/cinc2017-cpu.sh for the real data at CPU scale
  --dry-run  print the commands instead of running them

The variables and their defaults (the synthetic demo):
USAGE
    sed -n '/^# --- data$/,/^LATENCY_SECONDS=/p' "$0"
    exit 0
fi
if [ $# -ge 1 ] && [ "$1" != --dry-run ]; then
    if [ "${1#-}" != "$1" ] || [ ! -f "$1" ]; then
        echo "error: $1 is neither a configuration file nor --dry-run; usage: bash run.sh [CONFIG] [--dry-run] (see --help)" >&2
        exit 2
    fi
    # shellcheck source=/dev/null
    source "$1"
    shift
fi
DRY=0
if [ $# -ge 1 ]; then
    if [ "$1" = --dry-run ]; then DRY=1; else echo "usage: bash run.sh [CONFIG] [--dry-run]" >&2; exit 2; fi
fi
DATA_DIR=${DATA_DIR:-data/$DATASET}
step() {  # run a command, or print it (shell-quoted) under --dry-run
    if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$DATASET" = synthetic ]; then
    step python build_datasets.py --synthetic "$SYNTHETIC_RECORDS" --seed "$SPLIT_SEED" --out "$DATA_DIR"
else
    extra=()
    if [ "$DOWNLOAD" = 1 ]; then extra+=(--download); SOURCE=data/raw/training2017; fi
    step python build_datasets.py --source "$SOURCE" --seed "$SPLIT_SEED" --out "$DATA_DIR" "${extra[@]}"
fi

dense_from=()
if [ -n "$DENSE_FROM" ]; then dense_from=(--dense-from "$DENSE_FROM"); fi
goal=()
if [ "$GOAL" = 1 ]; then goal=(--goal --alpha "$ALPHA" --tolerance "$TOLERANCE" --min-fraction "$MIN_FRACTION" --max-retries "$MAX_RETRIES"); fi
read -r -a extra_flags <<< "$EXTRA"
executor=(--executor "$EXECUTOR")
if [ "$EXECUTOR" = slurm ]; then
    executor+=("--sbatch=$SBATCH_OPTIONS")
    if [ "$SLURM_WAIT" = 1 ]; then executor+=(--slurm-wait); fi
fi
grid=(run_experiments.py --exp "$EXP" --seeds "$SEEDS" --methods "$METHODS" \
    --controls "$CONTROLS" --control-methods "$CONTROL_METHODS" --control-every "$CONTROL_EVERY" "${goal[@]}" "${dense_from[@]}" \
    --data "$DATA_DIR" --width "$WIDTH" --blocks "$BLOCKS" --crop "$CROP" --epochs "$EPOCHS" --batch-size "$BATCH" \
    --lr "$LR" --milestones "$MILESTONES" --device "$DEVICE" \
    --prune-fraction "$FRACTION" --target-ratio "$TARGET" --rewind-to "$REWIND_TO" "${extra_flags[@]}" "${executor[@]}" --quiet)
if [ "$EXECUTOR" != local ] || [ "$WORKERS" -le 1 ]; then
    step python "${grid[@]}"
else
    # WORKERS processes walk the same grid; a cell another worker holds is skipped and come back
    # to (--busy skip). Extra workers log to $EXP/worker-N.log; this one shows the progress.
    threads=$(( $(nproc) / WORKERS )); if [ "$threads" -lt 1 ]; then threads=1; fi
    pids=()
    if [ "$DRY" = 0 ]; then mkdir -p "$EXP"; trap 'if [ ${#pids[@]} -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; fi' EXIT; fi
    for w in $(seq 2 "$WORKERS"); do
        if [ "$DRY" = 1 ]; then
            step env OMP_NUM_THREADS="$threads" python "${grid[@]}" --busy skip
        else
            env OMP_NUM_THREADS="$threads" python "${grid[@]}" --busy skip >> "$EXP/worker-$w.log" 2>&1 &
            pids+=($!)
        fi
    done
    step env OMP_NUM_THREADS="$threads" python "${grid[@]}" --busy skip
    for pid in "${pids[@]}"; do
        if ! wait "$pid"; then echo "error: a grid worker failed; see $EXP/worker-*.log" >&2; exit 1; fi
    done
    pids=()
fi
if [ "$EXECUTOR" = slurm ] && [ "$SLURM_WAIT" != 1 ]; then
    echo "submitted; when the jobs are done: python plot_results.py --exp $EXP"
    exit 0
fi

step python plot_results.py --exp "$EXP" --tolerance "$TOLERANCE"

# the most compressed winning ticket of the last seed (trained on this machine, so its
# checkpoint is here) as a compact file, with its size, FLOPs, latency and F1 report; then
# classify records with predict.py --ticket "$EXP/ticket/ticket-fp32.npz"
if [ "$DRY" = 1 ]; then
    step python export_ticket.py --exp "$EXP" --winner --seed "${SEEDS##*,}" --out "$EXP/ticket" --data "$DATA_DIR" \
        --threads "$LATENCY_THREADS" --latency-seconds "$LATENCY_SECONDS"
elif grep -q "^[a-z_]*,none," "$EXP/plots/winners.csv"; then
    python export_ticket.py --exp "$EXP" --winner --seed "${SEEDS##*,}" --out "$EXP/ticket" --data "$DATA_DIR" \
        --threads "$LATENCY_THREADS" --latency-seconds "$LATENCY_SECONDS"
else
    echo "no ticket within the tolerance of dense: nothing to export"
fi
