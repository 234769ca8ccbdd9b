# LTH-ECG's own schedule at CPU scale: `bash run.sh configs/cinc2017-cpu-lthecg.sh`.
# The network, recipe and seeds of configs/cinc2017-cpu.sh (read first, then overridden), but
# the schedule Sahu et al. 2022 describe: weight rewinding to the initial weights, an initial
# pruning rate of 30 % and a rate divided by alpha = 1.1 when a round over-prunes (its
# validation challenge F1 more than 1 % below dense), up to 142x. What is and is not stated
# in the paper, and the values chosen where it is silent: results/README.md ("LTH-ECG's
# algorithm"). Compare with the fixed 50 % (configs/cinc2017-cpu.sh) and 20 %
# (configs/cinc2017-cpu-20pct.sh) schedules of the same method.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/cinc2017-cpu.sh"
METHODS=weight_rewind
CONTROL_METHODS=weight_rewind
FRACTION=0.3
GOAL=1
ALPHA=1.1
TOLERANCE=0.01
MIN_FRACTION=0.1
EXP=results/cinc2017-cpu-lthecg
DENSE_FROM=results/cinc2017-cpu   # the same dense networks as the 50 % grid: linked, not retrained
