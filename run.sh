#!/usr/bin/env bash
# Driver: build the data, then train and evaluate the dense network.
# Edit the variables below; every step skips work that is already done, so re-running
# this script after an interruption resumes where it stopped.
#
# Default: the built-in synthetic demo (about a minute on 2 CPU cores).
# Real CinC 2017 data on CPU: DATASET=cinc2017, SOURCE=<folder with A00001.mat ...>,
#   WIDTH=0.5 CROP=4096 EPOCHS=30 (about 40 min on 2 cores; see results/README.md).
# Full published network on a GPU: DATASET=cinc2017 WIDTH=1 CROP=0 EPOCHS=30 DEVICE=cuda.
set -euo pipefail
cd "$(dirname "$0")"

DATASET=synthetic          # synthetic | cinc2017
SYNTHETIC_RECORDS=1000     # records of the synthetic demo set
SOURCE=../shared/data/cinc2017/training2017   # CinC 2017 .mat/.hea folder (or use DOWNLOAD)
DOWNLOAD=0                 # 1: fetch training2017.zip from PhysioNet into data/raw first
SPLIT_SEED=0               # seed of the stratified train/val/test split
WIDTH=0.25                 # filter multiplier: 1 = the published 10.47 M-parameter network
CROP=2048                  # train on random windows of this many samples (0 = whole records)
EPOCHS=12
SEED=0
DEVICE=auto                # auto | cpu | cuda
RESULTS=results/${DATASET}-w${WIDTH}-crop${CROP}-e${EPOCHS}

if [ "$DATASET" = synthetic ]; then
    python build_datasets.py --synthetic "$SYNTHETIC_RECORDS" --seed "$SPLIT_SEED" --out data/synthetic
else
    extra=()
    [ "$DOWNLOAD" = 1 ] && extra+=(--download) && SOURCE=data/raw/training2017
    python build_datasets.py --source "$SOURCE" --seed "$SPLIT_SEED" --out data/cinc2017 "${extra[@]}"
fi

python train.py --data "data/$DATASET" --out "$RESULTS/dense/seed$SEED" --seed "$SEED" \
    --width "$WIDTH" --crop "$CROP" --epochs "$EPOCHS" --device "$DEVICE"
