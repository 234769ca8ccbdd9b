# Where pruning cuts (issue "Why tickets win or fail here"): weight_rewind at 50 % per round
# to 142x as in configs/cinc2017-cpu.sh (same network, recipe, seeds and dense networks), with
# another allocation of each round's cut across layers, SCOPE one of
#   layerwise  50 % of every layer
#   fanin      one global threshold on |w| sqrt(fan-in) (magnitude relative to the He init)
#   erk        each layer keeps survivors in proportion to the sum of its weight's dimensions
#              (Erdos-Renyi-Kernel, Evci et al. 2020), cut by magnitude within the layer
#   headhalf   global magnitude, the output layer at half rate (25 % per round, Frankle & Carbin;
#              also in the last, smaller cut that lands on 142x)
# against global magnitude pruning, the 50 % grid's weight_rewind itself. weight_rewind, not
# lr_rewind: its seeds agree far more in that grid (test F1 sd 0.006-0.032 up to 64x against
# lr_rewind's 0.020-0.097), so two seeds can separate allocations that lr_rewind's seed noise
# would hide, and it is the method LTH-ECG uses:
#   for S in layerwise fanin erk headhalf; do SCOPE=$S bash run.sh configs/cinc2017-cpu-scope.sh; done
# and lr_rewind under an allocation (same folder, its own method folders):
#   SCOPE=erk SCOPE_METHODS=weight_rewind,lr_rewind bash run.sh configs/cinc2017-cpu-scope.sh
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/cinc2017-cpu.sh"
SCOPE=${SCOPE:-fanin}
case "$SCOPE" in
    layerwise|fanin|erk) EXTRA="--prune-scope $SCOPE" ;;
    headhalf) EXTRA="--layer-fraction head=0.25" ;;
    *) echo "SCOPE must be layerwise, fanin, erk or headhalf, got '$SCOPE'" >&2; exit 2 ;;
esac
METHODS=${SCOPE_METHODS:-weight_rewind}   # SCOPE_METHODS=weight_rewind,lr_rewind adds lr_rewind, same allocation
CONTROLS=""
SEEDS=3,4   # branch from seeds 3-4 of the grid (configs/cinc2017-cpu-seeds34.sh): their dense weights exist
EXP=results/cinc2017-cpu-scope-$SCOPE
DENSE_FROM=results/cinc2017-cpu
