# late_reset (k = 1 epoch) from the dense networks of seeds 3 and 4 of the CPU-scale 50 % grid,
# to 64x: `bash run.sh configs/cinc2017-cpu-latereset34.sh`.
# Why: the instability analysis (stability.py, issue "Why tickets win or fail here") tests a
# rewind point k with masks found by IMP at k = 0 (weight_rewind); Frankle et al. 2020 test
# each k with the masks that IMP rewinding to k itself finds. These chains give the masks found
# at k = 1 epoch, from the same dense networks:
#   python stability.py --exp results/cinc2017-cpu-latereset34 --seed 3 --masks late_reset/round_04 --rewind-to 1ep
# A separate folder (not the grid's): the grid's late_reset has seeds 0-2 to 142x, and a chain
# stopped at 64x there would leave its high levels on fewer seeds.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/cinc2017-cpu.sh"
SEEDS=3,4
METHODS=late_reset
CONTROLS=""
TARGET=64
EXP=results/cinc2017-cpu-latereset34
DENSE_FROM=results/cinc2017-cpu
