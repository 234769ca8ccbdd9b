"""Streaming inference: feed an ECG in hops of 256 samples, get one prediction per hop.

A wearable sees the ECG as it is recorded, not as a whole record. ``Streamer`` runs the
network layer by layer on each new hop and keeps, per layer, only the input columns that
later outputs still need (a ring of ``kernel - stride`` columns per conv, one sample per
max-pool, and the shortcut columns that wait for their block's main branch). Its state is
bounded: it does not grow with the length of the recording. Its outputs equal the network's
whole-record outputs (``HannunNet.forward`` on the zero-padded record), up to float rounding.

The price is a fixed delay. Keras ``padding="same"`` centres each kernel, so every conv
looks ahead: 8 columns (stride 1) or 7 (stride 2) at its own resolution, and the look-ahead
adds up through the layers. Output step t (input samples 256t..256t+255) can only be
computed once sample 256t + 255 + ``lookahead_samples(model)`` has arrived; for the
published 16-block network that is 9,953 samples (49.8 s at 200 Hz), for the 8-block demo
network 593 (3.0 s). At the end of a recording ``flush()`` pads with zeros as the
whole-record pass does and returns the last outputs.

The layers are model.py's own modules (their weights, BatchNorms and ReLUs); only the
padding and the bookkeeping of columns are done here.

    python stream.py --bench                      # delay and time per hop at widths 1 and 0.25
    python stream.py --ticket tickets/demo/ticket-fp32.npz REC.npy  # per-hop classes of a 200 Hz .npy
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import CLASSES, HannunConfig, HannunNet, ResidualBlock, SameConv1d

FS = 200
HOP = 256


def _pads(conv: SameConv1d) -> tuple[int, int]:
    """(left, right) zero padding of a conv in the whole-record pass (model.SameConv1d)."""
    if conv.same_pad is not None:
        return conv.same_pad
    return conv.padding[0], conv.padding[0]


def conv_lookahead(conv: SameConv1d) -> int:
    """Columns beyond its own span that one output column of ``conv`` reads, at the conv's
    input resolution: output i covers input columns [s*i, s*i + s - 1] and reads up to
    s*i - left + k - 1, so it looks ahead k - left - s columns."""
    return conv.kernel_size[0] - _pads(conv)[0] - conv.stride[0]


def lookahead_samples(model: HannunNet) -> int:
    """Input samples that output step t needs beyond its own 256 (its last sample being
    256t + 255): the look-ahead of every conv, scaled by the resolution it runs at, summed
    along the deepest path. The shortcut (a max-pool over its own span) adds none."""
    total = conv_lookahead(model.stem)
    resolution = 1
    for block in model.blocks:
        main = total + resolution * conv_lookahead(block.conv1)
        resolution *= block.stride
        main += resolution * conv_lookahead(block.conv2)
        total = max(main, total)  # the shortcut's look-ahead stays `total`
    return total


class _Conv:
    """One SameConv1d, streamed: holds the input columns later outputs still need."""

    def __init__(self, conv: SameConv1d):
        self.conv = conv
        self.k, self.s = conv.kernel_size[0], conv.stride[0]
        left, self.right = _pads(conv)
        self.buf = torch.zeros(1, conv.in_channels, left)  # the left zero padding

    def push(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        buf = torch.cat([self.buf, x], dim=2)
        if final:  # the right zero padding of the whole-record pass
            buf = F.pad(buf, (0, self.right))
        n = (buf.shape[2] - self.k) // self.s + 1 if buf.shape[2] >= self.k else 0
        y = F.conv1d(buf[..., : (n - 1) * self.s + self.k], self.conv.weight, self.conv.bias, stride=self.s) \
            if n else buf.new_zeros(1, self.conv.out_channels, 0)
        self.buf = buf[..., n * self.s:]
        return y


class _Pool:
    """Max-pool over pairs (the shortcut of a subsampling block): keeps an odd sample."""

    def __init__(self, stride: int, channels: int):
        self.s = stride
        self.buf = torch.zeros(1, channels, 0)

    def push(self, x: torch.Tensor) -> torch.Tensor:
        buf = torch.cat([self.buf, x], dim=2)
        n = buf.shape[2] // self.s
        self.buf = buf[..., n * self.s:]
        return F.max_pool1d(buf[..., : n * self.s], self.s) if n else buf[..., :0]


class _Block:
    """A ResidualBlock, streamed: the shortcut's columns wait in a queue for the main branch,
    which lags behind by the block's look-ahead."""

    def __init__(self, block: ResidualBlock):
        self.block = block
        self.conv1, self.conv2 = _Conv(block.conv1), _Conv(block.conv2)
        self.pool = _Pool(block.stride, block.conv1.in_channels) if block.stride > 1 else None
        self.queue = torch.zeros(1, block.conv2.out_channels, 0)

    def push(self, x: torch.Tensor, final: bool) -> torch.Tensor:
        b = self.block
        shortcut = self.pool.push(x) if self.pool else x
        self.queue = torch.cat([self.queue, F.pad(shortcut, (0, 0, 0, b.pad_channels))], dim=2)
        h = F.relu(b.bn1(x)) if b.bn1 is not None else x
        h = self.conv1.push(h, final)
        h = self.conv2.push(F.relu(b.bn2(h)), final)  # dropout is the identity in eval mode
        n = h.shape[2]
        out, self.queue = h + self.queue[..., :n], self.queue[..., n:]
        return out


