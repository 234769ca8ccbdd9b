# Full scale on the real CinC 2017 data, on a GPU: `bash run.sh configs/cinc2017-gpu.sh`.
# The published 10.47 M-parameter network on whole records with the reference recipe's
# optimiser (Adam 1e-3, batch 32, clip 1) on a fixed, replayable schedule of 30 epochs;
# 20 % per round to 142x (23 rounds), the Frankle/Renda default. Resumable across sittings:
# re-run the same command. Not yet run (no GPU so far).
DATASET=cinc2017
WIDTH=1
BLOCKS=16
CROP=0
EPOCHS=30
BATCH=32
LR=0.001
MILESTONES=0.5,0.75
FRACTION=0.2
TARGET=142
REWIND_TO=1ep
CONTROL_METHODS=all
CONTROL_EVERY=2
SEEDS=0,1,2
DEVICE=cuda
WORKERS=1
EXP=results/cinc2017-gpu
LATENCY_THREADS=1,2        # the exported ticket's latency table (run.sh's demo times it briefly)
LATENCY_SECONDS=2
