# One-shot against iterative pruning (issue "Why tickets win or fail here"): the network,
# recipe, seeds and dense networks of configs/cinc2017-cpu.sh, pruned to LEVEL x in a single
# round, then retrained once like one round of the 50 % grid (the same final budget per
# level: lr_rewind T - k steps from the dense weights, weight_rewind T steps from the initial
# weights). One experiment folder per level:
#   for L in 4 16 64 142; do LEVEL=$L bash run.sh configs/cinc2017-cpu-oneshot.sh; done
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/cinc2017-cpu.sh"
LEVEL=${LEVEL:-16}
METHODS=lr_rewind,weight_rewind
CONTROLS=""
FRACTION=$(python -c "print(1 - 1 / float('$LEVEL'))")
TARGET=$LEVEL
EXTRA="--rounds 1"
SEEDS=3,4   # branch from seeds 3-4 of the grid (configs/cinc2017-cpu-seeds34.sh): their dense weights exist
EXP=results/cinc2017-cpu-oneshot-${LEVEL}x
DENSE_FROM=results/cinc2017-cpu
