# Seeds 3 and 4 of the CPU-scale 50 % grid (results/cinc2017-cpu), weight_rewind and
# lr_rewind only: `bash run.sh configs/cinc2017-cpu-seeds34.sh`.
# Why: the dense weights of seeds 0-2 stayed on the machine that trained them (checkpoints
# are not in git, and a retraining on another CPU is another run: README, run_state.py), so
# the variants of the issue "Why tickets win or fail here" (one-shot pruning, where to cut,
# stability), which must start from the very dense networks the grid's iterative tickets
# came from, branch from these two new seeds. They also add two seeds to the grid's two main
# methods. Between sessions: `python run_state.py save --dense results/cinc2017-cpu`.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/cinc2017-cpu.sh"
SEEDS=3,4
METHODS=weight_rewind,lr_rewind
CONTROLS=""
