"""The ticket in bytes (issue 32 item 3): sizes checked against export_ticket.py's real file
and against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import export_ticket
import prune as pm
import ticket_bytes as tb
from model import HannunConfig, HannunNet

TINY = HannunConfig(width=0.125, blocks=4)


def test_the_ticket_file_is_sized_exactly_as_export_ticket_writes_it(tmp_path: Path) -> None:
    """A real network with a magnitude mask, exported: the sizing from per-layer counts (at
    other positions) gives the same number of bytes."""
    torch.manual_seed(1)
    model = HannunNet(TINY)
    masks = pm.magnitude_prune(model, pm.full_masks(model), 0.9)
    state = model.state_dict()
    real = export_ticket.save_ticket(export_ticket.ticket_arrays(TINY, state, masks, {"mean": 0.0, "std": 1.0},
                                                                 "fp32", ""), tmp_path / "t.npz")
    counts = {n: int(m.sum()) for n, m in masks.items()}
    size, entropy = tb.ticket_bytes(TINY, counts)
    assert size == real
    others = sum(v.numel() for k, v in state.items()
                 if k not in {f"{n}.weight" for n in counts} and not k.endswith("num_batches_tracked"))
    sizes = tb.layer_sizes(TINY)
    assert entropy == pytest.approx(4 * (sum(counts.values()) + others)
                                    + sum(tb.mask_entropy_bytes(sizes[n], k) for n, k in counts.items()))
    assert entropy < size


def test_mask_entropy_on_known_values() -> None:
    assert tb.mask_entropy_bytes(16, 8) == pytest.approx(2.0)  # 1 bit per weight
    assert tb.mask_entropy_bytes(16, 0) == 0 and tb.mask_entropy_bytes(16, 16) == 0
    # p = 1/4: H = 0.811278 bits
    assert tb.mask_entropy_bytes(800, 200) == pytest.approx(800 * 0.811278 / 8, rel=1e-5)


def test_dense_checkpoints_hold_the_weights_and_adams_two_moments() -> None:
    fp32, adam = tb.dense_bytes(TINY)
    model = HannunNet(TINY)
    floats = sum(v.numel() for k, v in model.state_dict().items() if v.is_floating_point())
    params = sum(p.numel() for p in model.parameters())
    tensors = len(model.state_dict())  # torch.save's zip costs < 1 kB per stored tensor
    assert 4 * floats < fp32 < 4 * floats + 1_000 * tensors
    assert 4 * (floats + 2 * params) < adam < 4 * (floats + 2 * params) + 3_000 * tensors


def test_a_byte_ratio_reads_back_as_a_weight_ratio() -> None:
    """At the weight ratio weight_ratio_at returns, the Adam checkpoint over the ticket file is
    the byte ratio asked for (to the bisection's step)."""
    ratio = tb.weight_ratio_at(TINY, 20.0, "bytes_dense_adam")
    total = sum(tb.layer_sizes(TINY).values())
    size = tb.ticket_bytes(TINY, tb.uniform_survivors(TINY, total / ratio))[0]
    assert tb.dense_bytes(TINY)[1] / size == pytest.approx(20.0, rel=0.01)
    assert tb.weight_ratio_at(TINY, 1e6, "bytes_dense_adam") == np.inf  # not even an empty ticket is that small


def test_byte_columns_from_run_folders(tmp_path: Path) -> None:
    """A dense run (no sparsity.csv: all weights) and a pruned round (its sparsity.csv)."""
    (tmp_path / "seed0" / "m" / "round_01").mkdir(parents=True)
    (tmp_path / "seed0" / "m" / "config.json").write_text(json.dumps({"flags": {"model": vars(TINY)}}))
    (tmp_path / "seed0" / "dense").mkdir()
    (tmp_path / "seed0" / "dense" / "config.json").write_text(json.dumps({"flags": {"model": vars(TINY)}}))
    sizes = tb.layer_sizes(TINY)
    kept = {n: s // 10 for n, s in sizes.items()}
    pd.DataFrame({"layer": list(kept), "weights": list(sizes.values()), "remaining": list(kept.values())}).to_csv(
        tmp_path / "seed0" / "m" / "round_01" / "sparsity.csv", index=False)
    table = pd.DataFrame({"folder": ["seed0/dense", "seed0/m/round_01"],
                          "remaining": [sum(sizes.values()), sum(kept.values())]})
    out = tb.add_byte_columns(tmp_path, table)
    assert list(out.columns[-4:]) == list(tb.BYTE_COLUMNS)
    assert out["bytes_ticket"].tolist() == [tb.ticket_bytes(TINY, sizes)[0], tb.ticket_bytes(TINY, kept)[0]]
    assert (out["bytes_dense_fp32"] == tb.dense_bytes(TINY)[0]).all()
    with pytest.raises(SystemExit, match="config.json"):
        tb.add_byte_columns(tmp_path, pd.DataFrame({"folder": ["nowhere/x"], "remaining": [1]}))
