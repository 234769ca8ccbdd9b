# The Frankle & Carbin / Renda et al. default rate at CPU scale: 20 % per round to 142x (23
# rounds) for weight rewinding, the method LTH-ECG uses, with the network, recipe and seeds of
# configs/cinc2017-cpu.sh. `bash run.sh configs/cinc2017-cpu-20pct.sh`
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/cinc2017-cpu.sh"
METHODS=weight_rewind
CONTROL_METHODS=weight_rewind
FRACTION=0.2
EXP=results/cinc2017-cpu-20pct
DENSE_FROM=results/cinc2017-cpu   # the same dense networks as the 50 % grid: linked, not retrained
