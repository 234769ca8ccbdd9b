"""Unstructured magnitude pruning of the conv and linear weights, with boolean masks.

What is pruned: the weight of every ``nn.Conv1d`` and ``nn.Linear`` (not biases, not
BatchNorm), except layers named in ``dense_layers``. ``Conv2d``-only tools silently prune
nothing in a 1D network; ``prunable_weights`` finds every ``Conv1d``, which a test checks.

How much per round: ``fraction`` of the weights still alive. ``scope="global"`` ranks all
pruned layers' surviving weights together by magnitude (one threshold); ``"layerwise"``
removes ``fraction`` of each layer; ``"fanin"`` ranks them together by |w| sqrt(fan-in),
the magnitude in units of the He initialisation's standard deviation (sqrt(2 / fan-in)),
so that a layer with a large fan-in, whose weights are born small, is not emptied first
for that reason alone (global magnitude pruning keeps 84 of the stem's 128 weights at 142x
but a handful of a late convolution's 65,536); ``"erk"`` fixes each layer's share of the
survivors in advance by the Erdos-Renyi-Kernel rule (``erk_counts``) and cuts each layer by
magnitude to it. ``layer_fractions`` overrides the fraction of named
layers, which are then pruned on their own (e.g. the output layer at half rate, as
Frankle & Carbin did for their conv nets).

Masks are dicts ``{layer name: bool tensor}``; ``MaskedModel`` keeps pruned weights at
exactly zero: their gradients are zeroed during backward (so clipping and Adam see only the
live network) and the masks are re-applied after every optimizer step (so Adam's momentum
and weight decay cannot revive them).

The compression ratio is (prunable weights) / (surviving prunable weights), as in
Frankle & Carbin and LTH-ECG; biases and BatchNorm (0.09 % of the full network) are
reported separately.

The goal-driven schedule (LTH-ECG): prune ``fraction`` per round towards a target ratio,
never past it; when a round's validation F1 falls below ``dense_f1 * (1 - tolerance)``,
that round is discarded and redone from the previous round at ``fraction / alpha``; when
the fraction would fall below ``min_fraction`` the schedule stops (see ``next_fraction``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

Masks = dict[str, torch.Tensor]
SCOPES = ("global", "layerwise", "fanin", "erk")


def prunable_weights(model: nn.Module, dense_layers: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """{module name: weight} of every conv (1D, 2D, 3D) and linear layer not kept dense."""
    unknown = set(dense_layers) - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"dense layer(s) not in the model: {', '.join(sorted(unknown))}")
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name not in dense_layers}


def check_layer_names(model: nn.Module, dense_layers: tuple[str, ...], layer_fractions: dict[str, float]) -> None:
    """Refuse unknown names in the per-layer flags before any training (a typo would
    otherwise surface only at the first pruning step, after the dense training)."""
    weights = prunable_weights(model, dense_layers)  # raises for unknown dense layers
    unknown = set(layer_fractions) - set(weights)
    if unknown:
        raise ValueError(f"layer fraction for unpruned or unknown layer(s): {', '.join(sorted(unknown))} "
                         f"(prunable: {', '.join(list(weights)[:4])}, ...; `python model.py` lists them)")


def full_masks(model: nn.Module, dense_layers: tuple[str, ...] = ()) -> Masks:
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model, dense_layers).items()}


def magnitude_prune(model: nn.Module, masks: Masks, fraction: float, scope: str = "global",
                    layer_fractions: dict[str, float] | None = None) -> Masks:
    """New masks removing ``fraction`` of the surviving weights with the smallest |w|.

    Exactly ``round(fraction * alive)`` weights go in each pruning pool (ties broken by
    position; under ``"erk"`` the pool is all layers not named in ``layer_fractions``, split
    across them by ``erk_counts``), so the schedule's ratios are exact.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"pruning fraction must be in [0, 1), got {fraction}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    layer_fractions = layer_fractions or {}
    unknown = set(layer_fractions) - set(masks)
    if unknown:
        raise ValueError(f"layer fraction for unpruned or unknown layer(s): {', '.join(sorted(unknown))}")
    weights = {n: w for n, w in prunable_weights(model).items() if n in masks}
    alive = {n: int(m.sum()) for n, m in masks.items()}
    rest = [n for n in masks if n not in layer_fractions]
    rest_alive = sum(alive[n] for n in rest)
    # pools: (layers ranked together, how many of their survivors go)
    pools = [([n], round(f * alive[n])) for n, f in layer_fractions.items()]
    if scope == "layerwise":
        pools += [([n], round(fraction * alive[n])) for n in rest]
    elif scope == "erk":
        keep = erk_counts({n: masks[n] for n in rest}, rest_alive - round(fraction * rest_alive))
        pools += [([n], alive[n] - keep[n]) for n in rest]
    else:
        pools += [(rest, round(fraction * rest_alive))]
    new = {n: m.clone() for n, m in masks.items()}
    for names, k in pools:
        if k == 0:
            continue
        scale = {n: math.sqrt(weights[n][0].numel()) if scope == "fanin" else 1.0 for n in names}
        scores = torch.cat([torch.where(masks[n], weights[n].detach().abs() * scale[n], math.inf).flatten().float()
                            for n in names])
        drop = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        drop[torch.topk(scores, k, largest=False, sorted=False).indices] = True
        for n, part in zip(names, drop.split([masks[n].numel() for n in names]), strict=True):
            new[n] &= ~part.view_as(masks[n])
    return new


