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
F1 of each class, macro F1 over all four, accuracy and the confusion matrix. The test split
is evaluated once, after training, and never used for a choice.

Re-running the same command resumes from the last checkpoint (written atomically every
epoch and every --checkpoint-minutes); a finished run only prints its metrics. Other flags
for an existing run folder are refused.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from build_datasets import DatasetError, ECGDataset, atomic_write, code_version, load_dataset, sha256_of
from model import CLASSES, HannunConfig, HannunNet, count_parameters

CHECKPOINT = "checkpoint.pt"
FINAL = "model.pt"
INIT = "init.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
HISTORY = "history.csv"
RESUME_NEUTRAL = {"device", "checkpoint_minutes", "quiet"}
"""Flags that may differ when a run is resumed (they do not change its results)."""


# --------------------------------------------------------------------------- metrics


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           num_classes: int = len(CLASSES)) -> dict:
    """Challenge F1 (mean F1 of N, A, O as scored in CinC 2017), per-class F1, macro F1,
    accuracy and the confusion matrix (rows: true class, columns: predicted class).

    A class's F1 is ``2 TP / (true count + predicted count)``, 0 when both are 0.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    cm = np.bincount(num_classes * y_true + y_pred,
                     minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    out = {"challenge_f1": float(f1[:3].mean()), "macro_f1": float(f1.mean()),
           "accuracy": float(tp.sum() / max(cm.sum(), 1))}
    out.update({f"f1_{c}": float(v) for c, v in zip(CLASSES, f1, strict=False)})
    out["confusion"] = cm.tolist()
    return out


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


# --------------------------------------------------------------------------- batches


@dataclass
class Normalizer:
    """z-scoring with the training records' mean and std (padding excluded)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, ds: ECGDataset, idx: np.ndarray) -> Normalizer:
        total = n = sq = 0.0
        for i in idx:
            x = ds.signals[i, :ds.lengths[i]].astype(np.float64)
            total, sq, n = total + x.sum(), sq + (x * x).sum(), n + len(x)
        mean = total / n
        return cls(float(mean), float(math.sqrt(max(sq / n - mean * mean, 1e-12))))


