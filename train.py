"""Train and evaluate the Hannun et al. ECG network on a data set built by build_datasets.py.

Defaults follow Hannun et al.'s reference code for CinC 2017 (github.com/awni/ecg): Adam at
lr 1e-3, gradient-norm clipping at 1, batch 32, inputs z-scored with the training set's mean
and std, the record's label at every 256-sample output step, batches of records of similar
length. Two learning-rate schedules:

  step     (default) a fixed schedule over --epochs: lr * gamma at each milestone (fractions
           of the run). The LR is a pure function of the step, so a pruning round can
           replay it from any point; the final weights are the result.
  plateau  the reference's recipe: lr * 0.1 after --patience epochs without a lower
           validation loss, early stop after --early-stop epochs; the weights with the
           lowest validation loss are the result.

A record's class comes from its per-step outputs: by default the mean of the logits over
the record's steps (``--aggregate mean``), which weighs each step by its confidence and
cannot tie; ``vote`` is the reference's majority of per-step argmaxes. Both are reported.

Metrics on validation and test: the CinC 2017 challenge score (mean F1 of N, A and O), the
F1 of each class, macro F1 over all four, accuracy and the confusion matrix (metrics.py;
batches are made by batching.py). The test split is evaluated once, after training, and
never used for a choice.

Re-running the same command resumes from the last checkpoint (written atomically every
epoch and every --checkpoint-minutes); a finished run only prints its metrics. Other flags
for an existing run folder are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import platform
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import prune as pm
from batching import Batcher, Normalizer, length_buckets, masked_step_loss
from build_datasets import DatasetError, ECGDataset, load_dataset
from metrics import af_scores, classification_metrics
from model import (
    CLASSES,
    RECORD_SAMPLES,
    HannunConfig,
    HannunNet,
    bf16_faulty_convs,
    count_parameters,
    flops,
    guard_bf16,
    output_positions,
)
from run_folders import (
    ADDED_FLAGS,
    CHECKPOINT,
    CONFIG,
    atomic_save,
    atomic_write_text,
    code_version,
    load_pt,
    locked,
    prepare_run,
    script_errors,
)

DENSE = "dense"
"""A seed's dense run folder (every method of the seed starts from it)."""
FINAL = "model.pt"
INIT = "init.pt"
METRICS = "metrics.json"
HISTORY = "history.csv"
PREDICTIONS = "predictions.csv"
"""Per-record class of the validation and test records: for bootstrap intervals."""
PROBABILITY_COLUMNS = tuple(f"p_{c}" for c in CLASSES)
"""predictions.csv's class probabilities (softmax of the mean logits; runs from 2026-12-05
on, older files lack them): for operating points other than the argmax (operating_point.py)."""
WINDOWS = "windows"
"""Scores on consecutive windows of the training length (``predict_windows``) are kept under
this key of a split in metrics.json, in predictions.csv's column WINDOWS_COLUMN, and in
results.csv's columns ending in WINDOWS_SUFFIX."""
WINDOWS_COLUMN = "predicted_windows"
WINDOWS_SUFFIX = "_windows"
LOG = "train.log"
"""Everything a training printed, appended at each start (resume) under a dated header."""
ON_TRAINED: Callable[[Path], None] | None = None
"""Called with the run folder after each training finishes (run_experiments.py's progress bar)."""
# eager steps (warm-up, odd-sized batches) of the capturable Adam that a CUDA-graph step uses
warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")


def rewind_file(step: int) -> str:
    """File name of the dense run's weights after ``step`` steps (late_reset's start)."""
    return f"rewind_{step}.pt"


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (see --help for their meaning)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    patience: int = 2
    early_stop: int = 8
    clip: float = 1.0
    weight_decay: float = 0.0
    crop: int = 0
    aggregate: str = "mean"
    seed: int = 0
    eval_batch_size: int = 64
    max_steps: int = 0
    model: HannunConfig = field(default_factory=HannunConfig)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The fixed ('step') schedule's LR at a global step: a pure function, so any round of
    pruning can replay the schedule from any step k."""
    total = cfg.epochs * steps_per_epoch
    passed = sum(step >= round(m * total) for m in cfg.milestones)
    return cfg.lr * cfg.gamma ** passed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


def use_bf16(amp: str, device: torch.device) -> bool:
    """bf16 autocast on CUDA (where supported); fp32 on the CPU unless --amp bf16.

    Why not bf16 on CPUs with AMX: PyTorch 2.13's oneDNN bf16 conv1d is wrong there for the
    width-0.25 network's 8-channel layers (model.bf16_faulty_convs). Those layers now run
    in fp32 under autocast, which leaves bf16 only ~1.1x faster than fp32 at CPU scale
    (0.24 vs 0.27 s per step of 32 x 2048 samples, measured 2026-11-27): not worth the
    risk. Earlier runs under 'auto' on this machine used the broken kernels
    (results/README.md)."""
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        raise SystemExit("error: --amp bf16 asked for, but this CPU has no native bf16 (lscpu shows neither "
                         "avx512_bf16 nor amx_bf16): PyTorch would emulate it far slower than fp32. "
                         "Use --amp fp32 (or auto), or run on a host with native bf16.")
    if amp != "auto":
        return amp == "bf16"
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX): on an AVX2-only host
    PyTorch emulates bf16 and a 2048^3 matmul runs at < 1 GFLOP/s against ~95 in fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class _Tee:
    """A text stream that writes to the terminal and to a log file; progress-bar redraws
    (text with a carriage return) stay on the terminal."""

    def __init__(self, stream: object, log: io.TextIOBase):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if "\r" not in text:
            self.log.write(text)
            self.log.flush()
        return self.stream.write(text)

    def __getattr__(self, name: str) -> object:  # isatty, flush, encoding, ... of the terminal
        return getattr(self.stream, name)


@contextlib.contextmanager
def logged(run_dir: Path) -> Iterator[None]:
    """Copy what is printed (stdout and stderr) to ``run_dir/train.log``, appended, after a
    header with the date, code version and command; an error that stops the training is
    written too."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG, "a", encoding="utf-8", errors="backslashreplace") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S %z')}  code {code_version()}  "
                  f"command: {' '.join(sys.argv)}\n")
        log.flush()  # a training killed before it prints anything still shows that it started
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        except BaseException as e:  # Ctrl-C and errors too: the log says how the sitting ended
            log.write(f"stopped: {type(e).__name__}: {e}\n")
            raise
        finally:
            sys.stdout, sys.stderr = out, err


def aggregate_steps(logits: torch.Tensor, steps: torch.Tensor, how: str) -> torch.Tensor:
    """Record-level class from per-step logits ``[B, T, C]`` with ``steps[i]`` valid steps:
    ``mean`` of the logits, or ``vote``: the most frequent per-step argmax (ties go to the
    lower class index)."""
    valid = (torch.arange(logits.shape[1], device=logits.device) < steps[:, None]).float()
    if how == "mean":
        return ((logits.float() * valid[..., None]).sum(1) / steps[:, None]).argmax(1)
    if how == "vote":
        votes = F.one_hot(logits.argmax(2), logits.shape[2]).float() * valid[..., None]
        return votes.sum(1).argmax(1)
    raise ValueError(f"aggregate must be 'mean' or 'vote', got {how!r}")