class Streamer:
    """Feeds a HannunNet (eval mode; a shrunk ticket works too) hop by hop.

    ``push(samples)`` takes any number of new samples (z-scored as in training, or raw
    with ``normalizer``) and returns the logits ``[n, classes]`` of the output steps that
    became computable; with hops of the output stride (256) that is exactly one step per
    hop once the first ``delay_steps`` hops have filled the pipeline. ``flush()`` ends the
    recording (zero padding to a whole number of steps, as the whole-record pass pads)
    and returns the remaining steps.
    """

    def __init__(self, model: HannunNet, normalizer: dict | None = None):
        if model.training:
            raise ValueError("Streamer needs the model in eval mode (BatchNorm running statistics, no dropout)")
        self.model = model
        self.stride = model.cfg.stride
        self.lookahead = lookahead_samples(model)
        self.delay_steps = math.ceil(self.lookahead / self.stride)
        """Output steps (hops, when a hop is the stride) between the hop that completes a
        step's own samples and the hop that emits it."""
        self.norm = normalizer
        self.stem = _Conv(model.stem)
        self.blocks = [_Block(b) for b in model.blocks]
        self.samples = 0

    def state_floats(self) -> int:
        """Floats held between hops (every buffer and queue): bounded, whatever the length."""
        bufs = [self.stem.buf] + [t for b in self.blocks for t in
                                  (b.conv1.buf, b.conv2.buf, b.queue, *([b.pool.buf] if b.pool else []))]
        return sum(t.numel() for t in bufs)

    @torch.inference_mode()
    def push(self, samples: np.ndarray | torch.Tensor, final: bool = False) -> torch.Tensor:
        x = torch.as_tensor(samples, dtype=torch.float32).reshape(1, 1, -1)
        if self.norm is not None:
            x = (x - self.norm["mean"]) / self.norm["std"]
        self.samples += x.shape[2]
        m = self.model
        h = F.relu(m.stem_bn(self.stem.push(x, final)))
        for block in self.blocks:
            h = block.push(h, final)
        return m.head(F.relu(m.head_bn(h)).transpose(1, 2))[0]

    def flush(self) -> torch.Tensor:
        """The last steps: zero-pads the recording to a multiple of the stride first."""
        pad = -self.samples % self.stride
        norm = self.norm
        self.norm = None  # the padding is zero after z-scoring, as in training
        try:
            return self.push(torch.zeros(pad), final=True)
        finally:
            self.norm = norm


# --------------------------------------------------------------------------- command line


def cpu_flags() -> str:
    """The host's CPU features that decide the kernels' speed (avx2, avx512_bf16, amx_bf16)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return ",".join(sorted({f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in text.split()})) or "none"


def time_per_hop_ms(model: HannunNet, seconds: float = 3.0) -> float:
    """Median wall time of one 256-sample hop in the steady state, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = Streamer(model)
        rng = np.random.default_rng(0)
        for _ in range(s.delay_steps + 2):  # fill the pipeline
            s.push(rng.standard_normal(HOP))
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            hop = rng.standard_normal(HOP)
            t0 = time.perf_counter()
            s.push(hop)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        torch.set_num_threads(before)


def bench(widths: list[float], blocks: int, seconds: float) -> list[dict]:
    rows = []
    for width in widths:
        model = HannunNet(HannunConfig(width=width, blocks=blocks)).eval()
        s = Streamer(model)
        rows.append({"width": width, "blocks": blocks, "lookahead_samples": s.lookahead,
                     "lookahead_s": s.lookahead / FS, "delay_steps": s.delay_steps,
                     "delay_s": s.delay_steps * s.stride / FS, "hop_samples": s.stride,
                     "ms_per_hop_1_thread": round(time_per_hop_ms(model, seconds), 3),
                     "cpu_flags": cpu_flags(), "cpu": platform.processor() or platform.machine(),
                     "torch": torch.__version__})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="200 Hz single-lead .npy files in microvolts (with --ticket)")
    p.add_argument("--ticket", type=Path, help="ticket file (export_ticket.py)")
    p.add_argument("--bench", action="store_true", help="print delay and time per hop of random networks")
    p.add_argument("--widths", default="1,0.25", help="with --bench: network widths")
    p.add_argument("--blocks", type=int, default=16, help="with --bench: residual blocks")
    p.add_argument("--seconds", type=float, default=3.0, help="with --bench: time spent measuring each width")
    args = p.parse_args(argv)
    if args.bench:
        try:
            widths = [float(w) for w in args.widths.split(",")]
        except ValueError:
            p.error(f"--widths must be comma-separated numbers, got {args.widths!r}")
        print(json.dumps(bench(widths, args.blocks, args.seconds), indent=2))
        return 0
    if args.ticket is None or not args.files:
        p.error("give --bench, or --ticket and .npy files")
    from export_ticket import TicketError, load_ticket  # noqa: PLC0415 - only this path needs it

    try:
        model, meta = load_ticket(args.ticket)
    except TicketError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in args.files:
        try:
            x = np.load(path, allow_pickle=False).astype(np.float32).ravel()
        except (OSError, ValueError) as e:
            print(f"error: {path}: unreadable as .npy ({e})", file=sys.stderr)
            return 1
        if not len(x) or not np.isfinite(x).all():
            print(f"error: {path}: empty or holds NaN/infinite samples", file=sys.stderr)
            return 1
        s = Streamer(model, meta["normalizer"])
        print(f"{path}: delay {s.lookahead} samples ({s.lookahead / FS:.2f} s), {s.delay_steps} steps")
        outs = [s.push(x[i:i + HOP]) for i in range(0, len(x), HOP)] + [s.flush()]
        steps = max(1, len(x) // s.stride)  # as predict.py: a last partial step is not shown
        classes = [CLASSES[i] for i in torch.cat(outs)[:steps].argmax(1).tolist()]
        print("  " + " ".join(classes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
