"""Speed of the pipeline on this machine, every figure measured side by side in one run.

    python benchmarks/run_benchmarks.py                 # about 5 minutes on 2 CPU cores
    python benchmarks/run_benchmarks.py --quick         # a smoke run (seconds per row)
    python benchmarks/run_benchmarks.py --only compile  # re-measure some sections, keep the rest
    python benchmarks/run_benchmarks.py --only fullwidth --seconds 5  # the full network's step (~5 min)

Sections (each row: median of repeated timings after warm-up, so one noisy run moves it
little; ratios are only ever taken between rows of the same run):

  peak        the machine's own matmul throughput (fp32 and bf16, 2048^3), the ceiling
              against which the training GFLOP/s are read
  train       records/s and achieved GFLOP/s of one training step (forward, loss,
              backward, clipping, Adam) of the full and reduced Hannun networks, fp32 vs
              bf16 autocast. FLOPs are counted from the layers (2 per multiply-add of every
              conv and the linear layer, x3 for forward + backward)
  masked      the same step with pruning masks: dense (no masks), this project's masks
              (gradient hooks + one fused _foreach_mul_ after the step), and
              torch.nn.utils.prune (what a user would reach for)
  eval        whole-record evaluation throughput, the time to load the data set, and the
              padding that length buckets save
  inference   latency per 30-s record of a 142x magnitude-pruned network at batch 1:
              dense kernels, dead inner channels removed, and CSR sparse kernels
  fullwidth   (not in the default run: `--only fullwidth`) the full network's (width 1, 16
              blocks) masked training step as train.py runs it, side by side: fp32 against
              bf16 (where the CPU has native bf16), four batch shapes, one 2-thread process
              against two 1-thread workers started together, and kernel/layout variants
              (Keras "same" padding inside the conv, channels-last convs, cheaper dropout
              masks); each row with rec/s, GFLOP/s and its share of the matmul peak measured
              in the same section, and the CPU flags. Also writes the table to
              OUT/fullwidth.md and a short profile of the fp32 and bf16 step (top ops by self
              CPU time, model.py and the combined variant) to OUT/fullwidth-profile.txt
  compile     the CPU-scale lottery step (w0.25, masks on, as in every pruning round)
              eager vs torch.compile of the model (default inductor; optimizer and mask
              step eager), fp32 and bf16, with the time the first (compiling) call takes
  gpu         (CUDA only; not in the default run) the full network's masked training
              step at the GPU sitting's batch shape: fp32 eager, bf16 eager and bf16 as a
              captured CUDA graph (train.GraphedStep), each with TFLOP/s and its share of
              the bf16 matmul peak measured in the same run (MFU); and K tickets trained
              together (train_together.py) against one by one. gpu_sitting.py runs it.

Writes benchmarks/results.md (the table) and benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import batching  # noqa: E402
import export_ticket as et  # noqa: E402
import prune as pm  # noqa: E402
import run_folders as rf  # noqa: E402
import train as tr  # noqa: E402
from build_datasets import load_dataset  # noqa: E402
from model import HannunConfig, HannunNet, ResidualBlock, SameConv1d, bf16_faulty_convs, guard_bf16  # noqa: E402


def matmul_peak(dtype: torch.dtype, seconds: float, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / et.median_seconds(lambda: a @ b, seconds) / 1e9


def forward_flops(model: HannunNet, length: int) -> int:
    model_was = model.training
    model.eval()
    dense, _ = et.flops_per_record(model, torch.zeros(1, 1, length))
    model.train(model_was)
    return dense


def train_step_fn(model: HannunNet, batch: int, length: int, bf16: bool,
                  after: Callable[[], None] | None = None, fused_adam: bool = False) -> Callable[[], None]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, length)
    y = torch.randint(0, 4, (batch,))
    steps = torch.full((batch,), length // model.cfg.stride)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None)
    if bf16:  # the layers PyTorch's bf16 conv gets wrong run in fp32, as in training
        guard_bf16(model, bf16_faulty_convs(model, x[:2]))
    model.train()

    def step() -> None:
        tr.train_step(model, opt, x, y, steps, 1.0, bf16)
        if after is not None:
            after()
    return step


def pruned_masks(model: HannunNet, ratio: float) -> pm.Masks:
    masks = pm.full_masks(model)
    while not pm.reached(masks, ratio):
        masks = pm.magnitude_prune(model, masks, pm.fraction_to_reach(masks, 0.5, ratio))
    return masks


SECTIONS = ("peak", "train", "masked", "eval", "inference", "compile", "fullwidth", "gpu")
CPU_SECTIONS = SECTIONS[:-2]  # the default run; fullwidth (~5 min) and gpu only when asked for

NETS = {  # label: (config, batch, length)
    "full (w1, 10.47 M)": (HannunConfig(width=1.0), 8, 4096),
    "CPU scale (w0.5, 2.62 M)": (HannunConfig(width=0.5), 32, 4096),
    "w0.25 (0.66 M)": (HannunConfig(width=0.25), 32, 2048),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="timing budget per row")
    p.add_argument("--quick", action="store_true", help="1 s per row: a smoke run, not for the table")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "cinc2017",
                   help="data set for the eval/loading rows (falls back to data/synthetic)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    p.add_argument("--gpu-shape", default="64x4096", help="gpu section: batch x samples of the training step")
    p.add_argument("--only", default=",".join(CPU_SECTIONS),
                   help=f"comma-separated sections to measure ({', '.join(SECTIONS)}); the rows of the "
                        "others are kept from OUT/results.json")
    p.add_argument("--fullwidth-worker", help=argparse.SUPPRESS)  # one 1-thread worker of the fullwidth section
    args = p.parse_args(argv)
    if args.fullwidth_worker:
        fullwidth_worker(json.loads(args.fullwidth_worker))
        return
    only = [x for x in args.only.split(",") if x]
    if not only or set(only) - set(SECTIONS):
        p.error(f"--only takes sections from {', '.join(SECTIONS)}, got {args.only!r}")
    try:
        gpu_batch, gpu_length = (int(v) for v in args.gpu_shape.lower().split("x"))
    except ValueError:
        p.error(f"--gpu-shape must look like 64x4096, got {args.gpu_shape!r}")
    if {"peak", "train"} & set(only):  # the train rows are read against this run's peak
        only = sorted(set(only) | {"peak", "train"}, key=SECTIONS.index)
    seconds = 1.0 if args.quick else args.seconds
    rows: list[dict] = []
    stamp = time.strftime("%Y-%m-%d") + (" (--quick)" if args.quick else "")

    def add(section: str, label: str, **values: float | str) -> None:
        rows.append({"section": section, "label": label, **values, "measured": stamp})
        print(f"{section:10s} {label:55s} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in values.items()), flush=True)

    sections: dict[str, Callable[[], None]] = {
        "train": lambda: train_rows(add, seconds, peak_rows(add, seconds)),
        "masked": lambda: masked_rows(add, seconds),
        "eval": lambda: eval_rows(add, seconds, args.data),
        "inference": lambda: inference_rows(add, seconds),
        "compile": lambda: compile_rows(add, seconds),
        "fullwidth": lambda: fullwidth_rows(add, seconds, args.out, args.quick),
        # every GPU row is written as soon as it is measured: a sitting may be cut short
        "gpu": lambda: gpu_rows(lambda *a, **k: (add(*a, **k), write(args.out, rows)), seconds, args.data,
                                gpu_batch, gpu_length),
    }
    for name in only:
        if name in sections:
            sections[name]()
            write(args.out, rows)  # after every section, so a failure later keeps these rows


def peak_rows(add: Callable[..., None], seconds: float) -> dict[str, float]:
    peak = {"fp32": matmul_peak(torch.float32, seconds), "bf16": matmul_peak(torch.bfloat16, seconds)}
    for k, v in peak.items():
        add("peak", f"matmul 2048^3 {k}", gflops=v)
    return peak


def train_rows(add: Callable[..., None], seconds: float, peak: dict[str, float]) -> None:
    for label, (cfg, batch, length) in NETS.items():
        model = HannunNet(cfg)
        flops = 3 * forward_flops(model, length)  # per record: forward + backward
        for amp in ("fp32", "bf16"):
            t = et.median_seconds(train_step_fn(model, batch, length, amp == "bf16"), seconds)
            gf = batch * flops / t / 1e9
            add("train", f"{label}, batch {batch} x {length} samples, {amp}", records_per_s=batch / t,
                gflops=gf, share_of_peak=gf / peak[amp])



def masked_rows(add: Callable[..., None], seconds: float) -> None:
    cfg, batch, length = NETS["CPU scale (w0.5, 2.62 M)"]
    base = HannunNet(cfg)
    masks = pruned_masks(base, 10.0)
    dense_t = et.median_seconds(train_step_fn(HannunNet(cfg), batch, length, True), seconds)
    add("masked", "dense step (bf16, w0.5, no masks)", seconds_per_step=dense_t, vs_dense=1.0)
    ours = HannunNet(cfg)
    masked = pm.MaskedModel(ours, masks)
    t = et.median_seconds(train_step_fn(ours, batch, length, True, after=masked.apply), seconds)
    add("masked", "masked step: grad hooks + _foreach_mul_ (this project)", seconds_per_step=t, vs_dense=t / dense_t)
    theirs = HannunNet(cfg)
    for name, module in theirs.named_modules():
        if name in masks:
            torch_prune.custom_from_mask(module, "weight", masks[name])
    t = et.median_seconds(train_step_fn(theirs, batch, length, True), seconds)
    add("masked", "masked step: torch.nn.utils.prune reparametrisation", seconds_per_step=t, vs_dense=t / dense_t)



def eval_rows(add: Callable[..., None], seconds: float, data: Path) -> None:
    cfg = NETS["CPU scale (w0.5, 2.62 M)"][0]
    data = data if (data / "build_info.json").is_file() else ROOT / "data" / "synthetic"
    t0 = time.perf_counter()
    ds = load_dataset(data)
    add("eval", f"load_dataset({data.name}): {len(ds.labels)} records", seconds=time.perf_counter() - t0)
    train_idx, lengths = ds.indices("train"), ds.lengths
    useful = lengths[train_idx].sum()
    rng = np.random.default_rng(0)

    def computed(batches: list) -> float:  # samples the network sees per useful sample
        return sum(cfg.stride * math.ceil(lengths[b].max() / cfg.stride) * len(b) for b in batches) / useful

    perm = rng.permutation(train_idx)
    add("eval", "whole-record epoch, samples computed / useful: random batches of 32",
        ratio=computed([perm[i:i + 32] for i in range(0, len(perm), 32)]))
    add("eval", "whole-record epoch, samples computed / useful: length buckets of 32",
        ratio=computed(batching.length_buckets(lengths, train_idx, 32, rng)))
    idx = ds.indices("val")
    model = HannunNet(cfg)
    batcher = batching.Batcher(ds, batching.Normalizer.fit(ds, ds.indices("train")), cfg.stride, torch.device("cpu"))
    for amp in ("fp32", "bf16"):
        run = lambda amp=amp: tr.predict(model, batcher, idx, tr.TrainConfig(), amp == "bf16")  # noqa: E731
        t = et.median_seconds(run, seconds, warmup=1, min_runs=1)
        add("eval", f"whole records, w0.5, {data.name} val split, {amp}", records_per_s=len(idx) / t)



def inference_rows(add: Callable[..., None], seconds: float) -> None:
    x = et.record_input()
    for label, width in (("full (w1)", 1.0), ("CPU scale (w0.5)", 0.5)):
        torch.manual_seed(0)
        model = HannunNet(HannunConfig(width=width)).eval()
        m = pruned_masks(model, 142.0)
        with torch.no_grad():
            for name, w in pm.prunable_weights(model).items():
                w.mul_(m[name])
        dense_flops, sparse_flops = et.flops_per_record(model, x)
        shrunk = et.shrink(model)
        variants = {"dense kernels": model, "dead channels removed": shrunk,
                    "dead channels removed + sparse kernels": et.sparsify(shrunk)}
        base_ms = {}
        for threads in (1, 2):
            for name, net in variants.items():
                ms = et.latency_ms(net, x, threads, seconds / 2)
                base_ms.setdefault(threads, ms)
                add("inference", f"{label} at 142x ({dense_flops / sparse_flops:.0f}x fewer FLOPs), {name}, "
                    f"{threads} thread{'s' * (threads > 1)}", ms_per_record=ms, speedup=base_ms[threads] / ms)



def compile_rows(add: Callable[..., None], seconds: float) -> None:
    """Masked w0.25 training step, eager vs torch.compile of the model (its forward and, through
    AOTAutograd, its backward; the optimizer and the mask step stay eager): does it pay here?"""
    cfg, batch, length = NETS["w0.25 (0.66 M)"]
    for amp in ("fp32", "bf16"):
        times = {}
        for how in ("eager", "torch.compile"):
            torch.manual_seed(0)
            model = HannunNet(cfg)
            masked = pm.MaskedModel(model, pruned_masks(model, 16.0))
            net = torch.compile(model) if how == "torch.compile" else model
            step = train_step_fn(net, batch, length, amp == "bf16", after=masked.apply)
            t0 = time.perf_counter()
            step()
            first = time.perf_counter() - t0
            times[how] = et.median_seconds(step, seconds)
            add("compile", f"w0.25 masked step, batch {batch} x {length}, {amp}, {how}",
                records_per_s=batch / times[how], speedup=times["eager"] / times[how], first_call_s=first)


# --------------------------------------------------------------------------- fullwidth
# Kernel and layout variants of the network's step. Each computes the same function with the
# same parameters as model.py (tests/test_fullwidth_variants.py checks this in float64); only
# the way the work is handed to PyTorch changes.


class VariantConv(SameConv1d):
    """SameConv1d computed another way: ``pad_in_conv`` gives the conv itself the padding of
    Keras "same" (k/2 on both sides, then the first output dropped: PyTorch's ``padding=`` is
    symmetric) instead of F.pad's extra copy of the input; a 4-D ``[B, C, 1, L]`` input (what
    :class:`VariantNet` passes in channels-last memory, i.e. ``[B, L, C]`` order) runs as a
    conv2d with a ``1 x k`` kernel, which oneDNN computes in the channels-last layout."""

    pad_in_conv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_under_autocast and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._conv(x.float())
        return self._conv(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        pad, drop_first = self.padding[0], False
        if self.same_pad is not None:  # stride 1: Keras pads (k/2 - 1, k/2)
            if self.pad_in_conv:
                pad, drop_first = self.kernel_size[0] // 2, True
            else:
                x = F.pad(x, self.same_pad)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op unless F.pad changed it
            y = F.conv2d(x, self.weight.unsqueeze(2), self.bias, (1, self.stride[0]), (0, pad))
        else:
            y = F.conv1d(x, self.weight, self.bias, self.stride, pad)
        return y[..., 1:] if drop_first else y


class MaskDropout(nn.Dropout):
    """nn.Dropout with the keep mask drawn as bool instead of float: ``bernoulli_`` gives the
    same draws into a bool tensor (same generator calls, same RNG state afterwards), so the
    output (and its gradient) is bit for bit F.dropout's.
    The mask is drawn in the logical ``[B, C, L]`` order whatever the input's memory layout,
    so the channels-last network drops the same elements as the plain one."""

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - self.p)  # as F.dropout rounds it
        return x.mul(self._mask(x).to(x.dtype)).mul_(scale)  # a same-dtype mul: the vectorised kernel


class RandDropout(MaskDropout):
    """One uniform draw per element compared with the keep probability (``rand < 1 - p``):
    the same keep probability and scaling as nn.Dropout, but other random draws than
    ``bernoulli_`` (so a run with it is not the same run)."""

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape, device=x.device) < 1 - self.p


DROPOUTS: dict[str, type[nn.Dropout]] = {"float bernoulli": nn.Dropout, "bool bernoulli": MaskDropout,
                                         "rand <": RandDropout}


def _norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``, also for a ``[B, C, 1, L]`` tensor (BatchNorm1d itself accepts 2-D/3-D only):
    the same batch statistics, running-stat update and affine transform."""
    if x.dim() < 4:
        return bn(x)
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        bn.training or not bn.track_running_stats, bn.momentum, bn.eps)


