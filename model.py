"""The Hannun et al. (2019, Nature Medicine) 34-layer residual 1D CNN for single-lead ECG.

The architecture follows the authors' reference code (github.com/awni/ecg, network.py and
config.json): a first conv, then 16 residual blocks of two convs each (33 convs in all),
filter length 16, ``32 * 2**k`` filters with k increased every 4th block, subsampling by 2
in every other block, pre-activation BatchNorm-ReLU with dropout 0.2 before each block's
second conv, He-normal initialisation, then BatchNorm-ReLU and a linear layer applied at
every time step. With 16 blocks the network emits one prediction per 256 input samples.

Shortcuts carry no weights: a max-pool where the block subsamples, and zero-padded channels
where the block doubles its width. Convs use Keras' ``padding="same"`` (7 samples on the
left and 8 on the right for stride 1; 7 and 7 for stride 2 on even lengths), so a length
that is a multiple of the output stride maps exactly onto ``length / stride`` outputs.

``python model.py`` prints the parameters per layer, the total, the number of convs and the
output stride.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("N", "A", "O", "~")
"""Class order used everywhere: normal, atrial fibrillation, other rhythm, noisy."""


@dataclass(frozen=True)
class HannunConfig:
    """Size of the network. The defaults are the published network (10,466,148 parameters).

    ``width`` scales the number of filters (32 at width 1) for small CPU-scale variants;
    ``blocks`` below 16 gives a shallower network whose output stride is
    ``2 ** (blocks // 2)`` instead of 256.
    """

    num_classes: int = len(CLASSES)
    width: float = 1.0
    blocks: int = 16
    kernel_size: int = 16
    increase_channels_at: int = 4
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if not 1 <= self.blocks <= 16:
            raise ValueError(f"blocks must be in 1..16, got {self.blocks}")
        if self.kernel_size < 2 or self.kernel_size % 2:
            raise ValueError(f"kernel_size must be even and >= 2, got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    @property
    def start_filters(self) -> int:
        return max(1, round(32 * self.width))

    @property
    def stride(self) -> int:
        """Input samples per output step (256 for the published 16 blocks)."""
        return 2 ** (self.blocks // 2)


class SameConv1d(nn.Conv1d):
    """Conv1d with Keras ``padding="same"`` for an even kernel and stride 1 or 2.

    Stride 1 pads (k/2 - 1, k/2) explicitly (PyTorch's ``padding="same"`` makes the same
    copy, with a warning); stride 2 pads k/2 - 1 on both sides inside the conv, which keeps
    ``out = in / 2`` for even inputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        padding = 0 if stride == 1 else kernel_size // 2 - 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.same_pad = (kernel_size // 2 - 1, kernel_size // 2) if stride == 1 else None

    fp32_under_autocast = False
    """Set (per layer, by :func:`guard_bf16`) where bf16 autocast computes this layer wrongly:
    the layer then runs in fp32 inside an autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)
        if self.fp32_under_autocast and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ResidualBlock(nn.Module):
    """Pre-activation block: [BN-ReLU] conv(stride s) BN-ReLU-dropout conv, plus a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, first: bool, cfg: HannunConfig):
        super().__init__()
        # The very first block's input has just gone through the stem's BN-ReLU.
        self.bn1 = None if first else nn.BatchNorm1d(c_in)
        self.conv1 = SameConv1d(c_in, c_out, cfg.kernel_size, stride)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = SameConv1d(c_out, c_out, cfg.kernel_size, 1)
        self.stride = stride
        self.pad_channels = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.max_pool1d(x, self.stride) if self.stride > 1 else x
        if self.pad_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, self.pad_channels))
        if self.bn1 is not None:
            x = F.relu(self.bn1(x))
        x = self.conv1(x)
        x = self.conv2(self.dropout(F.relu(self.bn2(x))))
        return x + shortcut