@torch.no_grad()
def predict(model: torch.nn.Module, batcher: Batcher, idx: np.ndarray, cfg: TrainConfig,
            bf16: bool) -> dict[str, np.ndarray | float]:
    """Whole-record predictions for ``idx``: class by mean logits and by vote, the mean
    per-step loss, and the per-record mean logits (in ``idx`` order)."""
    was_training = model.training
    model.eval()
    order = idx[np.argsort(batcher.host_lengths[idx], kind="stable")]
    mean_pred, vote_pred, rec_logits, losses, weights = [], [], [], [], []
    for i in range(0, len(order), cfg.eval_batch_size):
        batch = order[i:i + cfg.eval_batch_size]
        x, y, steps = batcher(batch)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        logits = logits.float()
        valid = (torch.arange(logits.shape[1], device=x.device) < steps[:, None]).float()
        rec_logits.append((logits * valid[..., None]).sum(1) / steps[:, None])
        mean_pred.append(aggregate_steps(logits, steps, "mean"))
        vote_pred.append(aggregate_steps(logits, steps, "vote"))
        losses.append(masked_step_loss(logits, y, steps) * steps.sum())
        weights.append(steps.sum())
    model.train(was_training)
    back = np.argsort(np.argsort(batcher.host_lengths[idx], kind="stable"), kind="stable")
    cat = lambda ts: torch.cat(ts).cpu().numpy()[back]  # noqa: E731 - back to idx order
    return {"mean": cat(mean_pred), "vote": cat(vote_pred), "logits": cat(rec_logits),
            "loss": float(torch.stack(losses).sum() / torch.stack(weights).sum())}


@torch.no_grad()
def predict_windows(model: torch.nn.Module, batcher: Batcher, idx: np.ndarray, window: int,
                    eval_batch_size: int, bf16: bool) -> np.ndarray:
    """Class per record of ``idx`` scored on consecutive windows of ``window`` samples (the
    training length, ``--crop``): the argmax of the mean logits over every window's valid
    steps (the ``mean`` aggregate, over windows instead of one pass).

    Why: the network's receptive field (~19,000 samples at 16 blocks) exceeds the training
    windows, so on a whole record every step sees context it never saw in training; a
    network that classifies its training windows well can score badly on whole records
    (results/README.md, "Whole records against the windows"). Both scores are reported."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(idx), len(CLASSES), dtype=torch.float64, device=batcher.device)
    steps_of = torch.zeros(len(idx), dtype=torch.float64, device=batcher.device)
    for i in range(0, len(idx), eval_batch_size):
        x, steps, owner = batcher.windows(idx[i:i + eval_batch_size], window)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        valid = (torch.arange(logits.shape[1], device=x.device) < steps[:, None]).float()
        rows = batcher.to_device(owner + i)
        sums.index_add_(0, rows, (logits.double() * valid[..., None]).sum(1))
        steps_of.index_add_(0, rows, steps.double())
    model.train(was_training)
    return (sums / steps_of[:, None]).argmax(1).cpu().numpy()


def evaluate(model: torch.nn.Module, batcher: Batcher, ds: ECGDataset, split: str,
             cfg: TrainConfig, bf16: bool, windows: bool = False) -> dict:
    """Metrics of one split: by ``cfg.aggregate`` at the top level, and both ways under
    ``by_aggregate``; per record (in the split's order) the predicted class and the class
    probabilities, the softmax of the mean logits over the record's steps (the ``mean``
    aggregate), from which an operating point other than the argmax can be chosen. With
    ``windows`` and a training crop, also the metrics (``windows``) and per-record classes
    (``predicted_windows``) of ``predict_windows`` on windows of the training length."""
    idx = ds.indices(split)
    out = predict(model, batcher, idx, cfg, bf16)
    both = {how: classification_metrics(ds.labels[idx], out[how]) for how in ("mean", "vote")}
    result = {**both[cfg.aggregate], "loss": out["loss"], "records": len(idx),
              "by_aggregate": {how: {k: v for k, v in m.items() if k != "confusion"}
                               for how, m in both.items()},
              "predicted": out[cfg.aggregate].tolist(),
              "probabilities": torch.softmax(torch.from_numpy(out["logits"]), 1).numpy()}
    if windows and cfg.crop:
        pred = predict_windows(model, batcher, idx, cfg.crop, cfg.eval_batch_size, bf16)
        result.update({WINDOWS: {"window": cfg.crop, **classification_metrics(ds.labels[idx], pred)},
                       WINDOWS_COLUMN: pred.tolist()})
    return result


StepHook = Callable[[torch.nn.Module, int], None]
"""Called after every optimizer step with (model, global step): where pruning re-applies
its masks and saves rewind points."""


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               steps: torch.Tensor, clip: float, bf16: bool) -> torch.Tensor:
    """One optimizer step: forward (bf16 autocast if asked), masked per-step loss, backward,
    gradient-norm clipping, update. Returns the loss (not synchronised to the host)."""
    # autocast's cache of bf16 weight copies must not outlive a CUDA graph capture
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not capturing):
        logits = model(x)
    loss = masked_step_loss(logits, y, steps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss


STEP_MODES = ("auto", "eager", "graph")


def graph_step_wanted(mode: str, device: torch.device, crop: int) -> bool:
    """Whether training steps run as a captured CUDA graph: asked for ('graph'), or 'auto' on
    CUDA with --crop (fixed batch shapes, which a graph needs). A graph replays the whole step
    with one launch instead of ~500 kernel launches from Python, which bound a GPU's speed
    on this network. On the CPU every mode is eager."""
    if device.type != "cuda":
        return False
    return mode == "graph" or (mode == "auto" and crop > 0)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, graph: bool
                   ) -> torch.optim.Adam:
    """Adam. On CUDA the fused kernel (one launch for all weights); for a captured step also
    capturable, with the LR a device tensor that set_lr fills, so each replay follows the schedule."""
    if device.type != "cuda":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr = torch.tensor(cfg.lr, device=device) if graph else cfg.lr
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True,
                            capturable=graph)


def match_optimizer(opt: torch.optim.Optimizer, device: torch.device, graph: bool) -> None:
    """After load_state_dict: the loaded groups carry the settings of the run that saved them;
    put back this run's (a float LR would be frozen into a graph)."""
    for group in opt.param_groups:
        group["fused"], group["capturable"] = device.type == "cuda", graph  # as make_optimizer makes them
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if graph else lr
    if device.type == "cuda":
        for st in opt.state.values():
            if "step" in st:
                st["step"] = st["step"].to(device, torch.float32)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class GraphedStep:
    """``train_step`` for batches of one shape, captured once as a CUDA graph and replayed.

    The first WARMUP calls run eagerly on a side stream (they create Adam's state and let
    cuDNN pick its kernels, as capture requires); the next call captures and replays. Inputs
    are copied into static tensors; the returned loss is overwritten by the next replay.
    Dropout stays random per step (the graph advances the generator's offset on each
    replay, and the per-step seed of ``train`` is read at replay). The optimizer must come
    from ``make_optimizer(..., graph=True)``.
    """

    WARMUP = 3

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, clip: float, bf16: bool):
        self.model, self.opt, self.clip, self.bf16 = model, opt, clip, bf16
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] | None = None
        self.loss: torch.Tensor | None = None
        self.side: torch.cuda.Stream | None = None
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            self.static = (x.clone(), y.clone(), steps.clone())
        for dst, src in zip(self.static, (x, y, steps), strict=True):
            dst.copy_(src)
        if self.graph is None:
            if self.side is None:
                self.side = torch.cuda.Stream()  # one side stream for warm-up and capture
            if self.calls < self.WARMUP:
                self.calls += 1
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    loss = train_step(self.model, self.opt, *self.static, self.clip, self.bf16)
                torch.cuda.current_stream().wait_stream(self.side)
                return loss
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.side):
                self.loss = train_step(self.model, self.opt, *self.static, self.clip, self.bf16)
            self.graph = graph
        self.graph.replay()
        return self.loss


