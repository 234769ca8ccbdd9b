"""Batches of ECG records for training and evaluation, shared by train.py, train_together.py,
export_ticket.py and stability.py.

``Normalizer`` z-scores with the training records' mean and std; ``Batcher`` makes device
tensors for a batch of records (padded to the output stride, optionally cropped);
``window_cuts`` is the rule that cuts records into windows of the training length;
``length_buckets`` groups records of similar length; ``masked_step_loss`` is the loss over
each record's valid output steps, which the Batcher counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from build_datasets import ECGDataset


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
    to a random window of ``crop`` samples (a CPU-scale speed option); ``windows`` cuts
    records into consecutive windows of that length for evaluation on the training length.
    """

    def __init__(self, ds: ECGDataset, norm: Normalizer, stride: int, device: torch.device):
        self.signals = torch.from_numpy(ds.signals).to(device)
        self.lengths = torch.tensor(ds.lengths, device=device)
        self.labels = torch.tensor(ds.labels, device=device)
        self.norm, self.stride, self.device = norm, stride, device
        self.host_lengths = ds.lengths

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host array on the device without a host synchronisation: a copy from pageable
        memory waits for the GPU's queue to drain, one from pinned memory does not."""
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def __call__(self, idx: np.ndarray, crop: int = 0, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self.host_lengths[idx]
        if crop:
            starts = rng.integers(0, np.maximum(lengths - crop, 0) + 1)
            lengths = np.minimum(lengths, crop)
        else:
            starts = np.zeros(len(idx), dtype=np.int64)
        return self.gather(idx, starts, lengths, self.stride * math.ceil(lengths.max() / self.stride))

    def windows(self, idx: np.ndarray, window: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Records ``idx`` cut into consecutive windows of ``window`` samples, how a network
        trained on windows of that length (``--crop``) reads a record it was not trained on:
        ``x [W, 1, window]`` (a shorter last window zero-padded, as short records are in
        training), each window's valid output steps, and each window's position in ``idx``.
        A last piece shorter than one output step is dropped (its one step would be nearly
        all padding), except a record's first."""
        owner, starts, pieces = window_cuts(self.host_lengths[idx], window, self.stride)
        x, _, steps = self.gather(idx[owner], starts, pieces, window)
        return x, steps, owner

    def gather(self, idx: np.ndarray, starts: np.ndarray, lengths: np.ndarray, L: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lengths[i]`` samples of record ``idx[i]`` from ``starts[i]``, z-scored, zero to
        ``L``; their labels; their valid output steps (at least one)."""
        cols = self.to_device(starts)[:, None] + torch.arange(L, device=self.device)
        rows = self.to_device(idx)[:, None]
        x = self.signals[rows, cols.clamp_(max=self.signals.shape[1] - 1)]
        n = self.to_device(lengths)
        inside = torch.arange(L, device=self.device) < n[:, None]
        x = torch.where(inside, (x.to(torch.get_default_dtype()) - self.norm.mean) / self.norm.std, 0.0)
        steps = torch.clamp(n // self.stride, min=1)
        return x[:, None, :], self.labels[rows[:, 0]], steps


def window_cuts(lengths: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How records of ``lengths`` samples are cut into consecutive windows of ``window``
    samples for scoring on the training length (Batcher.windows, predict.py --windows): per
    window, the position of its record in ``lengths``, its first sample and its number of
    samples (the last window of a record may be shorter). A last piece shorter than one
    output step (``stride``) is dropped, except a record's first: its one step would be
    nearly all padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = 1 + np.maximum(lengths - stride, 0) // window
    owner = np.repeat(np.arange(len(lengths)), counts)
    starts = window * (np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts))
    return owner, starts, np.minimum(lengths[owner] - starts, window)


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
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    per_step = labels[:, None].expand(B, T).reshape(B * T)  # the record's label at every step (no host sync)
    ce = F.cross_entropy(logits.reshape(B * T, C), per_step, reduction="none").reshape(B, T)
    valid = torch.arange(T, device=logits.device) < steps[:, None]
    return (ce * valid).sum() / valid.sum()