def max_pool_where(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``F.max_pool1d(x, stride)`` along the last dim for stride 2, as one elementwise
    ``where(a >= b, a, b)`` of the even and odd samples instead of a pooling kernel that also
    computes and saves indices. Ties go to the first sample, as in max_pool's kernel, so the
    gradient is the same too (a NaN input gives the other sample instead of NaN)."""
    if stride != 2:
        raise ValueError(f"max_pool_where handles stride 2 only, got {stride}")
    n = x.shape[-1] // 2 * 2  # max_pool drops an odd last sample
    a, b = x[..., 0:n:2], x[..., 1:n:2]
    return torch.where(a >= b, a, b)


class VariantBlock(ResidualBlock):
    """ResidualBlock for 3-D ``[B, C, L]`` or channels-last 4-D ``[B, C, 1, L]`` activations,
    with the shortcut's max-pool as ``pool`` ("max_pool" as model.py, or "where")."""

    pool = "max_pool"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            shortcut = x
        elif self.pool == "where":
            shortcut = max_pool_where(x, self.stride)
        else:
            shortcut = F.max_pool2d(x, (1, self.stride)) if x.dim() == 4 else F.max_pool1d(x, self.stride)
        if self.pad_channels:  # the channel dim is 1 in both layouts
            shortcut = F.pad(shortcut, (0, 0) * (x.dim() - 2) + (0, self.pad_channels))
        if self.bn1 is not None:
            x = F.relu(_norm(self.bn1, x))
        x = self.conv1(x)
        x = self.conv2(self.dropout(F.relu(_norm(self.bn2, x))))
        return x + shortcut


class VariantNet(HannunNet):
    """HannunNet (same modules, parameter names and initialisation) with kernel/layout
    variants: ``pad_in_conv`` (see VariantConv), ``channels_last`` (activations kept as
    ``[B, C, 1, L]`` in channels-last memory from the stem to the head, so every conv, BatchNorm
    and elementwise op works on ``[B, L, C]`` order and no layer converts layouts; the conv
    weights too are kept in that layout), the dropout
    mask (a key of DROPOUTS) and the shortcut's ``pool`` (see VariantBlock)."""

    def __init__(self, cfg: HannunConfig | None = None, pad_in_conv: bool = False, channels_last: bool = False,
                 dropout: str = "float bernoulli", pool: str = "max_pool"):
        super().__init__(cfg)
        if pool not in ("max_pool", "where"):
            raise ValueError(f"pool must be 'max_pool' or 'where', got {pool!r}")
        self.channels_last = channels_last
        for m in self.modules():
            if isinstance(m, SameConv1d):
                m.__class__ = VariantConv
                m.pad_in_conv = pad_in_conv
                if channels_last:  # the weight stored as [out, k, in] in memory, so that neither its
                    # use as a channels-last conv2d kernel nor its gradient copies it (a copy per conv
                    # and step in each direction otherwise: 30-70 % of a step's copy_ time)
                    m.weight.data = m.weight.data.unsqueeze(2).contiguous(memory_format=torch.channels_last).squeeze(2)
        for block in self.blocks:
            block.__class__ = VariantBlock
            block.pool = pool
            block.dropout = DROPOUTS[dropout](self.cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        x = F.relu(_norm(self.stem_bn, self.stem(x)))
        x = F.relu(_norm(self.head_bn, self.blocks(x)))
        return self.head((x.squeeze(2) if self.channels_last else x).transpose(1, 2))


FULL_SHAPES = ((32, 2048), (8, 4096), (32, 4096), (64, 2048))
"""Batch x samples of the shape rows; the first is the CPU-scale recipe's, where the worker and
variant rows are measured."""

VARIANTS = {  # label: VariantNet keywords
    "Keras padding inside the conv": dict(pad_in_conv=True),
    "channels-last convs ([B, L, C] memory)": dict(channels_last=True),
    "channels-last + padding inside the conv": dict(channels_last=True, pad_in_conv=True),
    "dropout mask drawn as bool (same draws)": dict(dropout="bool bernoulli"),
    "dropout mask from rand < keep (other draws)": dict(dropout="rand <"),
    "shortcut max-pool as where(a >= b)": dict(pool="where"),
    "Adam fused (one CPU kernel for all weights)": dict(fused_adam=True),
    # the where-pool is left out here: on a busy host its forward + backward took longer than
    # max_pool's (its own row above measures it)
    "channels-last + bool mask + fused Adam": dict(channels_last=True, dropout="bool bernoulli", fused_adam=True),
}

FULL_MASK_RATIO = 16.0
"""The masks of the fullwidth rows (a magnitude-pruned 16x ticket); the step's cost does not
depend on how many weights they keep, only on applying them as train.py does."""


def cpu_flags() -> str:
    """The CPU flags that decide these kernels' speed (as ``lscpu | grep -o ...`` shows them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def full_step(amp: str, batch: int, length: int, masks: pm.Masks, fused_adam: bool = False,
              **variant: object) -> Callable[[], None]:
    """The full network's masked training step (train.train's: forward, loss, backward, clip,
    Adam, then the masks re-applied), on a model built from seed 0 as every row's; ``variant``
    are VariantNet's keywords, ``fused_adam`` Adam's single-kernel CPU implementation (train.py
    uses the default, per-weight one on the CPU)."""
    torch.manual_seed(0)
    model = VariantNet(HannunConfig(width=1.0), **variant) if variant else HannunNet(HannunConfig(width=1.0))
    masked = pm.MaskedModel(model, masks)
    return train_step_fn(model, batch, length, amp == "bf16", after=masked.apply, fused_adam=fused_adam)


def full_masks() -> pm.Masks:
    torch.manual_seed(0)
    return pruned_masks(HannunNet(HannunConfig(width=1.0)), FULL_MASK_RATIO)


def fullwidth_worker(job: dict) -> None:
    """One of the two 1-thread workers: set up, say "ready", wait for "go" on stdin (so both
    time the same seconds), time the step and print its records/s as JSON."""
    torch.set_num_threads(1)
    step = full_step(job["amp"], job["batch"], job["length"], full_masks())
    for _ in range(2):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    t = et.median_seconds(step, job["seconds"], warmup=0)
    print(json.dumps({"records_per_s": job["batch"] / t}), flush=True)


def two_workers(amp: str, batch: int, length: int, seconds: float) -> float:
    """Records/s of two 1-thread worker processes timed together, summed."""
    job = json.dumps({"amp": amp, "batch": batch, "length": length, "seconds": seconds})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--fullwidth-worker", job], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"fullwidth worker did not start (said {line!r}); see its error above")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return sum(json.loads(proc.communicate()[0].strip().splitlines()[-1])["records_per_s"] for proc in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def fullwidth_rows(add: Callable[..., None], seconds: float, out: Path, quick: bool) -> None:
    """The full network's masked training step: dtypes, shapes, threads, kernel/layout variants
    (see the module docstring); the table also goes to OUT/fullwidth.md, and a short profile of
    the fp32 and bf16 step to OUT/fullwidth-profile.txt."""
    flags, threads = cpu_flags(), torch.get_num_threads()
    amps = ["fp32"] + (["bf16"] if tr.cpu_has_native_bf16() else [])
    stamp = time.strftime("%Y-%m-%d") + (" (--quick: a smoke run, not for quoting)" if quick else "")
    table = [f"Full network (width 1, 16 blocks), masked training step as train.py runs it (forward, loss, "
             f"backward, clip, Adam, masks), measured by `python benchmarks/run_benchmarks.py --only fullwidth "
             f"--seconds {seconds:g}` on {stamp}: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, CPU flags {flags}, torch {torch.__version__}. Share of peak = GFLOP/s over the "
             "2048^3 matmul of the same dtype in this run; vs model.py = records/s over the model.py row of the "
             "same dtype and shape.", "",
             "| dtype | batch x samples | what | records/s | GFLOP/s | share of matmul peak | vs model.py |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    peak = {}
    for amp in amps:
        peak[amp] = matmul_peak(torch.float32 if amp == "fp32" else torch.bfloat16, seconds)
        add("fullwidth", f"matmul 2048^3 {amp}", gflops=peak[amp], cpu_flags=flags)
        table.append(f"| {amp} | 2048^3 | matmul peak | | {peak[amp]:.0f} | 100 % | |")
    if "bf16" not in amps:
        add("fullwidth", "bf16 rows skipped", why="no native bf16 on this CPU (neither avx512_bf16 nor amx_bf16)",
            cpu_flags=flags)
        table.append("| bf16 | | not measured: no native bf16 on this CPU | | | | |")
    masks = full_masks()
    flops = {length: 3 * forward_flops(HannunNet(HannunConfig(width=1.0)), length)  # per record
             for length in {length for _, length in FULL_SHAPES}}

    def row(label: str, amp: str, batch: int, length: int, records_per_s: float, base: float | None = None,
            ) -> float:
        gf = records_per_s * flops[length] / 1e9
        extra = {} if base is None else {"vs_baseline": records_per_s / base}
        add("fullwidth", f"full w1 masked step, {batch} x {length}, {amp}, {label}", records_per_s=records_per_s,
            gflops=gf, share_of_peak=gf / peak[amp], **extra, cpu_flags=flags)
        vs = "1 (the reference)" if base is None else f"{records_per_s / base:.2f}x"
        table.append(f"| {amp} | {batch} x {length} | {label} | {records_per_s:.1f} | {gf:.0f} | "
                     f"{100 * gf / peak[amp]:.0f} % | {vs} |")
        return records_per_s

    def rate(amp: str, batch: int, length: int, **variant: object) -> float:
        return batch / et.median_seconds(full_step(amp, batch, length, masks, **variant), seconds)

    plural = "s" * (threads > 1)
    for amp in amps:
        base = {}
        for batch, length in FULL_SHAPES:
            base[batch, length] = row(f"model.py, {threads} thread{plural}", amp, batch, length,
                                      rate(amp, batch, length))
        batch, length = FULL_SHAPES[0]
        row("model.py, two 1-thread workers together (summed)", amp, batch, length,
            two_workers(amp, batch, length, seconds), base[batch, length])
        for label, variant in VARIANTS.items():
            row(f"{label}, {threads} thread{plural}", amp, batch, length, rate(amp, batch, length, **variant),
                base[batch, length])
    rf.atomic_write_text("\n".join(table) + "\n", out / "fullwidth.md")
    print(f"wrote {out / 'fullwidth.md'}")
    fullwidth_profile(amps, masks, out / "fullwidth-profile.txt", flags, stamp)


PROFILED = {"model.py": {}, "channels-last + bool mask + fused Adam (the combined variant)": VARIANTS[
    "channels-last + bool mask + fused Adam"]}


def fullwidth_profile(amps: list[str], masks: pm.Masks, path: Path, flags: str, stamp: str) -> None:
    """Top ops by self CPU time of 3 steps of the full network at the first shape, per dtype,
    as model.py runs it and with the combined variant."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    batch, length = FULL_SHAPES[0]
    text = [f"Profile of the full network's masked training step ({batch} x {length}, {torch.get_num_threads()} "
            "threads, 3 steps after 2 of warm-up), by `python benchmarks/run_benchmarks.py --only fullwidth`, "
            f"{stamp}; torch {torch.__version__}; CPU flags: {flags}.", ""]
    for amp in amps:
        for label, variant in PROFILED.items():
            step = full_step(amp, batch, length, masks, **variant)
            step(), step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            text += [f"## {amp}, {label}", "",
                     prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), ""]
    rf.atomic_write_text("\n".join(text), path)
    print(f"wrote {path}")