def stop_if_not_finite(model: torch.nn.Module, bad_step: int, run_dir: Path, lr: float,
                       check_weights: bool = False) -> None:
    """Stop (without writing anything) at a non-finite loss or weight: training on would only
    spread NaNs into a checkpoint and confident-looking metrics. The last checkpoint, if any,
    is untouched. Weights are counted only when asked (once per epoch) or after a bad loss:
    a non-finite weight makes the next loss non-finite, and counting costs a synchronisation."""
    if bad_step < 0 and not check_weights:
        return
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
    weights = 0 if bool(finite.all()) else sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    if bad_step < 0 and not weights:
        return
    where = f"a non-finite loss at step {bad_step}" if bad_step >= 0 else "non-finite weights"
    raise SystemExit(f"error: {run_dir}: training stopped at {where} ({weights} non-finite weights, lr {lr:g}); "
                     "lower --lr, check --clip and the data. Nothing was written after the last checkpoint.")


def train(model: torch.nn.Module, ds: ECGDataset, cfg: TrainConfig, run_dir: Path,
          device: torch.device, bf16: bool, checkpoint_minutes: float = 5.0,
          after_step: StepHook | None = None, quiet: bool = False, total_steps: int | None = None,
          lr_fn: Callable[[int], float] | None = None, salt: int = 0,
          batcher: Batcher | None = None, step_mode: str = "auto") -> list[dict]:
    """Train ``model`` in place under ``cfg``, resuming from ``run_dir/checkpoint.pt``.

    By default: ``cfg.epochs`` epochs under ``cfg.schedule``. A pruning round passes its
    own budget (``total_steps``) and LR per step (``lr_fn``), and a ``salt`` that gives it
    its own batch order and dropout. Every step is seeded from (seed, salt, step) and every
    epoch's batch order from (seed, salt, epoch), so an interrupted and resumed run takes
    the same steps as an uninterrupted one. Returns the per-epoch history. The result is
    the last step's weights, or for 'plateau' the lowest-validation-loss weights.
    ``step_mode`` (see graph_step_wanted) decides whether full-size batches replay a CUDA
    graph; other batches (shorter records, an epoch's last) take the eager step.
    """
    train_idx = ds.indices("train")
    batcher = batcher or Batcher(ds, Normalizer.fit(ds, train_idx), model.cfg.stride, device)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = total_steps if total_steps is not None else cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if lr_fn is None and cfg.schedule == "step":
        lr_fn = lambda step: lr_at(cfg, step, steps_per_epoch)  # noqa: E731
    graph = graph_step_wanted(step_mode, device, cfg.crop)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: let cuDNN time its kernels once
    opt = make_optimizer(model, cfg, device, graph)
    state = {"epoch": 0, "batch": 0, "step": 0, "lr": cfg.lr, "history": [],
             "best_loss": math.inf, "best_state": None, "bad_epochs": 0, "stopped": False,
             "epoch_loss": 0.0, "epoch_time": 0.0}
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = load_pt(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        match_optimizer(opt, device, graph)
        state.update(ckpt["state"])
        if not quiet:
            print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['batch']}")

    def save() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state},
                    ckpt_path)

    graphed = GraphedStep(model, opt, cfg.clip, bf16) if graph else None
    full_shape = (cfg.batch_size, 1, cfg.crop)
    last_save = time.monotonic()
    epochs = math.ceil(total_steps / steps_per_epoch)
    # batch > 0 at step == total_steps: killed after the last step, before its epoch's
    # evaluation and history row; finish that epoch rather than skip it
    while not state["stopped"] and (state["step"] < total_steps or state["batch"] > 0):
        epoch = state["epoch"]
        batches = length_buckets(ds.lengths, train_idx, cfg.batch_size,
                                 np.random.default_rng([cfg.seed, salt, epoch]))
        batches = batches[:total_steps - state["step"] + state["batch"]]  # a partial last epoch
        model.train()
        bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{epochs}",
                   unit="batch", disable=True if quiet else None, leave=False)
        running = torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device)  # the first step with a non-finite loss, kept on the device
        t0 = time.perf_counter()
        for b in range(state["batch"], len(batches)):
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, salt, state["step"]]).generate_state(1)[0]))
            lr = lr_fn(state["step"]) if lr_fn is not None else state["lr"]
            set_lr(opt, lr)
            x, y, steps = batcher(batches[b], cfg.crop, np.random.default_rng([cfg.seed, salt, epoch, b]))
            if graphed is not None and tuple(x.shape) == full_shape:
                loss = graphed(x, y, steps)
            else:
                loss = train_step(model, opt, x, y, steps, cfg.clip, bf16)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                    torch.full_like(first_bad, state["step"] + 1), first_bad)
            state["step"] += 1
            state["batch"] = b + 1
            if after_step is not None:
                after_step(model, state["step"])
            running += loss.detach()
            bar.update()
            if b % 20 == 0 or b == len(batches) - 1:
                stop_if_not_finite(model, int(first_bad), run_dir, lr, check_weights=b == len(batches) - 1)
            if b % 20 == 0 and not quiet:
                bar.set_postfix(loss=f"{(state['epoch_loss'] + running.item()) / (b + 1):.3f}",
                                lr=f"{lr:.0e}")
            if time.monotonic() - last_save > 60 * checkpoint_minutes:
                state["epoch_loss"] += float(running)
                state["epoch_time"] += time.perf_counter() - t0
                running.zero_()
                t0 = time.perf_counter()
                save()
                last_save = time.monotonic()
        bar.close()
        train_seconds = state["epoch_time"] + time.perf_counter() - t0
        train_loss = (state["epoch_loss"] + float(running)) / max(len(batches), 1)
        t1 = time.perf_counter()
        val = evaluate(model, batcher, ds, "val", cfg, bf16)
        row = {"epoch": epoch + 1, "step": state["step"], "lr": float(opt.param_groups[0]["lr"]),
               "train_loss": train_loss, "val_loss": val["loss"],
               "val_challenge_f1": val["challenge_f1"], "val_accuracy": val["accuracy"],
               "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t1,
               "records_per_second": sum(map(len, batches)) / train_seconds}
        state["history"].append(row)
        if not quiet:
            tqdm.write(f"epoch {row['epoch']:3d}  lr {row['lr']:.0e}  train loss {train_loss:.4f}  "
                       f"val loss {val['loss']:.4f}  val F1 {val['challenge_f1']:.4f}  "
                       f"acc {val['accuracy']:.4f}  {train_seconds:.0f}s "
                       f"({row['records_per_second']:.0f} rec/s)")
        if cfg.schedule == "plateau":
            if val["loss"] < state["best_loss"]:
                state["best_loss"], state["bad_epochs"] = val["loss"], 0
                state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= cfg.early_stop:
                    state["stopped"] = True
                elif state["bad_epochs"] % cfg.patience == 0:
                    state["lr"] = max(state["lr"] * 0.1, cfg.lr * 1e-3)
        state.update(epoch=epoch + 1, batch=0, epoch_loss=0.0, epoch_time=0.0)
        save()
        last_save = time.monotonic()
    if cfg.schedule == "plateau" and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return state["history"]


