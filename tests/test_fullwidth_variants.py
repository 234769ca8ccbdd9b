"""benchmarks/run_benchmarks.py's kernel/layout variants compute what model.py computes.

Compared in float64 (so only summation order can differ, ~1e-15): the logits, the loss's
gradient of every parameter and the BatchNorm running statistics, in training mode with
dropout on (the variants that keep the random draws), on a width-0.125 network and on every
conv shape of the full network.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.run_benchmarks import (
    DROPOUTS,
    VARIANTS,
    MaskDropout,
    RandDropout,
    VariantConv,
    VariantNet,
    max_pool_where,
)
from model import HannunConfig, HannunNet, SameConv1d, guard_bf16

NETWORK = {label: {k: v for k, v in kw.items() if k != "fused_adam"} for label, kw in VARIANTS.items()}
SAME_DRAWS = {label: kw for label, kw in NETWORK.items() if kw and kw.get("dropout") != "rand <"}
SAME_DRAWS["everything that keeps the draws"] = dict(pad_in_conv=True, channels_last=True, dropout="bool bernoulli",
                                                     pool="where")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout draws for both models
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("label", SAME_DRAWS)
@pytest.mark.parametrize("blocks", [4, 16])
def test_variant_network_matches_model_in_float64(label: str, blocks: int) -> None:
    variant = SAME_DRAWS[label]
    # nn.Dropout draws its mask in memory order, so on channels-last activations the same
    # draws land on other elements: there the layers are compared with dropout off (and with
    # it on through the bool mask, drawn in logical order, in the combined variant)
    cl_float_dropout = variant.get("channels_last") and variant.get("dropout", "float bernoulli") == "float bernoulli"
    cfg = HannunConfig(width=0.125, blocks=blocks, dropout=0.0 if cl_float_dropout else 0.2)
    torch.manual_seed(0)
    ref = HannunNet(cfg).double().train()
    var = VariantNet(cfg, **variant).double().train()
    var.load_state_dict(ref.state_dict())
    if variant.get("channels_last"):  # the weights kept as channels-last kernels, so no conv copies them
        assert all(m.weight.unsqueeze(2).is_contiguous(memory_format=torch.channels_last)
                   for m in var.modules() if isinstance(m, SameConv1d))
    x = torch.randn(3, 1, 2 * cfg.stride * 4, dtype=torch.float64)
    out_ref, grads_ref = run(ref, x)
    out_var, grads_var = run(var, x)
    assert out_var.shape == out_ref.shape
    assert relative(out_var, out_ref) < 1e-10
    assert grads_var.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        # a conv bias feeding BatchNorm has a zero gradient (BN takes the mean out): its
        # rounding noise is read against the same layer's weight gradient instead
        scale = max(g.norm(), grads_ref[name.rsplit(".", 1)[0] + ".weight"].norm())
        assert (grads_var[name] - g).norm() < 1e-10 * scale, name
    for (name, a), b in zip(ref.state_dict().items(), var.state_dict().values(), strict=True):
        if "running" in name or "num_batches" in name:
            assert torch.allclose(a, b, rtol=1e-10, atol=0), name


def full_network_conv_shapes() -> list[tuple[int, int, int]]:
    """(in channels, out channels, stride) of every distinct conv of the published network."""
    shapes = {(m.in_channels, m.out_channels, m.stride[0]) for m in HannunNet().modules()
              if isinstance(m, SameConv1d)}
    return sorted(shapes)


@pytest.mark.parametrize("shape", full_network_conv_shapes())
@pytest.mark.parametrize("layout", ["plain", "channels-last"])
@pytest.mark.parametrize("pad_in_conv", [False, True])
def test_variant_conv_matches_at_full_network_shapes(shape: tuple[int, int, int], layout: str,
                                                      pad_in_conv: bool) -> None:
    c_in, c_out, stride = shape
    torch.manual_seed(0)
    ref = SameConv1d(c_in, c_out, 16, stride).double()
    var = SameConv1d(c_in, c_out, 16, stride).double()
    var.load_state_dict(ref.state_dict())
    var.__class__, var.pad_in_conv = VariantConv, pad_in_conv
    x = torch.randn(2, c_in, 48, dtype=torch.float64)
    results = []
    for conv, inp in ((ref, x), (var, x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
                                 if layout == "channels-last" else x)):
        inp = inp.clone().requires_grad_()
        y = conv(inp)
        y = y.squeeze(2) if y.dim() == 4 else y
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        results.append((y.detach(), *torch.autograd.grad(y, (inp, conv.weight, conv.bias), g)))
    (y_ref, *g_ref), (y_var, *g_var) = results
    assert y_var.shape == y_ref.shape == (2, c_out, 48 // stride)
    assert relative(y_var, y_ref) < 1e-10
    for a, b in zip(g_var, g_ref, strict=True):
        assert relative(a.reshape(b.shape), b) < 1e-10


def test_guarded_variant_conv_runs_fp32_under_autocast() -> None:
    """A conv that bf16 gets wrong stays fp32 in the variants too (train.py's guard)."""
    net = VariantNet(HannunConfig(width=0.125, blocks=2), pad_in_conv=True, channels_last=True)
    guard_bf16(net, ["blocks.0.conv2"])
    seen = {}
    for name in ("blocks.0.conv1", "blocks.0.conv2"):
        net.get_submodule(name).register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, y.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 1, 64))
    assert seen == {"blocks.0.conv1": torch.bfloat16, "blocks.0.conv2": torch.float32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.2, 0.3, 0.5])
