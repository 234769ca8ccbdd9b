# CPU scale on the real CinC 2017 data: `bash run.sh configs/cinc2017-cpu.sh`.
# A width-0.25 Hannun network (all 16 residual blocks and 33 convolutions, 8-64 filters:
# 656,604 parameters, compression relative to its own dense size) on random training windows,
# with the recipe chosen on the validation split by configs/cinc2017-recipe-sweep.sh (same
# compute as before: 1,284 steps of 32 x 2048 samples; results/cinc2017-recipe/sweep.md, re-run in
# fp32 after the bf16 kernel bug of results/README.md).
# Every method pruned by 50 % per round to 142x (8 rounds, the last cut to land on 142x),
# methods in the order they run (each followed by its controls, at the last round), with the
# budget-matched dense baseline right after lr_rewind. Method budgets: README "Retraining".
DATASET=cinc2017
WIDTH=0.25
BLOCKS=16
CROP=2048
EPOCHS=6
BATCH=32
LR=0.001
MILESTONES=0.8,0.95
FRACTION=0.5
TARGET=142
REWIND_TO=1ep
METHODS=lr_rewind,dense_equal_steps,weight_rewind,late_reset,finetune
CONTROL_METHODS=all
CONTROL_EVERY=1000
SEEDS=0,1,2
WORKERS=2                  # two one-thread workers: ~1.3x the throughput of one two-thread process here
EXP=results/cinc2017-cpu
LATENCY_THREADS=1,2        # the exported ticket's latency table (run.sh's demo times it briefly)
LATENCY_SECONDS=2