# --------------------------------------------------------------------------- pruning rounds

METHODS = ("finetune", "weight_rewind", "lr_rewind", "late_reset")
BASELINES = ("dense_equal_steps",)
"""Unpruned references run like a method: 'dense_equal_steps' retrains the dense network
round after round exactly as lr_rewind retrains its tickets (same start, LR and steps), so
at round r it has had the same cumulative steps as lr_rewind's round-r ticket."""
CONTROLS = ("random_reinit", "random_prune")
NUMERICS_VERSION = 2
"""Stored in every run folder's flags (a folder made under other numerics is refused, not
resumed): 2 = bf16 autocast only on CUDA by default, every conv layer checked against fp32
and the faulty ones run in fp32 (model.bf16_faulty_convs). Version 1 (runs before
2026-11-27 21:45 UTC) used bf16 on CPUs with AMX unchecked, where the width-0.25 network's
8-channel convs computed wrong outputs."""
DEFINITIONS_VERSION = 2
"""What the methods mean (stored in every method folder's flags; a folder made under other
definitions is refused, not resumed): 2 = weight_rewind from the initial weights over the
whole schedule (k plays no part), late_reset/lr_rewind/finetune over steps [k, T).
Version 1 (runs before 2026-11-27) trained weight_rewind over [k, T) only."""
PRUNING_FLAGS = {"retrain", "control", "rewind_to", "prune_fraction", "prune_scope", "layer_fraction",
                 "dense_layers", "rounds", "target_ratio", "goal", "tolerance", "alpha", "min_fraction", "max_retries",
                 "control_every", "definitions_version"}
"""Flags that do not change the dense run (which every method of a seed shares)."""
CONTROL_FLAGS = {"control", "control_every"}
"""Flags that do not change a method's own rounds (only its controls)."""
ROUNDS = "rounds.csv"
MASK = "mask.pt"


@dataclass
class Context:
    """What every training of one seed shares: data, hyperparameters, device."""

    ds: ECGDataset
    cfg: TrainConfig
    device: torch.device
    bf16: bool
    batcher: Batcher
    steps_per_epoch: int
    checkpoint_minutes: float
    quiet: bool
    step_mode: str = "auto"
    wait: bool = True
    """When a run folder is locked by another worker: wait for it (True) or raise run_folders.Busy."""
    fp32_convs: tuple[str, ...] = ()
    """Conv layers that bf16 autocast computes wrongly on this device: they run in fp32."""

    @classmethod
    def make(cls, ds: ECGDataset, args: argparse.Namespace) -> Context:
        cfg = config_from_args(args)
        device = resolve_device(args.device)
        norm = Normalizer.fit(ds, ds.indices("train"))
        ctx = cls(ds, cfg, device, use_bf16(args.amp, device), Batcher(ds, norm, cfg.model.stride, device),
                  math.ceil(len(ds.indices("train")) / cfg.batch_size), args.checkpoint_minutes, args.quiet,
                  args.step_mode, args.busy == "wait")
        if ctx.bf16:
            ctx.fp32_convs = checked_bf16_convs(ctx)
        return ctx

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def new_model(self, seed: int) -> HannunNet:
        torch.manual_seed(seed)
        model = HannunNet(self.cfg.model).to(self.device)
        guard_bf16(model, self.fp32_convs)
        return model

    @functools.cached_property
    def layers(self) -> tuple[dict[str, int], dict[str, int]]:
        """({layer: output positions}, {layer: weights}) of the conv and linear layers for a
        30-s record: what FLOP counts need (computed once, on the CPU)."""
        model = HannunNet(self.cfg.model)
        stride = self.cfg.model.stride
        positions = output_positions(model, torch.zeros(1, 1, stride * math.ceil(RECORD_SAMPLES / stride)))
        modules = dict(model.named_modules())
        return positions, {n: modules[n].weight.numel() for n in positions}

    def flops(self, masks: pm.Masks) -> int:
        """FLOPs per 30-s record of the network under ``masks`` (non-zero weights only)."""
        positions, sizes = self.layers
        return flops(positions, {n: int(masks[n].sum()) if n in masks else sizes[n] for n in positions})

    def load(self, path: Path) -> dict:
        return load_pt(path, self.device)


_BF16_CHECKED: dict[tuple, tuple[str, ...]] = {}
"""The check's answer per (device, network, window length): a grid runs it once per process,
not once per cell."""


def checked_bf16_convs(ctx: Context) -> tuple[str, ...]:
    """The conv layers that bf16 autocast gets wrong on ``ctx.device`` for this network, checked
    on a few real training windows with a throw-away model (the RNG is left as it was), and
    said once per process: they will run in fp32."""
    key = (str(ctx.device), ctx.cfg.model, ctx.cfg.crop)
    if key not in _BF16_CHECKED:
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            probe = HannunNet(ctx.cfg.model).to(ctx.device)
            x, _, _ = ctx.batcher(ctx.ds.indices("train")[:4], ctx.cfg.crop, np.random.default_rng(0))
            faulty = _BF16_CHECKED[key] = tuple(bf16_faulty_convs(probe, x))
        if faulty:
            print(f"note: bf16 autocast computes {len(faulty)} conv layer(s) of this network wrongly on "
                  f"{ctx.device} (a PyTorch/oneDNN kernel bug: {', '.join(faulty)}); they run in fp32",
                  file=sys.stderr)
    return _BF16_CHECKED[key]


def parse_rewind(text: str, steps_per_epoch: int) -> int:
    """'500it' -> 500 steps, '2ep' -> 2 epochs of steps, '0' -> 0."""
    text = text.strip().lower()
    try:
        if text.endswith("it"):
            return int(text[:-2])
        if text.endswith("ep"):
            return round(float(text[:-2]) * steps_per_epoch)
        if int(text) == 0:
            return 0
    except ValueError:
        pass
    raise ValueError(f"--rewind-to must look like '500it' or '2ep' (or 0), got {text!r}")