def erk_counts(masks: Masks, keep: int) -> dict[str, int]:
    """Survivors per layer, ``keep`` in all, by Erdos-Renyi-Kernel (Evci et al. 2020, RigL):
    a layer's density is proportional to (sum of its weight's dimensions) / (their product),
    so thin layers (the stem, the output layer) stay denser than wide ones, by a rule set
    before training rather than by the weights' sizes. No layer keeps more than it has now
    (pruning never regrows): layers the rule would fill are kept whole and the rest share
    what is left; rounding goes to the largest remainders, so the total is exact."""
    alive = {n: int(m.sum()) for n, m in masks.items()}
    if not 0 <= keep <= sum(alive.values()):
        raise ValueError(f"cannot keep {keep} of {sum(alive.values())} surviving weights")
    raw = {n: float(sum(m.shape)) for n, m in masks.items()}  # density x size = eps x sum of dimensions
    full: set[str] = set()
    while True:
        free = [n for n in masks if n not in full]
        budget = keep - sum(alive[n] for n in full)
        eps = budget / sum(raw[n] for n in free) if free else 0.0
        over = {n for n in free if eps * raw[n] > alive[n]}
        if not over:
            break
        full |= over
    share = {n: float(alive[n]) if n in full else eps * raw[n] for n in masks}
    counts = {n: math.floor(s) for n, s in share.items()}
    short = keep - sum(counts.values())
    for n in sorted(share, key=lambda n: counts[n] - share[n])[:short]:
        counts[n] += 1
    return counts


def random_masks_like(masks: Masks, seed: int) -> Masks:
    """Random masks with exactly the same number of survivors in every layer (the
    random-pruning control)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in masks.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=gen)[:int(m.sum())]] = True
        out[name] = flat.view(m.shape).to(m.device)
    return out


class MaskedModel:
    """Binds masks to a model: zeroes pruned weights now, their gradients during backward,
    and the weights again after each optimizer step (``after_step``)."""

    def __init__(self, model: nn.Module, masks: Masks):
        self.weights = prunable_weights(model)
        missing = set(masks) - set(self.weights)
        if missing:
            raise ValueError(f"masks for layers not in the model: {', '.join(sorted(missing))}")
        device = next(model.parameters()).device
        self.masks = {n: m.to(device) for n, m in masks.items()}
        self.params = [self.weights[n] for n in self.masks]
        self.floats = [m.to(self.weights[n].dtype) for n, m in self.masks.items()]
        self.handles = [p.register_hook(lambda g, f=f: g * f) for p, f in zip(self.params, self.floats,
                                                                               strict=True)]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        torch._foreach_mul_(self.params, self.floats)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.apply()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def count(masks: Masks) -> tuple[int, int]:
    """(surviving, total) prunable weights."""
    return int(sum(m.sum() for m in masks.values())), int(sum(m.numel() for m in masks.values()))


def compression_ratio(masks: Masks) -> float:
    alive, total = count(masks)
    return total / max(alive, 1)


def sparsity_report(masks: Masks) -> pd.DataFrame:
    """Per-layer table: weights, surviving weights, sparsity."""
    rows = [{"layer": n, "weights": m.numel(), "remaining": int(m.sum())} for n, m in masks.items()]
    table = pd.DataFrame(rows)
    table["sparsity"] = 1 - table["remaining"] / table["weights"]
    return table


def ratio_key(compression: float | np.ndarray | pd.Series) -> float | np.ndarray | pd.Series:
    """A key equal for equal compression ratios as tables store them (log, 3 decimals):
    rounds of different seeds, or a ratio read back from a CSV, line up by it."""
    return np.round(np.log(compression), 3)


def target_alive(masks: Masks, target_ratio: float) -> int:
    """Survivors at ``target_ratio``: rounded down, so reaching it means at least that ratio."""
    return max(1, math.floor(count(masks)[1] / target_ratio))


def reached(masks: Masks, target_ratio: float) -> bool:
    return count(masks)[0] <= target_alive(masks, target_ratio)


def fraction_to_reach(masks: Masks, fraction: float, target_ratio: float) -> float:
    """``fraction``, or what reaches ``target_ratio`` exactly when that is less or only
    slightly more (within 1 % of the survivors): the last round lands on the target instead
    of leaving a handful of weights for one more, wasted round."""
    alive, _ = count(masks)
    goal = target_alive(masks, target_ratio)
    needed = 1 - goal / alive
    return max(0.0, needed) if alive * (1 - fraction) <= goal * 1.01 else fraction


def next_fraction(fraction: float, val_f1: float, dense_f1: float, tolerance: float, alpha: float,
                  min_fraction: float) -> tuple[bool, float]:
    """The over-pruning guard: (accept this round?, fraction for the next try).

    A round is accepted when ``val_f1 >= dense_f1 * (1 - tolerance)``; then the fraction is
    kept. Otherwise the round is rejected and retried at ``fraction / alpha``; a returned
    fraction below ``min_fraction`` means: stop.
    """
    if val_f1 >= dense_f1 * (1 - tolerance):
        return True, fraction
    return False, fraction / alpha


def rounds_to_reach(target_ratio: float, fraction: float) -> int:
    """Rounds of ``fraction`` needed to reach ``target_ratio`` (e.g. 142x at 0.2: 23)."""
    return math.ceil(np.log(target_ratio) / -np.log1p(-fraction))
