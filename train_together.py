"""Train K tickets of one architecture at once, in one process (torch.func + vmap).

At one pruning round the methods (and seeds) are independent trainings of the same network.
Stacking their weights and mapping one forward/backward over the stack turns K small
trainings into one wider one (vmap makes each convolution a grouped convolution), which
pays where a single small network leaves the hardware idle (per-op overhead on CPU, an
under-filled GPU).

Each ticket keeps its own start weights, mask, Adam state, gradient-norm clipping and LR
schedule; all K see the same batches (the batch order and crops of ``salt``). With dropout
off, the result equals training the K tickets one by one with ``train.train`` on the same
batches, within float tolerance (tested); with dropout on, each ticket draws its own
dropout masks, from a different random stream than a sequential run.

Not yet used by run_experiments.py: this is the building block and its measurement,
``python train_together.py`` (K = 1, 2, 4, 6 tickets, together vs one by one with
train.train's step).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

import batching
import prune as pm
import train as tr
from build_datasets import ECGDataset
from model import HannunConfig, HannunNet, bf16_faulty_convs, guard_bf16


def train_together(models: list[HannunNet], masks: list[pm.Masks | None], lr_fns: list[Callable[[int], float]],
                   ds: ECGDataset, cfg: tr.TrainConfig, total_steps: int, device: torch.device, bf16: bool,
                   batcher: batching.Batcher, salt: int = 0) -> list[float]:
    """Train ``models`` in place, together, for ``total_steps`` steps of the shared batch
    sequence; model k is masked by ``masks[k]`` (None: dense) and follows ``lr_fns[k]``.
    Returns the last step's loss of each model."""
    k_models = len(models)
    if not (k_models == len(masks) == len(lr_fns)) or k_models == 0:
        raise ValueError("models, masks and lr_fns must be non-empty lists of the same length")
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    names = list(params)
    weight_masks = {}
    for name in names:
        module = name.rsplit(".", 1)[0]
        if name.endswith("weight") and any(m is not None and module in m for m in masks):
            weight_masks[name] = torch.stack([
                (m[module] if m is not None and module in m else torch.ones_like(params[name][0], dtype=torch.bool))
                .to(device).to(params[name].dtype) for m in masks])
    with torch.no_grad():
        for name, m in weight_masks.items():
            params[name].mul_(m)

    def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    forward = vmap(one, in_dims=(0, 0, None), randomness="different")
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    train_idx = ds.indices("train")
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    step, losses = 0, torch.zeros(k_models)
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        rng = np.random.default_rng([cfg.seed, salt, epoch])
        batches = batching.length_buckets(ds.lengths, train_idx, cfg.batch_size, rng)
        for b, batch in enumerate(batches[:total_steps - step]):
            x, y, n_steps = batcher(batch, cfg.crop, np.random.default_rng([cfg.seed, salt, epoch, b]))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = forward(params, buffers, x)  # [K, B, T, C]
            losses = torch.stack([batching.masked_step_loss(logits[i], y, n_steps) for i in range(k_models)])
            grads = torch.autograd.grad(losses.sum(), [params[n] for n in names])
            grads = dict(zip(names, grads, strict=True))
            for name, m in weight_masks.items():
                grads[name] = grads[name] * m
            if cfg.clip > 0:  # per model, as clip_grad_norm_ does for one
                norms = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads.values()))
                coef = torch.clamp(cfg.clip / (norms + 1e-6), max=1.0)
            lr = torch.tensor([f(step) for f in lr_fns], device=device)
            step += 1
            with torch.no_grad():
                for name in names:
                    p, g = params[name], grads[name]
                    shape = (k_models,) + (1,) * (p.dim() - 1)
                    if cfg.clip > 0:
                        g = g * coef.view(shape).to(g.dtype)
                    if cfg.weight_decay:
                        g = g + cfg.weight_decay * p
                    exp_avg[name].lerp_(g, 1 - beta1)
                    exp_avg_sq[name].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (exp_avg_sq[name].sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                    p.addcdiv_(exp_avg[name], denom * (1 - beta1 ** step) / lr.view(shape), value=-1.0)
                for name, m in weight_masks.items():
                    params[name].mul_(m)
            if step >= total_steps:
                break
    with torch.no_grad():
        for i, model in enumerate(models):
            model.load_state_dict({**{n: p[i] for n, p in params.items()}, **{n: b[i] for n, b in buffers.items()}})
    return losses.detach().tolist()


# --------------------------------------------------------------------------- measurement


def train_one_by_one(model: HannunNet, masks: pm.Masks, ds: ECGDataset, cfg: tr.TrainConfig, steps: int,
                     bf16: bool, batcher: batching.Batcher) -> None:
    """The sequential baseline: exactly train.train's step (torch.optim.Adam, clipping,
    MaskedModel), on the same batches, without its evaluation and checkpoints."""
    masked = pm.MaskedModel(model, masks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_idx = ds.indices("train")
    batches = batching.length_buckets(ds.lengths, train_idx, cfg.batch_size, np.random.default_rng([cfg.seed, 0, 0]))
    model.train()
    for b, batch in enumerate(batches[:steps]):
        x, y, n_steps = batcher(batch, cfg.crop, np.random.default_rng([cfg.seed, 0, 0, b]))
        tr.train_step(model, opt, x, y, n_steps, cfg.clip, bf16)
        masked.apply()
    masked.remove()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure K tickets trained together vs one by one (records/s).")
    p.add_argument("--data", default="data/cinc2017")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--crop", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement (at most one epoch)")
    p.add_argument("--ks", default="1,2,4,6")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"])
    args = p.parse_args(argv)
    from build_datasets import load_dataset  # noqa: PLC0415
    ds = load_dataset(args.data)
    device = torch.device("cpu")
    bf16 = tr.use_bf16(args.amp, device)
    cfg = tr.TrainConfig(batch_size=args.batch_size, crop=args.crop,
                         model=HannunConfig(width=args.width, blocks=args.blocks))
    batcher = batching.Batcher(ds, batching.Normalizer.fit(ds, ds.indices("train")), cfg.model.stride, device)
    masks = pm.magnitude_prune(HannunNet(cfg.model), pm.full_masks(HannunNet(cfg.model)), 0.9)
    print(f"width {args.width}, {args.blocks} blocks, batch {args.batch_size} x {args.crop} samples, "
          f"{'bf16' if bf16 else 'fp32'}, {torch.get_num_threads()} threads, {args.steps} steps per ticket")
    faulty = []
    if bf16:  # the layers PyTorch's bf16 conv gets wrong run in fp32, as in train.py
        probe = batcher(ds.indices("train")[:4], cfg.crop, np.random.default_rng(0))[0]
        faulty = bf16_faulty_convs(HannunNet(cfg.model), probe)
    for k in [int(v) for v in args.ks.split(",")]:
        models = [HannunNet(cfg.model) for _ in range(k)]
        for model in models:
            guard_bf16(model, faulty)
        train_one_by_one(models[0], masks, ds, cfg, 2, bf16, batcher)  # warm-up
        t0 = time.perf_counter()
        for model in models:
            train_one_by_one(model, masks, ds, cfg, args.steps, bf16, batcher)
        alone = time.perf_counter() - t0
        train_together(models, [masks] * k, [lambda s: 1e-3] * k, ds, cfg, 2, device, bf16, batcher)  # warm-up
        t0 = time.perf_counter()
        train_together(models, [masks] * k, [lambda s: 1e-3] * k, ds, cfg, args.steps, device, bf16, batcher)
        together = time.perf_counter() - t0
        records = k * args.steps * args.batch_size
        print(f"K={k}: one by one {records / alone:.0f} rec/s, together {records / together:.0f} rec/s, "
              f"speed-up {alone / together:.2f}x", flush=True)


if __name__ == "__main__":
    main()
