#!/usr/bin/env bash
# The recipe sweep behind configs/cinc2017-cpu.sh: dense trainings of the CPU-scale network
# (width 0.25, all 16 blocks) at about the same compute (6 x 2048-sample windows per record
# and epoch-equivalent: 1,284 steps of 32 x 2048 samples), varying LR, schedule and window
# length. Chosen on the VALIDATION split only. Usage:
#   bash configs/cinc2017-recipe-sweep.sh SEED [NAME ...]    (default: every recipe below)
# Each run goes to results/cinc2017-recipe/<name>/seed<SEED>/dense; a finished one is skipped.
# It ends by writing results/cinc2017-recipe/sweep.md: validation F1 per recipe and seed, and
# the final train/val loss (is it converged?). Test F1 is not shown: it chooses nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}
shift || true
declare -A RECIPES=(
    [lr1e-3_m.5,.75_w2048_e6]="--lr 0.001 --milestones 0.5,0.75 --crop 2048 --epochs 6"
    [lr1e-3_m.8,.95_w2048_e6]="--lr 0.001 --milestones 0.8,0.95 --crop 2048 --epochs 6"
    [lr3e-3_m.5,.75_w2048_e6]="--lr 0.003 --milestones 0.5,0.75 --crop 2048 --epochs 6"
    [lr3e-3_m.8,.95_w2048_e6]="--lr 0.003 --milestones 0.8,0.95 --crop 2048 --epochs 6"
    [lr5e-3_m.8,.95_w2048_e6]="--lr 0.005 --milestones 0.8,0.95 --crop 2048 --epochs 6"
    [lr3e-3_m.8,.95_w4096_e3]="--lr 0.003 --milestones 0.8,0.95 --crop 4096 --epochs 3"
    [lr3e-3_m.8,.95_w1024_e12]="--lr 0.003 --milestones 0.8,0.95 --crop 1024 --epochs 12"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || mapfile -t names < <(printf '%s\n' "${!RECIPES[@]}" | sort)
for name in "${names[@]}"; do
    [ -n "${RECIPES[$name]:-}" ] || { echo "error: no recipe named $name (see this script)" >&2; exit 2; }
    # shellcheck disable=SC2086
    python train.py --data data/cinc2017 --out "results/cinc2017-recipe/$name/seed$SEED" --seed "$SEED" \
        --width 0.25 --blocks 16 --batch-size 32 --quiet ${RECIPES[$name]}
done
python - <<'PY'
import json
from pathlib import Path

import pandas as pd

rows = []
for m in sorted(Path("results/cinc2017-recipe").glob("*/seed*/dense/metrics.json")):
    run, metrics = m.parents[2].name, json.loads(m.read_text())
    hist = pd.read_csv(m.parent / "history.csv")
    rows.append({"recipe": run, "seed": int(m.parents[1].name[4:]), "steps": metrics["steps"],
                 "val challenge F1": metrics["val"]["challenge_f1"], "val F1 A": metrics["val"]["f1_A"],
                 "val accuracy": metrics["val"]["accuracy"], "last train loss": hist["train_loss"].iloc[-1],
                 "last val loss": hist["val_loss"].iloc[-1],
                 "best epoch (val F1)": int(hist["val_challenge_f1"].idxmax()) + 1, "epochs": len(hist),
                 "train s": round(metrics["train_seconds"])})
table = pd.DataFrame(rows)


def markdown(t: pd.DataFrame) -> str:
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in t.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(t.columns) + " |", "|" + " --- |" * len(t.columns),
                      *("| " + " | ".join(r) + " |" for r in cells)])


mean = table.groupby("recipe")["val challenge F1"].agg(["mean", "count"]).sort_values("mean", ascending=False)
text = ("Recipe sweep (configs/cinc2017-recipe-sweep.sh), validation split only.\n\n"
        + markdown(table) + "\n\nMean validation challenge F1 per recipe:\n\n" + markdown(mean.reset_index())
        + "\n")
Path("results/cinc2017-recipe/sweep.md").write_text(text)
print(text)
PY