CUDA_REPEATS = 5


def cuda_timed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` CUDA_REPEATS times, then a device synchronisation, so wall time counts the GPU's
    work while the host runs ahead as in training (one sync per call would expose launch
    latency that training overlaps). Divide the time by CUDA_REPEATS."""
    def run() -> None:
        for _ in range(CUDA_REPEATS):
            fn()
        torch.cuda.synchronize()
    return run


def gpu_rows(add: Callable[..., None], seconds: float, data: Path, batch: int, length: int) -> None:
    """The full network's masked training step on CUDA (see the module docstring)."""
    if not torch.cuda.is_available():
        print("gpu: no CUDA device; section skipped")
        return
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    peak = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        b = torch.randn(8192, 8192, device=dev, dtype=dtype)
        t = et.median_seconds(cuda_timed(lambda a=a, b=b: a @ b), seconds) / CUDA_REPEATS
        peak[label] = 2 * 8192**3 / t / 1e12
        add("gpu", f"{name}: matmul 8192^3 {label}", tflops=peak[label])
    cfg = HannunConfig(width=1.0)
    flops = 3 * forward_flops(HannunNet(cfg), length)  # per record, forward + backward
    torch.manual_seed(0)
    x = torch.randn(batch, 1, length, device=dev)
    y = torch.randint(0, 4, (batch,), device=dev)
    steps = torch.full((batch,), length // cfg.stride, device=dev)
    base = None
    for how in ("fp32 eager", "bf16 eager", "bf16 CUDA graph"):
        torch.manual_seed(0)
        model = HannunNet(cfg).to(dev).train()
        masked = pm.MaskedModel(model, pruned_masks(model, 16.0))
        graph = how.endswith("graph")
        tcfg = tr.TrainConfig(batch_size=batch, crop=length, model=cfg)
        opt = tr.make_optimizer(model, tcfg, dev, graph)
        bf16 = how.startswith("bf16")
        graphed = tr.GraphedStep(model, opt, 1.0, bf16) if graph else None

        def step(model=model, opt=opt, graphed=graphed, masked=masked, bf16=bf16) -> None:
            tr.set_lr(opt, 1e-3)
            if graphed is not None:
                graphed(x, y, steps)
            else:
                tr.train_step(model, opt, x, y, steps, 1.0, bf16)
            masked.apply()

        try:
            # warm-up: 2 calls of CUDA_REPEATS steps, past GraphedStep's eager warm-up and its capture
            t = et.median_seconds(cuda_timed(step), seconds) / CUDA_REPEATS
        except Exception as e:  # noqa: BLE001 - a failed mode is a finding, the other rows still count
            add("gpu", f"full w1, masked step, batch {batch} x {length}, {how}",
                failed=f"{type(e).__name__}: {e}"[:200])
            continue
        base = base or t
        tf = batch * flops / t / 1e12
        add("gpu", f"full w1, masked step, batch {batch} x {length}, {how}", records_per_s=batch / t,
            tflops=tf, mfu_bf16=tf / peak["bf16"], speedup=base / t)
    try:
        graph_check(add, dev, batch, length)
    except Exception as e:  # noqa: BLE001
        add("gpu", "CUDA graph = eager (losses of the same steps)", agrees="error", error=str(e)[:200])
    try:
        ds = load_dataset(data if data.is_dir() else ROOT / "data" / "synthetic")
        together_rows(add, ds, dev, batch, length)
    except Exception as e:  # noqa: BLE001 - never run on CUDA before: a failure is a finding
        print(f"gpu: the together rows failed ({type(e).__name__}: {e})")


def graph_check(add: Callable[..., None], dev: torch.device, batch: int, length: int, steps: int = 8) -> None:
    """The same steps (dropout off, same weights, batches and LR) eager and as a CUDA graph:
    their losses must agree to bf16 rounding, or the sitting trains eager."""
    cfg = HannunConfig(width=1.0, dropout=0.0)
    torch.manual_seed(1)
    xs = torch.randn(steps, batch, 1, length, device=dev)
    ys = torch.randint(0, 4, (steps, batch), device=dev)
    n = torch.full((batch,), length // cfg.stride, device=dev)
    losses = {}
    for graph in (False, True):
        torch.manual_seed(0)
        model = HannunNet(cfg).to(dev).train()
        masked = pm.MaskedModel(model, pruned_masks(model, 16.0))
        opt = tr.make_optimizer(model, tr.TrainConfig(batch_size=batch, crop=length, model=cfg), dev, graph)
        graphed = tr.GraphedStep(model, opt, 1.0, True) if graph else None
        out = []
        for i in range(steps):
            tr.set_lr(opt, 1e-3 * (0.5 if i >= steps // 2 else 1.0))  # the schedule must reach the graph
            loss = (graphed(xs[i], ys[i], n) if graphed is not None
                    else tr.train_step(model, opt, xs[i], ys[i], n, 1.0, True))
            out.append(float(loss))
            masked.apply()
        losses[graph] = out
    diff = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses[False], losses[True], strict=True))
    add("gpu", "CUDA graph = eager (losses of the same steps)", agrees="yes" if diff < 0.02 else "no",
        max_relative_difference=diff, steps=float(steps))


def together_rows(add: Callable[..., None], ds: object, dev: torch.device, batch: int, length: int) -> None:
    """4 tickets trained together (train_together.py, vmap) against one by one."""
    import train_together as tt  # noqa: PLC0415

    cfg = HannunConfig(width=1.0)
    tcfg = tr.TrainConfig(batch_size=batch // 2, crop=length, model=cfg)
    batcher = batching.Batcher(ds, batching.Normalizer.fit(ds, ds.indices("train")), cfg.stride, dev)
    masks = pruned_masks(HannunNet(cfg), 16.0)
    k, n = 4, 6
    models = [HannunNet(cfg).to(dev) for _ in range(k)]
    tt.train_one_by_one(models[0], masks, ds, tcfg, 2, True, batcher)  # warm-up (cuDNN picks its kernels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for model in models:
        tt.train_one_by_one(model, masks, ds, tcfg, n, True, batcher)
    torch.cuda.synchronize()
    alone = time.perf_counter() - t0
    tt.train_together(models, [masks] * k, [lambda s: 1e-3] * k, ds, tcfg, 2, dev, True, batcher)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tt.train_together(models, [masks] * k, [lambda s: 1e-3] * k, ds, tcfg, n, dev, True, batcher)
    torch.cuda.synchronize()
    together = time.perf_counter() - t0
    records = k * n * tcfg.batch_size
    add("gpu", f"full w1, {k} tickets, batch {tcfg.batch_size} x {length}, bf16 eager, one by one",
        records_per_s=records / alone)
    add("gpu", f"full w1, {k} tickets, batch {tcfg.batch_size} x {length}, bf16, together (vmap)",
        records_per_s=records / together, speedup=alone / together)


def write(out: Path, rows: list[dict]) -> None:
    """results.json/.md: this run's rows, plus the rows of the sections it has not (yet)
    measured, kept from the previous results.json; every row carries the date of the run
    that made it (and "(--quick)" for a smoke run), so ratios are only taken within one
    section."""
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    path = out / "results.json"
    if path.is_file():
        fresh = {r["section"] for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if r["section"] not in fresh]
        rows = sorted(kept + rows, key=lambda r: SECTIONS.index(r["section"]))
    out.mkdir(parents=True, exist_ok=True)
    # atomic: a run killed while writing must not lose the rows of the sections it keeps
    rf.atomic_write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n", path)
    lines = [f"Measured by `python benchmarks/run_benchmarks.py` on {machine}; ratios only within one "
             "section of one run (see the date of each row).", "",
             "| section | what | figures | measured |", "| --- | --- | --- | --- |"]
    for r in rows:
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r.items() if k not in ("section", "label", "measured"))
        lines.append(f"| {r['section']} | {r['label']} | {figures} | {r.get('measured', '')} |")
    rf.atomic_write_text("\n".join(lines) + "\n", out / "results.md")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
