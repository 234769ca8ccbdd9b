"""A ticket's size in bytes, as a user counts it, next to its ratio of weights (issue 32 item 3).

"142x smaller" can be a ratio of surviving weights or of file sizes, and the file sizes differ
by what is saved. For a network of a given configuration and the surviving weights of each
prunable layer this module gives:

  bytes_dense_fp32     the dense checkpoint a PyTorch user saves: ``torch.save(state_dict)``,
                       fp32 weights, biases and BatchNorm statistics (a pruned network saved
                       this way is no smaller: its zeros are stored)
  bytes_dense_adam     the same with Adam's state, as a training checkpoint is saved
                       (``{"model": state_dict, "optimizer": optimizer.state_dict()}``: the
                       weights and Adam's two moments, about 3x the weights; a Keras
                       ``model.save`` with its optimizer holds the same three tensors per weight)
  bytes_ticket         the compact fp32 export, exactly as export_ticket.py writes it
                       (``ticket_arrays`` + ``save_ticket``: the survivors, a bitmask or gap
                       index per layer, biases and BatchNorm, the JSON header)
  bytes_ticket_entropy the survivors (fp32) and the biases and BatchNorm, with each layer's
                       mask at its entropy, n H(k / n) bits: no index format can do better
                       for a mask about which nothing else is known

The survivors' positions are not kept in git (no masks), so the export is sized with the
same number of survivors per layer at random positions: the file size depends on the
positions only through the choice of a uint16 or uint32 gap index in a layer with more
than 65,536 weights, which random positions do not change at this project's densities.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import export_ticket
import prune as pm
import run_folders as rf
from model import HannunConfig, HannunNet

BYTE_COLUMNS = ("bytes_dense_fp32", "bytes_dense_adam", "bytes_ticket", "bytes_ticket_entropy")
UNITS = {"bytes_dense_fp32": "dense fp32 checkpoint", "bytes_dense_adam": "dense checkpoint with Adam's state"}
"""The dense files a byte ratio can divide by, with their names in tables."""


def _key(cfg: HannunConfig) -> tuple:
    return tuple(sorted(vars(cfg).items()))


@functools.lru_cache(maxsize=4)
def _network(key: tuple) -> tuple[HannunNet, dict[str, int]]:
    torch.manual_seed(0)
    model = HannunNet(HannunConfig(**dict(key)))
    return model, {n: w.numel() for n, w in pm.prunable_weights(model).items()}


@functools.lru_cache(maxsize=4)
def _dense(key: tuple) -> tuple[int, int]:
    model = HannunNet(HannunConfig(**dict(key)))
    plain = io.BytesIO()
    torch.save(model.state_dict(), plain)
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's moments exist only after a step
    full = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, full)
    return len(plain.getvalue()), len(full.getvalue())


def dense_bytes(cfg: HannunConfig) -> tuple[int, int]:
    """(fp32 checkpoint, checkpoint with Adam's state) of the dense network, in bytes."""
    return _dense(_key(cfg))


def layer_sizes(cfg: HannunConfig) -> dict[str, int]:
    """Weights per prunable layer, in the network's order."""
    return dict(_network(_key(cfg))[1])


def mask_entropy_bytes(n: int, k: int) -> float:
    """n H(k / n) / 8: the bytes of a mask of k survivors among n at its entropy."""
    if k <= 0 or k >= n:
        return 0.0
    p = k / n
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def ticket_bytes(cfg: HannunConfig, survivors: dict[str, int], seed: int = 0) -> tuple[int, float]:
    """(bytes of export_ticket.py's fp32 ticket file, bytes at the masks' entropy) of a network
    of ``cfg`` keeping ``survivors[layer]`` weights in each prunable layer (all of a layer
    that is not named)."""
    model, sizes = _network(_key(cfg))
    unknown = set(survivors) - set(sizes)
    if unknown:
        raise ValueError(f"no prunable layer named {', '.join(sorted(unknown))} in a width-{cfg.width} network")
    rng = np.random.default_rng(seed)
    masks = {}
    for name, n in sizes.items():
        k = int(survivors.get(name, n))
        if not 0 <= k <= n:
            raise ValueError(f"layer {name}: {k} survivors of {n} weights")
        flat = np.zeros(n, dtype=bool)
        flat[rng.choice(n, k, replace=False)] = True
        masks[name] = torch.from_numpy(flat).view(pm.prunable_weights(model)[name].shape)
    arrays = export_ticket.ticket_arrays(cfg, model.state_dict(), masks, {"mean": 0.0, "std": 1.0}, "fp32", "")
    with tempfile.TemporaryDirectory() as tmp:
        size = export_ticket.save_ticket(arrays, Path(tmp) / "ticket.npz")
    kept = sum(int(survivors.get(n, s)) for n, s in sizes.items())
    entropy = 4 * (kept + arrays["others"].size) + sum(mask_entropy_bytes(s, int(survivors.get(n, s)))
                                                       for n, s in sizes.items())
    return size, entropy


def uniform_survivors(cfg: HannunConfig, remaining: float) -> dict[str, int]:
    """``remaining`` weights spread over the prunable layers in proportion to their size
    (for a run whose per-layer counts are not on disk, e.g. a random-pruning control)."""
    sizes = layer_sizes(cfg)
    share = remaining / sum(sizes.values())
    return {n: min(s, round(s * share)) for n, s in sizes.items()}


def run_survivors(folder: Path, cfg: HannunConfig, remaining: float) -> dict[str, int]:
    """The run's surviving weights per layer (its sparsity.csv; spread uniformly when it has
    none, and all weights for a dense run)."""
    path = folder / "sparsity.csv"
    if path.is_file():
        table = pd.read_csv(path)
        return dict(zip(table["layer"], table["remaining"].astype(int), strict=True))
    return uniform_survivors(cfg, remaining)


def run_config(folder: Path) -> HannunConfig:
    """The network configuration of a run folder (its config.json or its parent's)."""
    config = next((p / rf.CONFIG for p in (folder, folder.parent) if (p / rf.CONFIG).is_file()), None)
    if config is None:
        raise SystemExit(f"error: no {rf.CONFIG} in {folder} or its parent: not a train.py run folder")
    try:
        return HannunConfig(**json.loads(config.read_text())["flags"]["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {config}: no network configuration ({type(e).__name__}: {e})") from e


def add_byte_columns(exp: Path, table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (rows of results.csv) with BYTE_COLUMNS added, one figure per row's folder."""
    cache: dict[tuple, tuple[int, float]] = {}
    rows = []
    for folder, remaining in zip(table["folder"], table["remaining"], strict=True):
        cfg = run_config(exp / folder)
        survivors = run_survivors(exp / folder, cfg, remaining)
        key = (_key(cfg), tuple(sorted(survivors.items())))
        if key not in cache:
            cache[key] = ticket_bytes(cfg, survivors)
        rows.append((*dense_bytes(cfg), *cache[key]))
    sizes = pd.DataFrame(rows, columns=list(BYTE_COLUMNS), index=table.index)
    return pd.concat([table.drop(columns=[c for c in BYTE_COLUMNS if c in table]), sizes], axis=1)


def weight_ratio_at(cfg: HannunConfig, byte_ratio: float, unit: str, entropy: bool = False) -> float:
    """The compression of the prunable weights (uniform density over the layers) at which the
    dense file ``unit`` (a BYTE_COLUMNS dense entry) over the compact ticket is ``byte_ratio``:
    how a ratio quoted in bytes reads in weights. inf when even no survivor is small enough."""
    dense = dict(zip(BYTE_COLUMNS[:2], dense_bytes(cfg), strict=True))[unit]
    target, total = dense / byte_ratio, sum(layer_sizes(cfg).values())

    def size(kept: float) -> float:
        return ticket_bytes(cfg, uniform_survivors(cfg, kept))[1 if entropy else 0]

    if size(0) > target:
        return math.inf
    if size(total) <= target:
        return 1.0
    low, high = 1.0, float(total)  # survivors, on a log scale: size(low) <= target < size(high)
    while high / low > 1.002:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if size(mid) <= target else (low, mid)
    return total / low
