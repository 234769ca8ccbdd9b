"""K tickets trained together equal the same tickets trained one by one by train.train."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import batching
import prune as pm
import train as tr
from build_datasets import load_dataset
from model import HannunConfig, HannunNet
from train_together import train_together


@pytest.fixture
def float64() -> Iterator[None]:
    """Float64 throughout: in float32, Adam (which divides by sqrt(v)) amplifies rounding
    differences in tiny gradients (grouped vs single convolutions, thread counts) into
    steps of ~lr, which hides real differences; in float64 the two paths must agree tightly."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_k_tickets_together_match_one_by_one(tiny_data: Path, tmp_path: Path, float64: None) -> None:
    ds = load_dataset(tiny_data)
    cfg = tr.TrainConfig(batch_size=16, crop=1024, weight_decay=1e-4,
                         model=HannunConfig(width=0.125, dropout=0.0))
    device = torch.device("cpu")
    batcher = batching.Batcher(ds, batching.Normalizer.fit(ds, ds.indices("train")), cfg.model.stride, device)
    starts, masks = [], []
    for seed, fraction in ((0, 0.5), (1, 0.8), (2, 0.0)):
        torch.manual_seed(seed)
        model = HannunNet(cfg.model)
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        masks.append(pm.magnitude_prune(model, pm.full_masks(model), fraction) if fraction else None)
    lr_fns = [lambda s: 1e-3, lambda s: 3e-3 if s < 5 else 3e-4, lambda s: 2e-3]
    steps = 9  # more than one epoch (6 batches per epoch): the second epoch's order too

    together = [HannunNet(cfg.model) for _ in starts]
    for model, start in zip(together, starts, strict=True):
        model.load_state_dict(start)
    train_together(together, masks, lr_fns, ds, cfg, steps, device, False, batcher, salt=7)

    for i, (start, mask, lr_fn) in enumerate(zip(starts, masks, lr_fns, strict=True)):
        alone = HannunNet(cfg.model)
        alone.load_state_dict(start)
        hook = pm.MaskedModel(alone, mask).after_step if mask is not None else None
        (tmp_path / str(i)).mkdir()
        tr.train(alone, ds, cfg, tmp_path / str(i), device, bf16=False, after_step=hook, quiet=True,
                 total_steps=steps, lr_fn=lr_fn, salt=7, batcher=batcher)
        got = together[i].state_dict()
        # Conv biases feed straight into BatchNorm, which removes them: their true gradient
        # is 0, what Adam sees is rounding noise (normalised up to ~lr even in float64), so
        # they and the running means that absorb them are left out; the pair cancels in
        # eval, which the logits below check.
        convs = {n for n, m in alone.named_modules() if isinstance(m, torch.nn.Conv1d)}
        for name, value in alone.state_dict().items():
            if (name.rsplit(".", 1)[0] in convs and name.endswith("bias")) or name.endswith("running_mean"):
                continue
            if value.is_floating_point():
                moved = (value - start[name]).abs().max()
                err = (got[name] - value).abs().max()
                assert err <= 1e-6 * moved + 1e-9, (i, name, float(err), float(moved))
            else:
                assert torch.equal(got[name], value), (i, name)
        if mask is not None:
            for name, w in pm.prunable_weights(together[i]).items():
                assert not w[~mask[name]].any(), (i, name)
        assert not torch.equal(got["stem.weight"], start["stem.weight"])  # it did train
        x = torch.randn(4, 1, 2048, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = alone.eval()(x), together[i].eval()(x)
        assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (i, float((a - b).abs().max()))