@functools.cache
def machine() -> dict:
    """What a run's numerics depend on beyond its flags: a seeded run repeats bit for bit
    on the same CPU model, torch and thread count, but not on another CPU (measured: a dense
    run retrained on another machine of this project drifted from epoch 1 and ended 0.025
    validation F1 away), so metrics.json names them."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def prediction_frame(ds: ECGDataset, split: str, result: dict) -> pd.DataFrame:
    """predictions.csv's rows of one split, taking the per-record entries out of ``result``
    (``evaluate``'s): record, split, label, predicted, the class probabilities, and
    ``predicted_windows`` where the split was also scored on windows of the training length."""
    idx = ds.indices(split)
    names = lambda classes: [CLASSES[i] for i in classes]  # noqa: E731
    frame = pd.DataFrame({"record": ds.names[idx], "split": split, "label": names(ds.labels[idx]),
                          "predicted": names(result.pop("predicted")),
                          **dict(zip(PROBABILITY_COLUMNS, result.pop("probabilities").T, strict=True))})
    if WINDOWS_COLUMN in result:
        frame[WINDOWS_COLUMN] = names(result.pop(WINDOWS_COLUMN))
    return frame


def fit_and_report(ctx: Context, model: HannunNet, run_dir: Path, extra: dict, **train_kw: object) -> dict:
    """Train (resuming), evaluate on val and test, and write model.pt, history.csv and
    metrics.json (last, the marker of a finished run). Returns the metrics."""
    t0 = time.perf_counter()
    history = train(model, ctx.ds, ctx.cfg, run_dir, ctx.device, ctx.bf16, ctx.checkpoint_minutes,
                    quiet=ctx.quiet, batcher=ctx.batcher, step_mode=ctx.step_mode, **train_kw)
    t1 = time.perf_counter()
    results = {split: evaluate(model, ctx.batcher, ctx.ds, split, ctx.cfg, ctx.bf16, windows=True)
               for split in ("val", "test")}
    eval_seconds = time.perf_counter() - t1
    predictions = pd.concat([prediction_frame(ctx.ds, split, results[split]) for split in ("val", "test")])
    train_seconds = sum(h["train_seconds"] for h in history)
    results.update({
        "parameters": count_parameters(model), "device": str(ctx.device), "bf16": ctx.bf16,
        "bf16_fp32_convs": list(ctx.fp32_convs),
        "epochs_run": len(history), "steps": history[-1]["step"] if history else 0,
        "train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(len(history), 1),
        "wall_seconds_this_sitting": time.perf_counter() - t0,
        "train_records_per_second": float(np.mean([h["records_per_second"] for h in history])),
        "eval_records_per_second": (results["val"]["records"] + results["test"]["records"]) / eval_seconds,
        "normalizer": asdict(ctx.batcher.norm), "code_version": code_version(), "machine": machine(), **extra})
    atomic_save(model.state_dict(), run_dir / FINAL)
    atomic_write_text(predictions.to_csv(index=False, float_format="%.5f"), run_dir / PREDICTIONS)
    write_history(history, run_dir / HISTORY)
    atomic_write_text(json.dumps(results, indent=2) + "\n", run_dir / METRICS)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the final weights are in model.pt
    if ON_TRAINED is not None:
        ON_TRAINED(run_dir)
    return results


def run_dense(ctx: Context, run_dir: Path, flags: dict, data: Path, rewind_step: int = 0,
              need_snapshot: bool = False) -> dict:
    """The dense training of a seed (skipped when finished). Saves ``init.pt`` and the
    weights at ``rewind_step`` (``rewind_<step>.pt``) for late_reset; a finished run without
    that snapshot is an error only when ``need_snapshot``."""
    prepare_run(run_dir, flags, data)
    snapshot = run_dir / rewind_file(rewind_step)
    if not (run_dir / METRICS).is_file():
        with locked(run_dir, ctx.wait):  # another worker may finish it while this one waits
            if not (run_dir / METRICS).is_file():
                return _train_dense(ctx, run_dir, rewind_step, snapshot)
    if need_snapshot and rewind_step and not snapshot.is_file():
        have = sorted(p.name for p in run_dir.glob("rewind_*.pt"))
        raise SystemExit(f"error: {run_dir} finished without weights at step {rewind_step} "
                         f"(it has {have or 'none'}); use that --rewind-to or another --out")
    return json.loads((run_dir / METRICS).read_text())


def _train_dense(ctx: Context, run_dir: Path, rewind_step: int, snapshot: Path) -> dict:
    model = ctx.new_model(ctx.cfg.seed)
    if not (run_dir / INIT).is_file():
        atomic_save(model.state_dict(), run_dir / INIT)
    model.load_state_dict(ctx.load(run_dir / INIT))

    def save_rewind_point(m: torch.nn.Module, step: int) -> None:
        if step == rewind_step:
            atomic_save(m.state_dict(), snapshot)

    with logged(run_dir):
        if not ctx.quiet:
            print(f"dense: {count_parameters(model):,} parameters, {ctx.device}, {'bf16' if ctx.bf16 else 'fp32'}, "
                  f"{len(ctx.ds.indices('train'))} train / {len(ctx.ds.indices('val'))} val records -> {run_dir}")
        return fit_and_report(ctx, model, run_dir, {}, after_step=save_rewind_point if rewind_step else None)


def retrain(ctx: Context, run_dir: Path, start: dict, masks: pm.Masks, lr_fn: Callable[[int], float],
            steps: int, extra: dict) -> dict:
    """One pruned training: ``start`` weights, masked, trained for ``steps`` steps."""
    model = ctx.new_model(ctx.cfg.seed)
    model.load_state_dict(start)
    masked = pm.MaskedModel(model, masks)
    salt = zlib.crc32(str(run_dir.relative_to(run_dir.parents[1])).encode())
    with logged(run_dir):
        if not ctx.quiet:
            print(f"{run_dir}: {pm.compression_ratio(masks):.1f}x, {steps} steps")
        results = fit_and_report(ctx, model, run_dir, extra, after_step=masked.after_step, total_steps=steps,
                                 lr_fn=lr_fn, salt=salt)
    masked.remove()
    return results


def round_dir(method_dir: Path, r: int, attempt: int) -> Path:
    return method_dir / (f"round_{r:02d}" + (f"_try{attempt}" if attempt else ""))




def score_columns(scores: dict | None, split: str, suffix: str = "") -> dict[str, float]:
    """results.csv's score columns of one split (``classification_metrics``' output), named
    ``{split}_{score}{suffix}``; NaN where ``scores`` is None."""
    keys = ("challenge_f1", "macro_f1", "accuracy", *(f"f1_{c}" for c in CLASSES), "sensitivity_A", "ppv_A")
    if scores is None:
        return {f"{split}_{k}{suffix}": float("nan") for k in keys}
    sens, ppv = af_scores(scores["confusion"])
    values = {**scores, "sensitivity_A": sens, "ppv_A": ppv}
    return {f"{split}_{k}{suffix}": values[k] for k in keys}


def row_for(folder: Path, seed: int, method: str, control: str, r: int, attempt: int, fraction: float,
            masks: pm.Masks, metrics: dict, accepted: bool, parameters: int, *, flops: int) -> dict:
    """One line of the results table; ``folder`` is the run's path from the experiment folder."""
    alive, total = pm.count(masks)
    nonzero = parameters - total + alive
    row = {"folder": folder.as_posix(), "seed": seed, "method": method, "control": control, "round": r,
           "attempt": attempt,
           "fraction": fraction, "accepted": accepted, "remaining": alive, "prunable": total,
           "compression": total / alive, "sparsity": 1 - alive / total,
           "nonzero_parameters": nonzero, "compression_all": parameters / nonzero, "flops": flops}
    for split in ("val", "test"):
        row.update(score_columns(metrics[split], split))
    for split in ("val", "test"):  # NaN for a run scored on whole records only (no crop, or made before)
        row.update(score_columns(metrics[split].get(WINDOWS), split, WINDOWS_SUFFIX))
    row.update(epochs=metrics["epochs_run"], steps=metrics.get("steps", float("nan")),
               train_seconds=metrics["train_seconds"])
    return row


