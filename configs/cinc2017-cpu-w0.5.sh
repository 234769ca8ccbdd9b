# Width 0.5 at CPU scale: `bash run.sh configs/cinc2017-cpu-w0.5.sh` (issue 32: ratio or capacity?).
# The recipe and method definitions of configs/cinc2017-cpu.sh (6 epochs of random 2,048-sample
# windows, Adam 1e-3, LR x0.1 at 80 % and 95 %, 50 % global magnitude pruning per round to 142x,
# k = 1 epoch) on the width-0.5 network: 16 to 128 filters, all 16 blocks and 33 convolutions,
# 2,619,828 parameters (compression relative to that). weight_rewind and lr_rewind, each with
# random_reinit and random_prune at the last level (142x); seeds 0 and 1 (a third, and finetune,
# where time allows: add them to SEEDS / METHODS, a resumed grid skips what is done).
# Started 2026-12-05 once the full-width chains (configs/cinc2017-cpu-full.sh) were done, with
# two one-thread workers (one per core), as WORKERS=2 runs it; ~12 min per training on a core
# of a 2-core Intel Xeon with avx512_bf16 / amx_bf16. Seed 2 added 2026-12-05 21:15 UTC, after seeds
# 0-1 to 142x and their test figures were seen (so its figures are a replication, not a pre-registration).
DATASET=cinc2017
WIDTH=0.5
BLOCKS=16
CROP=2048
EPOCHS=6
BATCH=32
LR=0.001
MILESTONES=0.8,0.95
FRACTION=0.5
TARGET=142
REWIND_TO=1ep
METHODS=weight_rewind,lr_rewind
CONTROL_METHODS=all
CONTROL_EVERY=1000
SEEDS=0,1,2
WORKERS=2
EXP=results/cinc2017-cpu-w0.5
LATENCY_THREADS=1,2        # the exported ticket's latency table (run.sh's demo times it briefly)
LATENCY_SECONDS=2