class HannunNet(nn.Module):
    """Maps a batch of ECGs ``[B, 1, L]`` to per-step logits ``[B, L / stride, classes]``.

    Softmax is left to the loss (``cross_entropy``) and to the caller, as usual in PyTorch.
    """

    def __init__(self, cfg: HannunConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or HannunConfig()
        c = cfg.start_filters
        self.stem = SameConv1d(1, c, cfg.kernel_size, 1)
        self.stem_bn = nn.BatchNorm1d(c)
        blocks = []
        c_in = c
        for i in range(cfg.blocks):
            c_out = c * 2 ** (i // cfg.increase_channels_at)
            stride = 2 if i % 2 else 1
            blocks.append(ResidualBlock(c_in, c_out, stride, first=i == 0, cfg=cfg))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm1d(c_in)
        self.head = nn.Linear(c_in, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convs and Glorot-uniform linear with zero biases, as in the Keras original."""
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.head_bn(self.blocks(x)))
        return self.head(x.transpose(1, 2))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


RECORD_SAMPLES = 30 * 200
"""A 30-s record at 200 Hz: the unit of the FLOP counts reported everywhere."""


def output_positions(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """{name: output positions} of every Conv1d and Linear layer for the input ``x``: each
    weight is used once per output position, so FLOPs = 2 x positions x weights per layer."""
    positions: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def record(m: nn.Module, _: tuple, out: torch.Tensor) -> None:
            conv = isinstance(m, nn.Conv1d)
            positions[name] = out.shape[0] * out.shape[-1] if conv else out.numel() // m.out_features
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv1d, nn.Linear))]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return positions


def flops(positions: dict[str, int], weights: dict[str, int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolutions and linear layers, given each
    layer's output positions and its number of (non-zero) weights. BatchNorm, ReLU and
    pooling (under 1 % here) are left out."""
    return 2 * sum(positions[n] * weights[n] for n in positions)


def bf16_faulty_convs(model: nn.Module, x: torch.Tensor, tolerance: float = 0.05) -> list[str]:
    """Names of the conv layers that bf16 autocast computes wrongly on ``x``'s device.

    Why: on CPUs with AMX, PyTorch 2.13's oneDNN bf16 kernel for stride-1 conv1d with 4, 6,
    8 or 12 input channels returns outputs unrelated to the right ones (relative error ~1.0,
    measured 2026-11-27; fp32, and other channel counts, are right). The width-0.25 network's
    first four blocks have 8 channels, so every bf16 CPU run there trained a different,
    broken function. Each layer is checked on the input it really gets from ``x`` (an fp32
    forward pass in eval mode): the output, the input gradient and the weight gradient under
    bf16 autocast against fp32. bf16 rounding alone gives ~0.3 % relative error; a layer is
    faulty above ``tolerance``.
    """
    convs = {n: m for n, m in model.named_modules() if isinstance(m, SameConv1d)}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        return lambda m, args: inputs.__setitem__(name, args[0].detach())

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in convs.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            model(x.float())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    faulty = []
    for name, conv in convs.items():
        xin, flag = inputs[name], conv.fp32_under_autocast
        conv.fp32_under_autocast = False
        try:
            results = []
            for bf16 in (False, True):
                xi = xin.clone().requires_grad_()
                with torch.enable_grad():
                    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                        y = conv(xi).float()
                    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.device)
                    results.append((y.detach(), *torch.autograd.grad(y, (xi, conv.weight), g)))
        finally:
            conv.fp32_under_autocast = flag
        error = max(float((b - a).norm() / a.norm().clamp_min(1e-30)) for a, b in zip(*results, strict=True))
        if error > tolerance:
            faulty.append(name)
    return faulty


def guard_bf16(model: nn.Module, names: list[str] | tuple[str, ...]) -> None:
    """Run the conv layers ``names`` (from :func:`bf16_faulty_convs`) in fp32 under autocast."""
    for name in names:
        model.get_submodule(name).fp32_under_autocast = True


def layer_table(model: nn.Module) -> list[tuple[str, str, int]]:
    """(module name, kind, trainable parameters) for every module that owns parameters."""
    rows = []
    for name, m in model.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
        if own:
            rows.append((name, type(m).__name__, own))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=float, default=1.0, help="filter-count multiplier")
    parser.add_argument("--blocks", type=int, default=16, help="residual blocks (16 = published)")
    parser.add_argument("--classes", type=int, default=len(CLASSES), help="output classes")
    args = parser.parse_args()
    cfg = HannunConfig(num_classes=args.classes, width=args.width, blocks=args.blocks)
    model = HannunNet(cfg)
    rows = layer_table(model)
    for name, kind, n in rows:
        shape = " x ".join(str(s) for s in model.get_submodule(name).weight.shape)
        print(f"{name:<22} {kind:<12} {shape:<16} {n:>12,}")
    kinds: dict[str, int] = {}
    for _, kind, n in rows:
        kinds[kind] = kinds.get(kind, 0) + n
    n_convs = sum(isinstance(m, nn.Conv1d) for m in model.modules())
    print(f"\nconfig: {asdict(cfg)}")
    print("by kind: " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()))
    print(f"total trainable parameters: {count_parameters(model):,}")
    print(f"convolutional layers: {n_convs}; output stride: {cfg.stride} samples "
          f"(one prediction per {cfg.stride / 200:.2f} s at 200 Hz)")


if __name__ == "__main__":
    main()