def replay_start(method: str, k: int) -> int:
    """The step of the dense schedule a method's retraining starts from: it trains the
    steps [start, T). Frankle & Carbin's weight rewinding replays the whole schedule from
    the initial weights (start 0, T steps); late resetting starts from the weights at step
    k and replays [k, T) (Frankle et al. 2020); lr_rewind, finetune and the dense baseline
    retrain [k, T) too (Renda et al. 2020 rewind the LR to k)."""
    return 0 if method == "weight_rewind" else k


def baseline_rounds(args: argparse.Namespace) -> int:
    """Rounds of the dense_equal_steps baseline: as many as a fixed-fraction schedule needs
    to reach --target-ratio (or --rounds if fewer)."""
    return min(args.rounds, pm.rounds_to_reach(args.target_ratio, args.prune_fraction))


def run_lottery(ctx: Context, args: argparse.Namespace, flags: dict, data: Path) -> pd.DataFrame:
    """Dense training, then pruning rounds of ``args.retrain`` (and its ``args.control``).

    Each round retrains the surviving weights for the steps [start, T) of the dense
    schedule (T = --epochs, k = --rewind-to); the methods differ in where they start:

      finetune       trained weights of the last round, the schedule's final LR, T - k steps
      lr_rewind      trained weights of the last round, LR replayed from step k, T - k steps
      late_reset     the dense run's weights at step k, LR replayed from step k, T - k steps
      weight_rewind  the initial weights, the whole LR schedule, T steps (Frankle & Carbin)

    The baseline dense_equal_steps prunes nothing and retrains as lr_rewind does. Finished
    rounds are read back, not redone; an unfinished round resumes.
    """
    seed_dir, method = args.out, args.retrain
    k = parse_rewind(args.rewind_to, ctx.steps_per_epoch)
    if not 0 <= k < ctx.total_steps:
        raise SystemExit(f"error: --rewind-to {args.rewind_to} is step {k}, outside the {ctx.total_steps} "
                         "steps of dense training")
    start_step = replay_start(method, k)
    steps = ctx.total_steps - start_step
    baseline = method in BASELINES
    dense_flags = {f: v for f, v in flags.items() if f not in PRUNING_FLAGS}
    method_dir = seed_dir / method
    finished = finished_table(args, method_dir)
    if finished is not None:  # read back without loading any weights (checkpoints may be gone)
        prepare_run(seed_dir / DENSE, dense_flags, data)
        prepare_run(method_dir, {f: v for f, v in flags.items() if f not in CONTROL_FLAGS}, data)
        if args.control:
            prepare_run(args.out / f"{args.retrain}+{args.control}", flags, data)
        return finished
    dense = run_dense(ctx, seed_dir / DENSE, dense_flags, data, k, need_snapshot=method == "late_reset")
    with locked(method_dir, ctx.wait):  # one worker trains a method's rounds; others wait or move on
        prepare_run(method_dir, {f: v for f, v in flags.items() if f not in CONTROL_FLAGS}, data)
        final_lr = ctx.cfg.lr * ctx.cfg.gamma ** len(ctx.cfg.milestones)
        lr_fn = ((lambda i: final_lr) if method == "finetune"
                 else (lambda i: lr_at(ctx.cfg, start_step + i, ctx.steps_per_epoch)))
        # weights are files, read only when a round must be computed: a chain carried to a
        # fresh clone by run_state.py has its masks and last weights, not every round's
        init = seed_dir / DENSE / INIT
        early = seed_dir / DENSE / rewind_file(k) if k and method == "late_reset" else init

        def start_weights(previous_trained: Path) -> dict:
            return ctx.load({"weight_rewind": init, "late_reset": early}.get(method, previous_trained))

        model = ctx.new_model(ctx.cfg.seed)
        parameters = count_parameters(model)
        dense_layers = tuple(args.dense_layers)
        masks = pm.full_masks(model, dense_layers)
        trained = seed_dir / DENSE / FINAL
        exp = seed_dir.parent
        rows = [row_for((seed_dir / DENSE).relative_to(exp), args.seed, method, "none", 0, 0, 0.0, masks, dense,
                        True, parameters, flops=ctx.flops(masks))]
        history = [(0, masks, trained)]  # accepted rounds: (round, masks, file of trained weights)
        fraction, r, attempt = args.prune_fraction, 1, 0
        while (r <= baseline_rounds(args) if baseline
               else r <= args.rounds and not pm.reached(masks, args.target_ratio)):
            f = 0.0 if baseline else pm.fraction_to_reach(masks, fraction, args.target_ratio)
            d = round_dir(method_dir, r, attempt)
            if baseline:
                new_masks = masks
                d.mkdir(parents=True, exist_ok=True)
            elif (d / MASK).is_file():
                new_masks = ctx.load(d / MASK)
            else:
                model.load_state_dict(ctx.load(trained))
                new_masks = pm.magnitude_prune(model, masks, f, args.prune_scope, dict(args.layer_fraction))
                if pm.count(new_masks)[0] == pm.count(masks)[0]:  # e.g. layerwise rounding at the very end
                    if not ctx.quiet:
                        print(f"{d}: a fraction of {f:.4g} prunes no weight; "
                              f"stopping at {pm.compression_ratio(masks):.1f}x")
                    break
                d.mkdir(parents=True, exist_ok=True)
                atomic_save(new_masks, d / MASK)
                atomic_write_text(pm.sparsity_report(new_masks).to_csv(index=False), d / "sparsity.csv")
            if (d / METRICS).is_file():
                metrics = json.loads((d / METRICS).read_text())
            else:
                metrics = retrain(ctx, d, start_weights(trained), new_masks, lr_fn, steps,
                                  {"round": r, "attempt": attempt, "fraction": f,
                                   "compression": pm.compression_ratio(new_masks)})
            accepted, fraction = (pm.next_fraction(f, metrics["val"]["challenge_f1"], dense["val"]["challenge_f1"],
                                                   args.tolerance, args.alpha, args.min_fraction)
                                  if args.goal and not baseline else (True, fraction))
            rows.append(row_for(d.relative_to(exp), args.seed, method, "none", r, attempt, f, new_masks, metrics,
                                accepted, parameters, flops=ctx.flops(new_masks)))
            write_rounds(rows, method_dir / ROUNDS)
            if accepted:
                masks, trained = new_masks, d / FINAL
                history.append((r, masks, trained))
                r, attempt = r + 1, 0
            elif fraction < args.min_fraction or out_of_retries(args, attempt):
                break
            else:
                attempt += 1
    table = pd.DataFrame(rows)
    if args.control:
        table = pd.concat([table, run_control(ctx, args, flags, data, history, start_weights, lr_fn,
                                              steps, parameters)], ignore_index=True)
    return table


def out_of_retries(args: argparse.Namespace, attempt: int) -> bool:
    """Whether the rejected try ``attempt`` (0 for a round's first) used up --max-retries."""
    return getattr(args, "max_retries", 0) > 0 and attempt >= args.max_retries