class Batcher:
    """Makes device tensors for batches of records: z-scored samples ``[B, 1, L]`` (zero
    beyond each record's end), labels and the number of valid output steps per record.

    L is the longest record in the batch (or ``crop``) rounded up to the output stride, so
    little compute goes into padding. With ``crop`` every record longer than ``crop`` is cut
    to a random window of ``crop`` samples (a CPU-scale speed option; evaluation always
    uses whole records).
    """

    def __init__(self, ds: ECGDataset, norm: Normalizer, stride: int, device: torch.device):
        self.signals = torch.from_numpy(ds.signals).to(device)
        self.lengths = torch.tensor(ds.lengths, device=device)
        self.labels = torch.tensor(ds.labels, device=device)
        self.norm, self.stride, self.device = norm, stride, device
        self.host_lengths = ds.lengths

    def __call__(self, idx: np.ndarray, crop: int = 0, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self.host_lengths[idx]
        if crop:
            starts = rng.integers(0, np.maximum(lengths - crop, 0) + 1)
            lengths = np.minimum(lengths, crop)
        else:
            starts = np.zeros(len(idx), dtype=np.int64)
        L = self.stride * math.ceil(lengths.max() / self.stride)
        cols = torch.from_numpy(starts).to(self.device)[:, None] + torch.arange(L, device=self.device)
        rows = torch.from_numpy(idx).to(self.device)[:, None]
        x = self.signals[rows, cols.clamp_(max=self.signals.shape[1] - 1)]
        n = torch.from_numpy(lengths).to(self.device)
        inside = torch.arange(L, device=self.device) < n[:, None]
        x = torch.where(inside, (x.float() - self.norm.mean) / self.norm.std, 0.0)
        steps = torch.clamp(n // self.stride, min=1)
        return x[:, None, :], self.labels[rows[:, 0]], steps


def length_buckets(lengths: np.ndarray, idx: np.ndarray, batch_size: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of records of similar length in random order (as in the reference code):
    sort by length with random tie-breaks, cut into batches, shuffle the batches."""
    order = idx[np.lexsort((rng.random(len(idx)), lengths[idx]))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def masked_step_loss(logits: torch.Tensor, labels: torch.Tensor, steps: torch.Tensor
                     ) -> torch.Tensor:
    """Mean cross-entropy over the valid output steps of every record in the batch."""
    B, T, C = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * T, C), labels.repeat_interleave(T),
                         reduction="none").reshape(B, T)
    valid = torch.arange(T, device=logits.device) < steps[:, None]
    return (ce * valid).sum() / valid.sum()


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
    """bf16 autocast on CUDA, and on CPUs with native bf16 (avx512_bf16/AMX), where it
    measured ~1.3-2x faster than fp32 (see results/README.md); fp32 elsewhere."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, written atomically (a crash leaves the previous file intact)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, text.encode())


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


def evaluate(model: torch.nn.Module, batcher: Batcher, ds: ECGDataset, split: str,
             cfg: TrainConfig, bf16: bool) -> dict:
    """Metrics of one split: by ``cfg.aggregate`` at the top level, and both ways under
    ``by_aggregate``."""
    idx = ds.indices(split)
    out = predict(model, batcher, idx, cfg, bf16)
    both = {how: classification_metrics(ds.labels[idx], out[how]) for how in ("mean", "vote")}
    return {**both[cfg.aggregate], "loss": out["loss"], "records": len(idx),
            "by_aggregate": {how: {k: v for k, v in m.items() if k != "confusion"}
                             for how, m in both.items()}}


StepHook = Callable[[torch.nn.Module, int], None]
"""Called after every optimizer step with (model, global step): where pruning re-applies
its masks and saves rewind points."""


def train(model: torch.nn.Module, ds: ECGDataset, cfg: TrainConfig, run_dir: Path,
          device: torch.device, bf16: bool, checkpoint_minutes: float = 5.0,
          after_step: StepHook | None = None, quiet: bool = False) -> list[dict]:
    """Train ``model`` in place under ``cfg``, resuming from ``run_dir/checkpoint.pt``.

    Every step is seeded from (seed, step) and every epoch's batch order from (seed,
    epoch), so an interrupted and resumed run takes the same steps as an uninterrupted one.
    Returns the per-epoch history. The result is the last epoch's weights ('step') or the
    lowest-validation-loss weights ('plateau').
    """
    train_idx = ds.indices("train")
    norm = Normalizer.fit(ds, train_idx)
    batcher = Batcher(ds, norm, model.cfg.stride, device)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "batch": 0, "step": 0, "lr": cfg.lr, "history": [],
             "best_loss": math.inf, "best_state": None, "bad_epochs": 0, "stopped": False,
             "epoch_loss": 0.0, "epoch_time": 0.0}
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        if not quiet:
            print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['batch']}")

    def save() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state},
                    ckpt_path)

    last_save = time.monotonic()
    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"]
        batches = length_buckets(ds.lengths, train_idx, cfg.batch_size,
                                 np.random.default_rng([cfg.seed, epoch]))
        model.train()
        bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=True if quiet else None, leave=False)
        running = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for b in range(state["batch"], len(batches)):
            torch.manual_seed(cfg.seed * 1_000_003 + state["step"])
            lr = lr_at(cfg, state["step"], steps_per_epoch) if cfg.schedule == "step" else state["lr"]
            for group in opt.param_groups:
                group["lr"] = lr
            x, y, steps = batcher(batches[b], cfg.crop, np.random.default_rng([cfg.seed, epoch, b]))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = masked_step_loss(logits, y, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            state["step"] += 1
            state["batch"] = b + 1
            if after_step is not None:
                after_step(model, state["step"])
            running += loss.detach()
            bar.update()
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
        train_loss = (state["epoch_loss"] + float(running)) / len(batches)
        t1 = time.perf_counter()
        val = evaluate(model, batcher, ds, "val", cfg, bf16)
        row = {"epoch": epoch + 1, "step": state["step"], "lr": opt.param_groups[0]["lr"],
               "train_loss": train_loss, "val_loss": val["loss"],
               "val_challenge_f1": val["challenge_f1"], "val_accuracy": val["accuracy"],
               "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t1,
               "records_per_second": len(train_idx) / train_seconds}
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


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synthetic", help="data set folder from build_datasets.py")
    p.add_argument("--out", default=None, help="run folder (default results/dense/seed<SEED>)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, batch order, dropout, crops")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast: auto = on CUDA and on CPUs with native bf16")
    m = p.add_argument_group("network (model.py)")
    m.add_argument("--width", type=float, default=1.0, help="filter multiplier (1 = 32..256 filters)")
    m.add_argument("--blocks", type=int, default=16, help="residual blocks (16 = published)")
    m.add_argument("--dropout", type=float, default=0.2)
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=30)
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
    r = p.add_argument_group("run")
    r.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="also checkpoint within an epoch at this interval")
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    args = p.parse_args(argv)
    try:
        args.milestones = tuple(float(v) for v in args.milestones.split(",") if v.strip())
    except ValueError:
        p.error(f"--milestones must be comma-separated fractions, got {args.milestones!r}")
    for name, ok in [("epochs", args.epochs >= 1), ("batch_size", args.batch_size >= 1),
                     ("lr", args.lr > 0), ("crop", args.crop >= 0), ("clip", args.clip >= 0),
                     ("milestones", all(0 < v < 1 for v in args.milestones)),
                     ("gamma", 0 < args.gamma <= 1), ("patience", args.patience >= 1),
                     ("early_stop", args.early_stop >= 1), ("eval_batch_size", args.eval_batch_size >= 1)]:
        if not ok:
            p.error(f"bad value for --{name.replace('_', '-')}: {getattr(args, name)}")
    try:
        args.model = HannunConfig(width=args.width, blocks=args.blocks, dropout=args.dropout)
    except ValueError as err:
        p.error(str(err))
    if args.crop and args.crop % args.model.stride:
        p.error(f"--crop must be a multiple of the output stride {args.model.stride}")
    args.out = Path(args.out or f"results/dense/seed{args.seed}")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def prepare_run(run_dir: Path, flags: dict, data: Path) -> dict:
    """Write (or check) ``config.json``: the flags, code version and data fingerprint.

    A run folder made with other flags or other data is refused rather than mixed.
    """
    record = {"flags": flags, "data_fingerprint": sha256_of(data / "records.csv")[:16] + "-"
              + sha256_of(data / "samples.i16d.xz")[:16]}
    path = run_dir / CONFIG
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old["flags"].get(k), v) for k, v in flags.items()
                if k not in RESUME_NEUTRAL and old["flags"].get(k) != v}
        if diff:
            raise SystemExit(f"error: {run_dir} was started with other flags: "
                             + ", ".join(f"--{k.replace('_', '-')} {a!r} (now {b!r})"
                                         for k, (a, b) in diff.items())
                             + "; use another --out or delete the folder")
        if old["data_fingerprint"] != record["data_fingerprint"]:
            raise SystemExit(f"error: {run_dir} was trained on other data than {data} "
                             f"({old['data_fingerprint']} vs {record['data_fingerprint']})")
        return old
    run_dir.mkdir(parents=True, exist_ok=True)
    record["code_version"] = code_version()
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = Path(args.data)
    try:
        ds = load_dataset(data)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
             if k not in ("model", "out")}
    flags["model"] = asdict(args.model)
    run_dir = args.out
    prepare_run(run_dir, flags, data)
    if (run_dir / METRICS).is_file():
        print(f"{run_dir} is finished; its metrics:")
        print_metrics(json.loads((run_dir / METRICS).read_text()))
        return
    cfg = config_from_args(args)
    device = resolve_device(args.device)
    bf16 = use_bf16(args.amp, device)
    torch.manual_seed(cfg.seed)
    model = HannunNet(cfg.model).to(device)
    if not (run_dir / INIT).is_file():
        atomic_save(model.state_dict(), run_dir / INIT)
    model.load_state_dict(torch.load(run_dir / INIT, map_location=device, weights_only=True))
    if not args.quiet:
        print(f"{count_parameters(model):,} parameters, {device}, {'bf16' if bf16 else 'fp32'}, "
              f"{len(ds.indices('train'))} train / {len(ds.indices('val'))} val records")
    history = train(model, ds, cfg, run_dir, device, bf16, args.checkpoint_minutes, quiet=args.quiet)
    norm = Normalizer.fit(ds, ds.indices("train"))
    batcher = Batcher(ds, norm, model.cfg.stride, device)
    t0 = time.perf_counter()
    results = {split: evaluate(model, batcher, ds, split, cfg, bf16) for split in ("val", "test")}
    eval_seconds = time.perf_counter() - t0
    train_seconds = sum(h["train_seconds"] for h in history)
    results.update({
        "parameters": count_parameters(model), "device": str(device), "bf16": bf16,
        "epochs_run": len(history), "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(len(history), 1),
        "train_records_per_second": float(np.mean([h["records_per_second"] for h in history])),
        "eval_records_per_second": (len(ds.indices("val")) + len(ds.indices("test"))) / eval_seconds,
        "normalizer": asdict(norm), "code_version": code_version()})
    atomic_save(model.state_dict(), run_dir / FINAL)
    write_history(history, run_dir / HISTORY)
    atomic_write_text(json.dumps(results, indent=2) + "\n", run_dir / METRICS)
    print_metrics(results)


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
