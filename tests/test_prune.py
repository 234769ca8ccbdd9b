"""prune.py: which weights are pruned, how many, and that pruned weights stay exactly zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prune as pm
import train as tr
from build_datasets import load_dataset
from model import HannunConfig, HannunNet


def small_net(seed: int = 0) -> HannunNet:
    torch.manual_seed(seed)
    return HannunNet(HannunConfig(width=0.125))


def test_every_conv1d_and_the_linear_layer_are_pruned_but_not_biases_or_bn() -> None:
    model = small_net()
    masks = pm.magnitude_prune(model, pm.full_masks(model), 0.5, scope="layerwise")
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv1d)}
    assert len(convs) == 33 and set(masks) == convs | {"head"}
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == model.get_submodule(name).weight.shape
        assert m.sum() == m.numel() - round(0.5 * m.numel()), name  # every layer lost weights
    assert not any(n.endswith("bias") or "bn" in n for n in masks)


def test_global_pruning_removes_the_smallest_magnitudes_exactly() -> None:
    model = small_net()
    full = pm.full_masks(model)
    masks = pm.magnitude_prune(model, full, 0.3)
    alive, total = pm.count(masks)
    assert total - alive == round(0.3 * total)
    weights = pm.prunable_weights(model)
    kept = torch.cat([weights[n].detach().abs()[m] for n, m in masks.items()])
    dropped = torch.cat([weights[n].detach().abs()[~m] for n, m in masks.items()])
    assert dropped.max() <= kept.min()
    # the next round removes 30 % of the survivors, not of the original weights
    again = pm.magnitude_prune(model, masks, 0.3)
    assert pm.count(again)[0] == alive - round(0.3 * alive)
    assert all(torch.equal(again[n] & ~masks[n], torch.zeros_like(masks[n])) for n in masks)  # never revived


def test_layer_overrides_and_dense_layers() -> None:
    model = small_net()
    masks = pm.full_masks(model, dense_layers=("stem",))
    assert "stem" not in masks
    new = pm.magnitude_prune(model, masks, 0.4, layer_fractions={"head": 0.2})
    head = new["head"]
    assert head.numel() - head.sum() == round(0.2 * head.numel())
    with pytest.raises(ValueError, match="not in the model"):
        pm.full_masks(model, dense_layers=("nope",))
    with pytest.raises(ValueError, match="unpruned or unknown"):
        pm.magnitude_prune(model, masks, 0.4, layer_fractions={"stem": 0.1})
    with pytest.raises(ValueError):
        pm.magnitude_prune(model, masks, 1.0)


def test_random_masks_keep_each_layers_sparsity() -> None:
    model = small_net()
    masks = pm.magnitude_prune(model, pm.full_masks(model), 0.8)
    rand = pm.random_masks_like(masks, seed=1)
    for n in masks:
        assert rand[n].sum() == masks[n].sum()
    assert any(not torch.equal(rand[n], masks[n]) for n in masks if 0 < masks[n].sum() < masks[n].numel())
    assert all(torch.equal(rand[n], pm.random_masks_like(masks, seed=1)[n]) for n in masks)


def test_pruned_weights_stay_exactly_zero_under_adam_weight_decay_and_clipping(tiny_data: Path,
                                                                              tmp_path: Path) -> None:
    ds = load_dataset(tiny_data)
    cfg = tr.TrainConfig(epochs=1, batch_size=16, lr=1e-2, weight_decay=1e-2, clip=0.5, crop=1024,
                         model=HannunConfig(width=0.125))
    model = small_net()
    masks = pm.magnitude_prune(model, pm.full_masks(model), 0.9)
    masked = pm.MaskedModel(model, masks)
    weights = pm.prunable_weights(model)
    before = {n: w.detach().clone() for n, w in weights.items()}
    checked = []

    def check(m: nn.Module, step: int) -> None:
        masked.after_step(m, step)
        for n, mask in masks.items():
            assert not weights[n][~mask].any(), (n, step)
            assert weights[n].grad is not None and not weights[n].grad[~mask].any(), (n, step)
        checked.append(step)

    tr.train(model, ds, cfg, tmp_path, torch.device("cpu"), bf16=False, after_step=check, quiet=True)
    assert checked == list(range(1, 7))
    assert any(not torch.equal(before[n][masks[n]], weights[n][masks[n]]) for n in masks)  # it did train


def test_goal_schedule_rules() -> None:
    assert pm.rounds_to_reach(142, 0.2) == 23
    model = small_net()
    masks = pm.full_masks(model)
    alive, total = pm.count(masks)
    # the last round is cut so that the target is met exactly, not overshot
    masks = pm.magnitude_prune(model, masks, 0.9)
    f = pm.fraction_to_reach(masks, 0.5, target_ratio=12.0)
    assert f < 0.5
    assert pm.compression_ratio(pm.magnitude_prune(model, masks, f)) == pytest.approx(12.0, rel=1e-3)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_schedule_lands_on_the_target_without_extra_rounds(scope: str) -> None:
    """Rounding must neither stall just short of the target nor cost an extra round for a
    handful of weights: 0.5 per round to 64x is 6 rounds, and the ratio is >= 64x."""
    model = small_net()
    masks = pm.full_masks(model)
    rounds = 0
    while not pm.reached(masks, 64.0):
        masks = pm.magnitude_prune(model, masks, pm.fraction_to_reach(masks, 0.5, 64.0), scope)
        rounds += 1
        assert rounds <= 7
    assert pm.compression_ratio(masks) >= 64.0 - 1e-9
    assert rounds == pm.rounds_to_reach(64.0, 0.5) == 6
    # accept within tolerance of dense; otherwise retry at fraction / alpha
    rule = dict(dense_f1=0.80, tolerance=0.01, alpha=2, min_fraction=0.01)
    assert pm.next_fraction(0.2, val_f1=0.7921, **rule) == (True, 0.2)  # bar: 0.80 * 0.99 = 0.792
    assert pm.next_fraction(0.2, val_f1=0.7919, **rule) == (False, 0.1)


def test_fanin_scope_ranks_weights_relative_to_their_init_scale() -> None:
    """At He initialisation every conv's weights, divided by their init scale, are alike: the
    fan-in scope keeps about the same share of each big layer (here 10 % +- 3 %), where
    global magnitude pruning keeps far more of the small-fan-in stem than of a late block."""
    model = small_net()
    fanin = pm.magnitude_prune(model, pm.full_masks(model), 0.9, scope="fanin")
    glob = pm.magnitude_prune(model, pm.full_masks(model), 0.9, scope="global")
    assert pm.count(fanin) == pm.count(glob)  # the same number pruned, allocated differently
    kept = {n: float(m.float().mean()) for n, m in fanin.items() if m.numel() >= 2000 and n != "head"}
    assert len(kept) >= 16 and all(0.07 < k < 0.13 for k in kept.values()), kept
    last = [n for n in glob if n != "head"][-1]
    assert glob["stem"].float().mean() > 3 * glob[last].float().mean()
    weights = pm.prunable_weights(model)  # the same cut by hand: in-channels x kernel for a conv
    scores = torch.cat([(w.abs() * (w.shape[1] * (w.shape[2] if w.dim() == 3 else 1)) ** 0.5).flatten()
                        for w in weights.values()])
    kept = torch.cat([fanin[n].flatten() for n in weights])
    assert scores[kept].min() >= scores[~kept].max()
    with pytest.raises(ValueError, match="scope must be one of global, layerwise, fanin, erk"):
        pm.magnitude_prune(model, fanin, 0.5, scope="random")


def test_erk_shares_survivors_by_the_layer_shape_and_keeps_full_layers_whole() -> None:
    """ERK keeps eps x (sum of a layer's dimensions) weights per layer, a layer the rule
    would overfill is kept whole (its excess shared by the rest), and the total is exact."""
    toy = {"a": torch.ones(4, 2, 3, dtype=torch.bool), "b": torch.ones(10, 10, 5, dtype=torch.bool),
           "c": torch.ones(3, 10, dtype=torch.bool)}
    few = pm.erk_counts(toy, 60)  # eps = 60 / (9 + 25 + 13): 11.5, 31.9, 16.6
    assert sum(few.values()) == 60 and few == {"a": 11, "b": 32, "c": 17}
    assert pm.erk_counts(toy, 400) == {"a": 24, "b": 346, "c": 30}  # a, then c, would overflow
    with pytest.raises(ValueError, match="cannot keep 555 of 554"):
        pm.erk_counts(toy, 555)
    model = small_net()
    once = pm.magnitude_prune(model, pm.full_masks(model), 0.9, scope="erk")
    twice = pm.magnitude_prune(model, once, 0.5, scope="erk", layer_fractions={"head": 0.25})
    alive, total = pm.count(once)
    assert alive == total - round(0.9 * total)
    head, rest = int(once["head"].sum()), alive - int(once["head"].sum())
    assert pm.count(twice)[0] == head - round(0.25 * head) + rest - round(0.5 * rest)
    assert all(bool((twice[n] <= once[n]).all()) for n in once)  # never regrows
    assert once["stem"].float().mean() > 4 * once["blocks.15.conv2"].float().mean()  # thin layers denser
    for name, w in pm.prunable_weights(model).items():  # within a layer: the largest magnitudes
        if 0 < once[name].sum() < once[name].numel():
            assert w.abs()[once[name]].min() >= w.abs()[~once[name]].max()


def test_sparsity_report() -> None:
    model = small_net()
    masks = pm.magnitude_prune(model, pm.full_masks(model), 0.5, scope="layerwise")
    report = pm.sparsity_report(masks)
    assert list(report.columns) == ["layer", "weights", "remaining", "sparsity"]
    assert len(report) == 34 and np.allclose(report["sparsity"], 0.5, atol=0.01)