def finished_table(args: argparse.Namespace, method_dir: Path) -> pd.DataFrame | None:
    """The method's (and its control's) rows when every round is done, else None.

    Done means: the last accepted round reached --target-ratio or --rounds (or a --goal
    run stopped at --min-fraction), and the control, if asked, has its row for that round.
    """
    if not (method_dir / ROUNDS).is_file():
        return None
    table = pd.read_csv(method_dir / ROUNDS)
    accepted = table[table["accepted"]]
    last = accepted.iloc[-1]
    rejected_last = not table.iloc[-1]["accepted"] and (table.iloc[-1]["fraction"] / args.alpha < args.min_fraction
                                                        or out_of_retries(args, int(table.iloc[-1]["attempt"])))
    if args.retrain in BASELINES:
        return table if last["round"] >= baseline_rounds(args) else None
    if not (last["compression"] >= args.target_ratio * (1 - 1e-9) or last["round"] >= args.rounds
            or (args.goal and rejected_last)):
        return None
    if args.control:
        path = args.out / f"{args.retrain}+{args.control}" / ROUNDS
        if not path.is_file():
            return None
        control = pd.read_csv(path)
        if last["round"] > 0 and last["round"] not in set(control["round"]):
            return None
        table = pd.concat([table, control], ignore_index=True)
    return table


def run_control(ctx: Context, args: argparse.Namespace, flags: dict, data: Path, history: list,
                start_weights: Callable[[Path], dict], lr_fn: Callable[[int], float], steps: int,
                parameters: int) -> pd.DataFrame:
    """The control for every --control-every-th accepted round of the method (and its last):

      random_reinit  the ticket's mask, fresh random weights (a new seed)
      random_prune   a random mask with the ticket's per-layer sparsity, the method's start weights

    both with the method's LR and budget. A ticket that does not beat them is no ticket.
    """
    control_dir = args.out / f"{args.retrain}+{args.control}"
    prepare_run(control_dir, flags, data)
    with locked(control_dir, ctx.wait):
        return _run_control(ctx, args, control_dir, history, start_weights, lr_fn, steps, parameters)


def _run_control(ctx: Context, args: argparse.Namespace, control_dir: Path, history: list,
                 start_weights: Callable[[Path], dict], lr_fn: Callable[[int], float], steps: int,
                 parameters: int) -> pd.DataFrame:
    last = history[-1][0]
    rows = []
    for (r, masks, _), (_, _, previous) in zip(history[1:], history[:-1], strict=True):
        if r % args.control_every and r != last:
            continue
        d = control_dir / f"round_{r:02d}"
        d.mkdir(parents=True, exist_ok=True)
        salt = zlib.crc32(f"{args.seed}/{args.retrain}+{args.control}/{r}".encode())
        if (d / MASK).is_file():
            control_masks = ctx.load(d / MASK)
        else:
            control_masks = masks if args.control == "random_reinit" else pm.random_masks_like(masks, salt)
            atomic_save(control_masks, d / MASK)
        if (d / METRICS).is_file():
            metrics = json.loads((d / METRICS).read_text())
        else:
            start = (ctx.new_model(salt).state_dict() if args.control == "random_reinit"
                     else start_weights(previous))
            metrics = retrain(ctx, d, start, control_masks, lr_fn, steps,
                              {"round": r, "control": args.control,
                               "compression": pm.compression_ratio(control_masks)})
        rows.append(row_for(d.relative_to(args.out.parent), args.seed, args.retrain, args.control, r, 0,
                            float("nan"), control_masks, metrics, True, parameters,
                            flops=ctx.flops(control_masks)))
        write_rounds(rows, control_dir / ROUNDS)
    return pd.DataFrame(rows)


