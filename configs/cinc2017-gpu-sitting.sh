# Full width on one lent GPU, one seed per 10-minute command (gpu_sitting.py;
# docs/gpu-sitting.md): the SAME configuration as the CPU run configs/cinc2017-cpu-full.sh (width 1, 16
# blocks, 12 epochs of random 2,048-sample windows, 50 % per round to 142x, the same methods,
# controls and order) in the same experiment folder, for the next seeds (1, 2, ...): what a
# sitting brings back adds seeds to the CPU run's tables instead of starting a second experiment.
# Only the device, the evaluation batch and the worker count differ (bf16 autocast on CUDA, as
# on the CPU, with every conv checked against fp32 first).
# Time model: per seed 12 + 8 x 12 + 3 x 8 x 11 + 4 x 12 + 8 x 11 = 508 epochs of 6,819 windows
# of 2,048 samples (3.33 GFLOP of training each, benchmarks/README.md "GPU sitting"): 11.6 PFLOP,
# plus ~1.8 of evaluation (45 trainings x 13 validation passes): a seed fits its ~7 minutes at
# >= ~32 TFLOP/s sustained (computed, not measured); one cut short comes back partial.
# shellcheck source=configs/cinc2017-cpu-full.sh
source configs/cinc2017-cpu-full.sh
SEEDS=1,2,3,4
DEVICE=cuda
EXTRA="--eval-batch-size 256"
WORKERS=1