def test_bool_mask_dropout_is_f_dropout_bit_for_bit(dtype: torch.dtype, p: float) -> None:
    """Same draws, same scaling, same gradient and the same RNG state afterwards, also for a
    channels-last input (the mask is drawn in logical order)."""
    x = torch.randn(4, 8, 1, 300, dtype=dtype)
    outs = []
    for layer, inp in ((torch.nn.Dropout(p), x), (MaskDropout(p), x),
                       (MaskDropout(p), x.contiguous(memory_format=torch.channels_last))):
        inp = inp.clone().requires_grad_()
        torch.manual_seed(3)
        y = layer(inp)
        (grad,) = torch.autograd.grad(y, inp, torch.arange(y.numel(), dtype=dtype).reshape(y.shape))
        outs.append((y.detach(), grad, torch.rand(4)))
    for out in outs[1:]:
        for a, b in zip(out, outs[0], strict=True):
            assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())  # bit for bit, zeros' signs too
    assert torch.equal(MaskDropout(p).eval()(x), x)


def test_rand_dropout_keeps_probability_and_scale_but_not_the_draws() -> None:
    p, n = 0.2, 1_000_000
    x = torch.ones(n)
    torch.manual_seed(0)
    y = RandDropout(p)(x)
    torch.manual_seed(0)
    reference = F.dropout(x, p, True)
    kept = y != 0
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(kept.sum()) - n * (1 - p)) < 5 * sigma
    assert torch.equal(y[kept], torch.full_like(y[kept], float(reference.max())))  # F.dropout's 1 / (1 - p)
    assert not torch.equal(y, reference)  # other draws: a run with it is not the same run
    assert set(DROPOUTS) == {"float bernoulli", "bool bernoulli", "rand <"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_where_pool_is_max_pool_bit_for_bit_with_ties(channels_last: bool) -> None:
    """Values and gradient, ties included (bf16 activations tie often): a tie's gradient goes to
    the first sample in both."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 1, 31).round(decimals=1)  # many ties; odd length: the last sample dropped
    x[..., 4] = x[..., 5]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for pool in (lambda t: F.max_pool2d(t, (1, 2)), lambda t: max_pool_where(t, 2)):
        inp = x.clone().requires_grad_()
        y = pool(inp)
        g = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)
        results.append((y.detach(), *torch.autograd.grad(y, inp, g)))
    assert (x[..., 0:30:2] == x[..., 1:30:2]).any()  # the test has ties
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="stride 2"):
        max_pool_where(x, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_adam_matches_the_default_cpu_adam(dtype: torch.dtype) -> None:
    """The fused CPU Adam takes the default Adam's steps (float64: 1e-10; float32: rounding)."""
    shapes = [(32, 16, 16), (32,), (4, 256)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, s in enumerate(shapes)]
    params = {fused: [s.clone().requires_grad_() for s in start] for fused in (False, True)}
    opts = {fused: torch.optim.Adam(ps, lr=1e-3, fused=fused or None) for fused, ps in params.items()}
    for step in range(5):
        for fused in (False, True):
            for i, p in enumerate(params[fused]):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i), dtype=dtype)
            opts[fused].step()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-6
    for a, b, s in zip(params[True], params[False], start, strict=True):
        assert relative(a.detach() - s, b.detach() - s) < tolerance  # the updates agree, not just the weights


@pytest.mark.parametrize("label", ["channels-last + bool mask + fused Adam", "shortcut max-pool as where(a >= b)",
                                   "channels-last + padding inside the conv"])
def test_masked_training_steps_match_model_in_float64(label: str) -> None:
    """Three masked steps as train.py takes them (train_step, then the masks re-applied): the
    variant ends on model.py's weights, and its pruned weights stay zero."""
    import prune as pm  # noqa: PLC0415
    import train as tr  # noqa: PLC0415

    variant = dict(VARIANTS[label])
    fused = variant.pop("fused_adam", False)
    if variant.get("channels_last") and variant.get("dropout") is None:
        variant["dropout"] = "bool bernoulli"  # the same draws on the same elements (see above)
    cfg = HannunConfig(width=0.125, blocks=6)
    torch.manual_seed(0)
    ref = HannunNet(cfg).double()
    var = VariantNet(cfg, **variant).double()
    var.load_state_dict(ref.state_dict())
    masks = {n: torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.3
             for n, w in pm.prunable_weights(ref).items()}
    x = torch.randn(4, 1, 256, dtype=torch.float64)
    y, steps = torch.tensor([0, 1, 2, 3]), torch.tensor([32, 32, 20, 10])
    for model, fused_adam in ((ref, False), (var, fused)):
        masked = pm.MaskedModel(model, masks)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None)
        torch.manual_seed(5)
        for _ in range(3):
            tr.train_step(model.train(), opt, x, y, steps, 1.0, False)
            masked.apply()
    for name, w in pm.prunable_weights(var).items():
        assert not w[~masks[name]].any(), name
    convs = {n for n, m in ref.named_modules() if isinstance(m, SameConv1d)}
    for (name, a), b in zip(ref.state_dict().items(), var.state_dict().values(), strict=True):
        if name.endswith(".bias") and name.rsplit(".", 1)[0] in convs:
            # a conv bias feeding BatchNorm has a zero gradient up to rounding (~1e-17), which Adam
            # scales up to steps of ~lr: in model.py too, these biases walk on rounding noise
            assert (b - a).abs().max() < 1e-2 * 1e-3 * 3, name
        elif "running" in name:  # the running means follow those biases
            assert torch.allclose(b, a, rtol=1e-10, atol=1e-9), name
        else:
            assert relative(b.double(), a.double()) < 1e-10 or torch.equal(a, b), name