def write_rounds(rows: list[dict], path: Path) -> None:
    atomic_write_text(pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"), path)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synthetic", help="data set folder from build_datasets.py")
    p.add_argument("--out", default=None,
                   help="folder of this seed (default results/run/seed<SEED>): the dense run goes to "
                   "<out>/dense, each method's rounds to <out>/<method>/round_NN")
    p.add_argument("--seed", type=int, default=0, help="seed of init, batch order, dropout, crops")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast: auto = on CUDA only (on the CPU, PyTorch 2.13 computes some bf16 "
                   "convs wrongly; with 'bf16' every conv is checked and those run in fp32)")
    p.add_argument("--step-mode", default="auto", choices=STEP_MODES,
                   help="CUDA only: 'graph' replays each full-size training step as a captured CUDA graph; "
                   "auto = graph on CUDA with --crop (fixed shapes), else eager. The CPU is always eager")
    m = p.add_argument_group("network (model.py)")
    m.add_argument("--width", type=float, default=1.0, help="filter multiplier (1 = 32..256 filters)")
    m.add_argument("--blocks", type=int, default=16, help="residual blocks (16 = published)")
    m.add_argument("--dropout", type=float, default=0.2)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=30, help="dense training length T")
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    o.add_argument("--schedule", default="step", choices=["step", "plateau"])
    o.add_argument("--milestones", default="0.5,0.75",
                   help="'step': fractions of the run where the LR is multiplied by --gamma")
    o.add_argument("--gamma", type=float, default=0.1, help="'step': LR factor at each milestone")
    o.add_argument("--patience", type=int, default=2, help="'plateau': epochs before LR x 0.1")
    o.add_argument("--early-stop", type=int, default=8, help="'plateau': epochs before stopping")
    o.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--crop", type=int, default=0,
                   help="train on random windows of this many samples (0 = whole records)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--aggregate", default="mean", choices=["mean", "vote"],
                   help="record class from the mean of per-step logits, or a per-step vote")
    e.add_argument("--eval-batch-size", type=int, default=64)
    q = p.add_argument_group("pruning rounds (prune.py); without --retrain only the dense run")
    q.add_argument("--retrain", choices=METHODS + BASELINES, default=None,
                   help="how survivors are retrained each round (dense_equal_steps: the unpruned network "
                   "retrained like lr_rewind, a budget-matched reference)")
    q.add_argument("--control", choices=CONTROLS, default=None,
                   help="also run this control on the method's masks")
    q.add_argument("--control-every", type=int, default=1, help="control at every n-th round (and the last)")
    q.add_argument("--rewind-to", default="0",
                   help="k: '500it' or '2ep'. late_reset starts from the dense weights at step k; it, lr_rewind "
                   "and finetune retrain steps [k, T); weight_rewind always retrains [0, T)")
    q.add_argument("--prune-fraction", type=float, default=0.2, help="share of surviving weights pruned per round")
    q.add_argument("--prune-scope", default="global", choices=pm.SCOPES,
                   help="global: one magnitude threshold; layerwise: --prune-fraction of each layer; fanin: one "
                        "threshold on |w| sqrt(fan-in) (magnitude relative to the He init); "
                        "erk: each layer keeps a share proportional to the sum of its weight's dimensions "
                        "(Erdos-Renyi-Kernel), cut by magnitude")
    q.add_argument("--layer-fraction", action="append", default=[], metavar="LAYER=F",
                   help="own fraction for a layer, e.g. head=0.1 (repeatable)")
    q.add_argument("--dense-layers", default="", help="comma-separated layers never pruned, e.g. stem")
    q.add_argument("--rounds", type=int, default=30, help="at most this many rounds")
    q.add_argument("--target-ratio", type=float, default=142.0, help="stop at this compression ratio")
    q.add_argument("--goal", action="store_true",
                   help="over-pruning guard: redo a round at fraction/alpha when val F1 < dense*(1-tolerance)")
    q.add_argument("--tolerance", type=float, default=0.01, help="--goal: allowed relative loss of val F1")
    q.add_argument("--alpha", type=float, default=2.0, help="--goal: fraction divisor after a failed round")
    q.add_argument("--min-fraction", type=float, default=0.01, help="--goal: stop below this fraction")
    q.add_argument("--max-retries", type=int, default=0,
                   help="--goal: redo a rejected round at most this many times, then stop (0: no limit, only "
                        "--min-fraction stops): a retry budget fixed before the runs, so that the level reached "
                        "does not ride on how often validation noise is read")
    r = p.add_argument_group("run")
    r.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="also checkpoint within an epoch at this interval")
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    r.add_argument("--busy", default="wait", choices=["wait", "skip"],
                   help="a run folder another worker is training: wait for it, or stop with run_folders.Busy "
                   "(run_experiments.py then moves on to another cell and comes back)")
    r.add_argument("--max-steps", type=int, default=0,
                   help="stop every training after this many steps, LR schedule unchanged (a smoke test of a "
                   "configuration on a few batches; 0 = off)")
    args = p.parse_args(argv)
    try:
        args.milestones = tuple(float(v) for v in args.milestones.split(",") if v.strip())
    except ValueError:
        p.error(f"--milestones must be comma-separated fractions, got {args.milestones!r}")
    try:
        args.layer_fraction = sorted((n, float(f)) for n, f in (item.split("=") for item in args.layer_fraction))
    except ValueError:
        p.error("--layer-fraction takes LAYER=FRACTION, e.g. head=0.1")
    args.dense_layers = [n.strip() for n in args.dense_layers.split(",") if n.strip()]
    for name, ok in [("epochs", args.epochs >= 1), ("batch_size", args.batch_size >= 1),
                     ("lr", 0 < args.lr < math.inf), ("crop", args.crop >= 0), ("clip", args.clip >= 0),
                     ("weight_decay", 0 <= args.weight_decay < math.inf),
                     ("milestones", all(0 < v < 1 for v in args.milestones)),
                     ("gamma", 0 < args.gamma <= 1), ("patience", args.patience >= 1),
                     ("early_stop", args.early_stop >= 1), ("eval_batch_size", args.eval_batch_size >= 1),
                     ("prune_fraction", 0 < args.prune_fraction < 1),
                     ("layer_fraction", all(0 <= f < 1 for _, f in args.layer_fraction)),
                     ("rounds", args.rounds >= 1), ("target_ratio", args.target_ratio > 1),
                     ("tolerance", 0 <= args.tolerance < 1), ("alpha", args.alpha > 1),
                     ("min_fraction", 0 < args.min_fraction < 1), ("max_retries", args.max_retries >= 0),
                     ("control_every", args.control_every >= 1),
                     ("max_steps", args.max_steps >= 0)]:
        if not ok:
            p.error(f"bad value for --{name.replace('_', '-')}: {getattr(args, name)}")
    try:
        args.model = HannunConfig(width=args.width, blocks=args.blocks, dropout=args.dropout)
        parse_rewind(args.rewind_to, 1)
    except ValueError as err:
        p.error(str(err))
    if args.crop and args.crop % args.model.stride:
        p.error(f"--crop must be a multiple of the output stride {args.model.stride}")
    if args.control and not args.retrain:
        p.error("--control needs --retrain (the method whose masks it controls)")
    if args.control and args.retrain in BASELINES:
        p.error(f"--control: {args.retrain} prunes nothing, so it has no masks to control")
    if args.retrain and args.schedule != "step":
        p.error("pruning rounds replay the LR schedule: use --schedule step with --retrain")
    args.out = Path(args.out or f"results/run/seed{args.seed}")
    return args


def dense_args(seed_dir: Path) -> argparse.Namespace:
    """The train.py flags of a seed's dense run, read back from its config.json (``out`` is
    the seed folder): for scripts that re-make its weights or branch from them."""
    path = seed_dir / DENSE / CONFIG
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: is {seed_dir} a seed folder of run_experiments.py?")
    flags = {**ADDED_FLAGS, **json.loads(path.read_text())["flags"]}
    flags.update(model=HannunConfig(**flags["model"]), milestones=tuple(flags["milestones"]),
                 layer_fraction=[tuple(x) for x in flags.get("layer_fraction", [])], out=seed_dir, quiet=True)
    return argparse.Namespace(**flags)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace, ds: ECGDataset | None = None, report: bool = True) -> pd.DataFrame | dict:
    """What main() does, for callers that hold the data already (run_experiments.py, which
    passes ``report=False``: a dense cell of a grid prints no metrics)."""
    data = Path(args.data)
    try:  # before any work: a typo must not cost a dense training
        pm.check_layer_names(HannunNet(args.model), tuple(args.dense_layers), dict(args.layer_fraction))
    except ValueError as e:
        sys.exit(f"error: --dense-layers/--layer-fraction: {e}")
    if ds is None:
        try:
            ds = load_dataset(data)
        except DatasetError as e:
            sys.exit(f"error: {e}")
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in ("model", "out")}
    flags["model"] = asdict(args.model)
    flags["layer_fraction"] = [list(x) for x in args.layer_fraction]
    flags["definitions_version"] = DEFINITIONS_VERSION
    flags["numerics_version"] = NUMERICS_VERSION
    ctx = Context.make(ds, args)
    if args.retrain is None:
        done = (args.out / DENSE / METRICS).is_file()
        dense_flags = {f: v for f, v in flags.items() if f not in PRUNING_FLAGS}
        results = run_dense(ctx, args.out / DENSE, dense_flags, data,
                            parse_rewind(args.rewind_to, ctx.steps_per_epoch))
        if report:
            if done:
                print(f"{args.out / 'dense'} is finished; its metrics:")
            print_metrics(results)
        return results
    table = run_lottery(ctx, args, flags, data)
    if not args.quiet:
        cols = ["method", "control", "round", "attempt", "compression", "val_challenge_f1", "test_challenge_f1"]
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return table


def main(argv: list[str] | None = None) -> None:
    with script_errors():
        run(parse_args(argv))


def write_history(history: list[dict], path: Path) -> None:
    atomic_write_text(pd.DataFrame(history).to_csv(index=False, float_format="%.6g"), path)


def print_metrics(results: dict) -> None:
    for split in ("val", "test"):
        m = results[split]
        per_class = "  ".join(f"F1 {c} {m[f'f1_{c}']:.3f}" for c in CLASSES)
        print(f"{split:>4}: challenge F1 {m['challenge_f1']:.4f}  macro F1 {m['macro_f1']:.4f}  "
              f"accuracy {m['accuracy']:.4f}  {per_class}  (vote: challenge F1 "
              f"{m['by_aggregate']['vote']['challenge_f1']:.4f})")
    print(f"      {results['seconds_per_epoch']:.1f} s/epoch, "
          f"{results['train_records_per_second']:.0f} train rec/s, "
          f"{results['eval_records_per_second']:.0f} eval rec/s on {results['device']}"
          f"{' (bf16)' if results['bf16'] else ''}")


if __name__ == "__main__":
    main()
