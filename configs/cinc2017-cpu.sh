# CPU scale on the real CinC 2017 data: `bash run.sh configs/cinc2017-cpu.sh`.
# A width-0.25 Hannun network (all 16 residual blocks and 33 convolutions, 16-128 filters:
# 656,604 parameters, compression relative to its own dense size), trained on random
# 2048-sample windows (10.2 s) for 6 epochs; every method pruned by 50 % per round to 142x
# (8 rounds, the last cut to land on 142x), the controls on weight_rewind at every other round.
# About 80 minutes per seed on 2 CPU cores (see results/README.md for what it took).
DATASET=cinc2017
WIDTH=0.25
BLOCKS=16
CROP=2048
EPOCHS=6
BATCH=32
LR=0.001
MILESTONES=0.5,0.75
FRACTION=0.5
TARGET=142
REWIND_TO=1ep
CONTROL_METHODS=weight_rewind
CONTROL_EVERY=2
SEEDS=0,1,2
EXP=results/cinc2017-cpu
