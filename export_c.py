"""Export a lottery ticket as C99 for a microcontroller, and say what it costs there.

A wearable has no Python and a few hundred kB of flash and tens of kB of RAM. This script
turns a ticket into a generated header (``ecg_ticket.h``: the weights and a layer table)
next to a small, fixed inference file (``c/ecg_infer.c``, ~120 lines, no allocation at run
time):

  * the ticket is shrunk first (export_ticket.shrink: dead inner channels removed), every
    BatchNorm that follows a conv is folded into it, and the two that follow a residual
    sum become a per-channel scale and shift;
  * weights are stored sparse, per output channel (CSR: 2-byte index + value per
    surviving weight), in fp32 or int8 (per-output-channel weight scales) with int16
    (``int8``) or int8 (``int8a8``) activations, per-tensor scales calibrated on records;
  * every activation lives in one static arena, laid out by a buffer plan (each tensor
    lives from the layer that writes it to the last that reads it; first fit by offset).

It reports flash bytes (weights and tables, from the header; checked against the compiled
object), peak RAM for activations (the arena; next to the lower bound, the largest sum of
tensors alive at one layer), multiply-accumulates per second of ECG, and, with --fit, the
first compression level that fits a flash and RAM budget. ``c/ecg_infer.c`` classifies a
window (--seconds, default 30) at once, so its RAM grows with the window; ``c/ecg_stream.c``
(the same header written with stream=True, in a ``<dtype>-stream`` folder) takes pushes
of 32 samples and keeps per tensor only a ring of the columns still to be read, as
stream.py does in Python: its RAM is the rings' bytes, whatever the recording's length.

Examples:
    python export_c.py --run results/cinc2017-cpu/seed3/lr_rewind/round_04 --out c-ticket \\
        --data data/cinc2017 --check 50
    python export_c.py --fit --width 1 --flash 256KB --ram 64KB     # randomly pruned levels
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import export_ticket as et
import prune as pm
import run_folders as rf
import run_state
import train
from model import HannunConfig, HannunNet, SameConv1d
from stream import cpu_flags

FS = 200
TEMPLATES = Path(__file__).resolve().parent / "c"
C_FILES = ("ecg_infer.c", "ecg_infer.h", "ecg_layer.h", "ecg_main.c", "ecg_stream.c", "ecg_stream.h",
           "ecg_stream_main.c")
DTYPES = ("fp32", "int8", "int8a8")
"""fp32; int8 weights with int16 activations (int8, the default: TFLite's "16x8"); int8
weights and activations (int8a8: a quarter of fp32's RAM, but on the real ticket 2-3 % of
records change class, see README)."""
ACT_BYTES = {"fp32": 4, "int8": 2, "int8a8": 1}
ACT_LEVELS = {"int8": 32767, "int8a8": 127}
STREAM_HOP = 32
"""Samples per push of the streaming C program: rings at the first layers hold about one
push plus the kernel, so a smaller push needs less RAM (and more calls)."""
CLIP_PERCENTILE = {"int8": 100.0, "int8a8": 99.99}
"""Activation ranges: this percentile of |activation| over the calibration records. With
8-bit activations the maximum would let one noisy record's spike set the resolution of
every record; 16 bits have resolution to spare for the maximum."""


class ExportCError(Exception):
    """A network or flag the C export cannot handle; says what to do."""


# --------------------------------------------------------------------------- the layer list


@dataclass
class Layer:
    """One step of the C program. ``kind`` is input, affine (relu(scale * x + bias)) or
    conv (sparse 1-D conv + bias, optional ReLU, optional shortcut added)."""

    kind: str
    src: str
    dst: str
    in_len: int
    out_len: int
    channels: int
    weight: torch.Tensor | None = None  # conv: [out, in, k], BatchNorm folded
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # affine
    stride: int = 1
    pad: int = 0
    relu: bool = False
    res: str | None = None
    res_stride: int = 1


@dataclass
class Program:
    layers: list[Layer]
    tensors: dict[str, tuple[int, int]]  # name: (channels, length)
    stride: int
    samples: int
    norm: dict
    classes: int
    clip: dict[str, dict[str, float]] = field(default_factory=dict)  # dtype: tensor: largest |activation| kept
    rings: dict[int, tuple[dict[str, int], int]] = field(default_factory=dict)  # ring_plan's answer per hop


def _bn(bn: torch.nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with bn(x) = a * x + b in eval mode."""
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias.detach() - bn.running_mean * a


def _conv(conv: SameConv1d, src: str, dst: str, in_len: int, bn: torch.nn.BatchNorm1d | None = None,
          relu: bool = False) -> Layer:
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    if bn is not None:
        a, c = _bn(bn)
        w, b = w * a[:, None, None], b * a + c
    pad = conv.same_pad[0] if conv.same_pad is not None else conv.padding[0]
    s = conv.stride[0]
    return Layer("conv", src, dst, in_len, in_len // s, conv.out_channels, w, b, stride=s, pad=pad, relu=relu)


def build_program(model: HannunNet, norm: dict, seconds: float) -> Program:
    """The shrunk, BatchNorm-folded network as a list of layers for a window of
    ``seconds`` (rounded up to the output stride)."""
    model = et.shrink(model.eval())
    k = model.cfg.kernel_size
    if k & (k - 1):
        raise ExportCError(f"kernel size {k} is not a power of 2: the C index packs channel << log2(k) | tap")
    stride = model.cfg.stride
    n = stride * math.ceil(seconds * FS / stride)
    tensors = {"input": (1, n)}
    layers = [Layer("input", "", "input", n, n, 1)]

    def add(layer: Layer) -> Layer:
        tensors[layer.dst] = (layer.channels, layer.out_len)
        layers.append(layer)
        return layer

    x = add(_conv(model.stem, "input", "stem", n, model.stem_bn, relu=True))
    for i, block in enumerate(model.blocks):
        src = x.dst
        if block.bn1 is not None:
            a, b = _bn(block.bn1)
            src = add(Layer("affine", x.dst, f"b{i}.act", x.out_len, x.out_len, x.channels, bias=b, scale=a)).dst
        mid = add(_conv(block.conv1, src, f"b{i}.mid", x.out_len, block.bn2, relu=True))
        out = _conv(block.conv2, mid.dst, f"b{i}.out", mid.out_len)
        out.res, out.res_stride = x.dst, block.stride
        x = add(out)
    a, b = _bn(model.head_bn)
    z = add(Layer("affine", x.dst, "head.act", x.out_len, x.out_len, x.channels, bias=b, scale=a))
    head = model.head.weight.detach()[:, :, None].clone()
    add(Layer("conv", z.dst, "logits", z.out_len, z.out_len, head.shape[0], head, model.head.bias.detach().clone()))
    for layer in layers:
        if layer.weight is not None and layer.weight.shape[1] << int(math.log2(layer.weight.shape[2])) >= 1 << 16:
            raise ExportCError(f"{layer.dst}: {layer.weight.shape[1]} input channels do not fit the 16-bit index")
    return Program(layers, tensors, stride, n, norm, head.shape[0])


@torch.inference_mode()
def run_program(p: Program, samples_uv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of the program for a batch ``[B, n]`` of records in microvolts (fp32,
    torch): the reference the C code is checked against, and the calibration source."""
    x = torch.zeros(samples_uv.shape[0], 1, p.samples)
    x[:, 0, :samples_uv.shape[1]] = (samples_uv - p.norm["mean"]) / p.norm["std"]
    t = {"input": x}
    for layer in p.layers[1:]:
        h = t[layer.src]
        if layer.kind == "affine":
            t[layer.dst] = F.relu(layer.scale[:, None] * h + layer.bias[:, None])
            continue
        k, s = layer.weight.shape[2], layer.stride
        right = (layer.out_len - 1) * s + k - layer.pad - layer.in_len
        y = F.conv1d(F.pad(h, (layer.pad, right)), layer.weight, layer.bias, stride=s)
        if layer.res is not None:
            r = t[layer.res]
            r = F.max_pool1d(r, layer.res_stride) if layer.res_stride > 1 else r
            y = y + F.pad(r, (0, 0, 0, y.shape[1] - r.shape[1]))
        t[layer.dst] = F.relu(y) if layer.relu else y
    return t


def calibrate(p: Program, records: list[np.ndarray]) -> None:
    """Activation ranges of the integer dtypes: CLIP_PERCENTILE of |activation| over ``records``."""
    tops: dict[str, list[float]] = {}
    for x in records:
        t = run_program(p, torch.from_numpy(x[: p.samples].astype(np.float32))[None])
        for name, v in t.items():
            tops.setdefault(name, []).append(v.abs().flatten())
    values = {name: torch.cat(v).numpy() for name, v in tops.items()}
    p.clip = {dtype: {name: max(float(np.percentile(v, pct)), 1e-6) for name, v in values.items()}
              for dtype, pct in CLIP_PERCENTILE.items()}


# --------------------------------------------------------------------------- buffer plan


def lifetimes(p: Program) -> dict[str, tuple[int, int]]:
    """name: (layer that writes it, last layer that reads it); the logits go to the caller."""
    life = {layer.dst: (i, i) for i, layer in enumerate(p.layers) if layer.dst != "logits"}
    for i, layer in enumerate(p.layers):
        for name in (layer.src, layer.res):
            if name in life:
                life[name] = (life[name][0], i)
    return life


def plan_arena(p: Program, elem_bytes: int) -> tuple[dict[str, int], int, int]:
    """(byte offset of every tensor, arena bytes, lower bound): tensors placed in the order
    they are written, each at the lowest 4-byte-aligned offset that overlaps no tensor alive
    at the same time. The lower bound is the largest total of tensors alive at one layer."""
    life = lifetimes(p)
    size = {n: -(-p.tensors[n][0] * p.tensors[n][1] * elem_bytes // 4) * 4 for n in life}
    offsets: dict[str, int] = {}
    for name in sorted(life, key=lambda n: life[n][0]):
        busy = sorted((offsets[m], offsets[m] + size[m]) for m in offsets
                      if life[m][0] <= life[name][1] and life[name][0] <= life[m][1])
        at = 0
        for lo, hi in busy:
            if at + size[name] <= lo:
                break
            at = max(at, hi)
        offsets[name] = at
    arena = max(offsets[n] + size[n] for n in offsets)
    bound = max(sum(size[n] for n in life if life[n][0] <= i <= life[n][1]) for i in range(len(p.layers)))
    return offsets, arena, bound


def check_plan(p: Program, offsets: dict[str, int], elem_bytes: int) -> None:
    """No two tensors alive at the same layer share a byte (the plan's invariant)."""
    life = lifetimes(p)
    names = list(offsets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if life[a][0] <= life[b][1] and life[b][0] <= life[a][1]:
                ea = offsets[a] + p.tensors[a][0] * p.tensors[a][1] * elem_bytes
                eb = offsets[b] + p.tensors[b][0] * p.tensors[b][1] * elem_bytes
                if not (ea <= offsets[b] or eb <= offsets[a]):
                    raise ExportCError(f"buffer plan: {a} and {b} are alive together and overlap")


# --------------------------------------------------------------------------- streaming plan


def ring_plan(p: Program, hop: int = STREAM_HOP) -> tuple[dict[str, int], int]:
    """({tensor: ring capacity in columns}, most logit steps one push or flush returns)
    when the program is pushed ``hop`` samples at a time (c/ecg_stream.c). The schedule
    is simulated: every layer computes each output column as soon as the columns it reads
    exist, push after push until 8 output steps past the first (the steady state), then a
    flush after a last push of every length from 1 to the stride; each ring holds the most
    columns written but still to be read at any point."""
    if hop in p.rings:
        return p.rings[hop]
    producer = {layer.dst: i for i, layer in enumerate(p.layers)}
    cap = {layer.dst: 1 for layer in p.layers if layer.dst != "logits"}
    readers = [(i, layer) for i, layer in enumerate(p.layers) if layer.kind != "input"]
    div = {layer.dst: p.samples // layer.out_len for layer in p.layers}
    div["input"] = 1

    def first_read(done: list[int], i: int, layer: Layer, name: str) -> int | None:
        if layer.res == name:
            return layer.res_stride * done[i]
        if layer.src != name:
            return None
        return done[i] * layer.stride - layer.pad if layer.kind == "conv" else done[i]

    def ready(done: list[int], i: int, layer: Layer, total: int | None) -> bool:
        n = done[i]
        if total is not None and n >= total // div[layer.dst]:
            return False
        last = n * layer.stride - layer.pad + layer.weight.shape[2] - 1 if layer.kind == "conv" else n
        if total is not None:
            last = min(last, total // div[layer.src] - 1)
        if last >= done[producer[layer.src]]:
            return False
        return layer.res is None or (n + 1) * layer.res_stride - 1 < done[producer[layer.res]]

    consumers = {name: [(j, other) for j, other in readers if name in (other.src, other.res)] for name in cap}

    def measure(done: list[int], name: str) -> None:
        """A ring is fullest right after its producer wrote: measure it then."""
        start = min(first_read(done, j, other, name) for j, other in consumers[name])
        cap[name] = max(cap[name], done[producer[name]] - max(0, start))

    def run(done: list[int], total: int | None = None) -> int:
        """One push's work, or the flush's (in passes of at most one hop's worth of
        columns per layer, as c/ecg_stream.c does); returns the logit steps it emits."""
        before = done[-1]
        measure(done, "input")
        progress = True
        while progress:
            progress = False
            for i, layer in readers:
                quota = max(1, hop // div[layer.dst]) if total is not None else None
                made = 0
                while (quota is None or made < quota) and ready(done, i, layer, total):
                    done[i] += 1
                    made += 1
                progress = progress or (made > 0 and total is not None)
                if layer.dst in cap:
                    measure(done, layer.dst)
        return done[-1] - before

    done, most = [0] * len(p.layers), 1
    while done[-1] < 9 or done[0] % p.stride:
        done[0] += hop
        most = max(most, run(done))
    for last in range(1, p.stride + 1):
        end = list(done)
        for at in range(0, last, hop):
            end[0] += min(hop, last - at)
            most = max(most, run(end))
        end[0] = p.stride * -(-end[0] // p.stride)  # the flush pads the input with zeros
        most = max(most, run(end, end[0]))
    p.rings[hop] = cap, most
    return cap, most


# --------------------------------------------------------------------------- sizes


def macs(p: Program) -> int:
    """Multiply-accumulates of one window: surviving weights x output positions."""
    return sum(int(torch.count_nonzero(layer.weight)) * layer.out_len for layer in p.layers if layer.kind == "conv")


def flash_bytes(p: Program, dtype: str) -> int:
    """Bytes of the constant data in ecg_ticket.h: per conv the surviving weights (4 or 1
    bytes), their 2-byte indexes, the row starts (4 bytes per output channel + 1), biases
    (and int8 multipliers), per affine layer its scales and shifts, and the layer table."""
    total = 0
    for layer in p.layers:
        if layer.kind == "conv":
            nnz = int(torch.count_nonzero(layer.weight))
            total += nnz * ((4 if dtype == "fp32" else 1) + 2) + 4 * (layer.channels + 1)
            total += 4 * layer.channels * (1 if dtype == "fp32" else 2)
        elif layer.kind == "affine":
            total += 8 * layer.channels
    return total + LAYER_STRUCT_BYTES * len(p.layers)


LAYER_STRUCT_BYTES = 96
"""sizeof(ecg_layer) with 8-byte pointers (x86-64, as compiled in the check); 64 on a
32-bit microcontroller: the flash figures are an upper bound there by 32 bytes a layer."""


def ring_bytes(p: Program, dtype: str, cap: dict[str, int]) -> int:
    """Bytes of the rings of the streaming program (c/ecg_stream.c), each 4-byte aligned."""
    return sum(-(-p.tensors[name][0] * c * ACT_BYTES[dtype] // 4) * 4 for name, c in cap.items())


def costs(p: Program, dtype: str, cap: dict[str, int] | None = None) -> dict:
    """Flash, RAM and MACs of ``p`` in ``dtype``; with ``cap`` (ring_plan) also the RAM of
    the streaming program."""
    _, arena, bound = plan_arena(p, ACT_BYTES[dtype])
    m = macs(p)
    row = {"dtype": dtype, "window_samples": p.samples, "flash_bytes": flash_bytes(p, dtype),
           "arena_bytes": arena, "arena_lower_bound_bytes": bound,
           "logits_bytes": 4 * p.classes * (p.samples // p.stride),
           "macs_per_window": m, "macs_per_second_of_ecg": round(m / (p.samples / FS))}
    if cap is not None:
        row["stream_ring_bytes"] = ring_bytes(p, dtype, cap)
    return row


# --------------------------------------------------------------------------- C code


def _floats(v: torch.Tensor | np.ndarray) -> str:
    return ", ".join(f"{float(x):.9e}f" for x in np.asarray(v, dtype=np.float32).ravel())


def _ints(v: np.ndarray) -> str:
    return ", ".join(str(int(x)) for x in np.asarray(v).ravel())


def ring_arena(p: Program, dtype: str) -> tuple[dict[str, int], int, dict[str, int], int]:
    """(byte offset of every ring, arena bytes, ring capacities, most steps per call) of
    the streaming program: all rings live all the time, one after the other."""
    cap, most = ring_plan(p)
    offsets, at = {}, 0
    for name, c in cap.items():
        offsets[name] = at
        at += ring_bytes(p, dtype, {name: c})
    return offsets, at, cap, most


def header(p: Program, dtype: str, source: str, stream: bool = False) -> str:
    """ecg_ticket.h: constants, weights and the layer table of ``p`` in ``dtype``; with
    ``stream`` the arena holds the rings of c/ecg_stream.c instead of whole tensors."""
    if dtype != "fp32" and dtype not in p.clip:
        raise ExportCError(f"{dtype} needs calibration records (calibrate) first")
    if stream:
        offsets, arena, cap, most = ring_arena(p, dtype)
        bound = arena
    else:
        offsets, arena, bound = plan_arena(p, ACT_BYTES[dtype])
        check_plan(p, offsets, ACT_BYTES[dtype])
    sc = {n: top / ACT_LEVELS[dtype] for n, top in p.clip[dtype].items()} if dtype != "fp32" else {}
    out_scale = {n: sc.get(n, 1.0) for n in p.tensors}
    out_scale["logits"] = 1.0  # float logits
    lines = ["/* Generated by export_c.py: do not edit. */",
             f"/* source: {source}; {dtype}; window {p.samples} samples */",
             "#ifndef ECG_TICKET_H", "#define ECG_TICKET_H",
             *([f"#define ECG_INT8 1\n#define ECG_ACT_BITS {8 * ACT_BYTES[dtype]}"] if dtype != "fp32" else []),
             '#include "ecg_layer.h"', "",
             f"#define ECG_SAMPLES {p.samples}", f"#define ECG_STRIDE {p.stride}",
             f"#define ECG_STEPS {p.samples // p.stride}", f"#define ECG_CLASSES {p.classes}",
             f"#define ECG_MEAN {p.norm['mean']:.9e}f",
             f"#define ECG_ARENA_BYTES {arena} /* lower bound {bound} */",
             f"#define ECG_LAYERS {len(p.layers)}",
             *([f"#define ECG_HOP {STREAM_HOP}", f"#define ECG_STREAM_MAX_STEPS {most}"] if stream else []), ""]
    table = []
    for i, layer in enumerate(p.layers):
        pre = f"L{i}_"
        f = {"kind": f"ECG_{layer.kind.upper()}", "src": offsets.get(layer.src, 0), "dst": offsets.get(layer.dst, 0),
             "in_len": layer.in_len, "out_len": layer.out_len, "out_channels": layer.channels}
        in_s = out_scale.get(layer.src, 1.0) if layer.kind != "input" else 1.0
        o_s = out_scale[layer.dst]
        if layer.kind == "input":
            f["input_mult"] = f"{1.0 / (p.norm['std'] * (sc.get('input', 1.0))):.9e}f"
        elif layer.kind == "affine":
            lines.append(f"static const float {pre}scale[] = {{{_floats(layer.scale * in_s / o_s)}}};")
            lines.append(f"static const float {pre}bias[] = {{{_floats(layer.bias / o_s)}}};")
            f.update(scale=f"{pre}scale", bias=f"{pre}bias")
        else:
            w = layer.weight.float()
            out_ch, _, k = w.shape
            rows, cols, vals, mults = [0], [], [], []
            for o in range(out_ch):
                nz = torch.nonzero(w[o], as_tuple=False)  # (channel, tap), channel-major
                v = w[o][nz[:, 0], nz[:, 1]] if len(nz) else w.new_zeros(0)
                if dtype != "fp32":
                    ws = float(v.abs().max()) / 127 if len(v) and float(v.abs().max()) > 0 else 1.0
                    v = torch.clamp(torch.round(v / ws), -127, 127)
                    mults.append(ws * in_s / o_s)
                cols += ((nz[:, 0] << int(math.log2(k))) | nz[:, 1]).tolist()
                vals += v.tolist()
                rows.append(len(cols))
            wtype = "float" if dtype == "fp32" else "int8_t"
            lines.append(f"static const uint32_t {pre}row[] = {{{_ints(np.asarray(rows))}}};")
            lines.append(f"static const uint16_t {pre}col[] = {{{_ints(np.asarray(cols)) or '0'}}};")
            lines.append(f"static const {wtype} {pre}w[] = {{"
                         f"{(_floats(vals) if dtype == 'fp32' else _ints(np.asarray(vals))) or '0'}}};")
            lines.append(f"static const float {pre}bias[] = {{{_floats(layer.bias / o_s)}}};")
            f.update(row=f"{pre}row", col=f"{pre}col", w=f"{pre}w", bias=f"{pre}bias", kbits=int(math.log2(k)),
                     stride=layer.stride, pad=layer.pad, relu=int(layer.relu))
            if dtype != "fp32":
                lines.append(f"static const float {pre}mult[] = {{{_floats(np.asarray(mults))}}};")
                f["mult"] = f"{pre}mult"
            if layer.res is not None:
                f.update(res=offsets[layer.res], res_channels=p.tensors[layer.res][0], res_stride=layer.res_stride,
                         res_mult=f"{out_scale[layer.res] / o_s:.9e}f")
        table.append("    {" + ", ".join(f".{k} = {v}" for k, v in f.items()) + "},")
    lines += ["", "static const ecg_layer ECG_NET[ECG_LAYERS] = {", *table, "};", ""]
    if stream:
        producer = {layer.dst: i for i, layer in enumerate(p.layers)}
        rings = []
        for layer in p.layers:
            div = p.samples // layer.in_len, p.samples // layer.out_len
            rings.append(f"    {{.src_layer = {producer.get(layer.src, 0)}, "
                         f".res_layer = {producer.get(layer.res, -1)}, .src_cap = {cap.get(layer.src, 1)}, "
                         f".res_cap = {cap.get(layer.res, 1)}, .dst_cap = {cap.get(layer.dst, 1)}, "
                         f".in_div = {div[0]}, .out_div = {div[1]}}},")
        lines += ["static const ecg_ring ECG_RING[ECG_LAYERS] = {", *rings, "};", ""]
    lines += ["#endif", ""]
    return "\n".join(lines)


def write_c(p: Program, dtype: str, out: Path, source: str, stream: bool = False) -> Path:
    """The C sources for ``dtype`` in ``out``: the templates and the generated header
    (for c/ecg_stream.c with ``stream``)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in C_FILES:
        shutil.copyfile(TEMPLATES / name, out / name)
    rf.atomic_write(out / "ecg_ticket.h", header(p, dtype, source, stream).encode())
    return out


def compiler() -> str:
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise ExportCError("no C compiler (cc or gcc) on PATH: install one (e.g. apt-get install gcc)")
    return found


def build(folder: Path, extra: tuple[str, ...] = (), stream: bool = False) -> Path:
    """Compile the driver and the network in ``folder`` (C99, -O2, every warning an error)."""
    net, main = ("ecg_stream.c", "ecg_stream_main.c") if stream else ("ecg_infer.c", "ecg_main.c")
    exe = folder / main.removesuffix(".c")
    cmd = [compiler(), "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-D_POSIX_C_SOURCE=199309L",
           *extra, "-o", str(exe), str(folder / net), str(folder / main), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise ExportCError(f"C compilation failed:\n{' '.join(cmd)}\n{r.stderr}")
    return exe


def compiled_sizes(folder: Path) -> dict[str, int]:
    """What the compiler made of ecg_infer.c (x86-64, -O2): bytes of constant data (.rodata
    and .data.rel.ro: the flash the header takes), of static RAM (.bss: the arena and the
    logits of ecg_classify) and the deepest stack frame of its functions (-fstack-usage)."""
    obj = folder / "ecg_infer.o"
    subprocess.run([compiler(), "-std=c99", "-O2", "-fstack-usage", "-c", "-o", str(obj), str(folder / "ecg_infer.c")],
                   check=True, cwd=folder)
    sections = subprocess.run(["size", "-A", str(obj)], capture_output=True, text=True, check=True).stdout
    size = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\.\S+)\s+(\d+)", sections, re.M)}
    stack = [int(line.split("\t")[1]) for line in (folder / "ecg_infer.su").read_text().splitlines() if "\t" in line]
    return {"flash_bytes_compiled": sum(v for k, v in size.items() if k.startswith((".rodata", ".data.rel.ro"))),
            "bss_bytes_compiled": sum(v for k, v in size.items() if k.startswith(".bss")),
            "stack_bytes_max_frame": max(stack)}


def run_executable(exe: Path, records: list[np.ndarray]) -> subprocess.CompletedProcess:
    """The compiled program run on ``records`` (each written as its int32 length and its
    float32 samples), its output captured; an error with its stderr if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.f32"
        with open(path, "wb") as f:
            for x in records:
                f.write(np.int32(len(x)).tobytes() + x.astype(np.float32).tobytes())
        r = subprocess.run([str(exe), str(path)], capture_output=True, check=False)
    if r.returncode:
        raise ExportCError(f"{exe} failed ({r.returncode}): {r.stderr.decode()}")
    return r


def run_c(exe: Path, records: list[np.ndarray], steps: int, classes: int) -> list[np.ndarray]:
    """Per-step logits ``[steps, classes]`` of each record from the compiled program."""
    r = run_executable(exe, records)
    out = np.frombuffer(r.stdout, dtype=np.float32).reshape(len(records), steps, classes)
    return list(out)


def run_c_stream(exe: Path, records: list[np.ndarray], classes: int) -> tuple[list[np.ndarray], dict[int, int]]:
    """(per-step logits of each record from the streaming program, {step: push after which
    it came out} of the first record)."""
    r = run_executable(exe, records)
    out, at = [], 0
    for _ in records:
        steps = int(np.frombuffer(r.stdout, dtype=np.int32, count=1, offset=at)[0])
        logits = np.frombuffer(r.stdout, dtype=np.float32, count=steps * classes, offset=at + 4)
        out.append(logits.reshape(steps, classes))
        at += 4 + 4 * steps * classes
    when = dict(tuple(int(v) for v in pair.split(":")) for pair in r.stderr.decode().split())
    return out, when


def c_latency_ms(exe: Path, record: np.ndarray, seconds: float = 2.0) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.f32"
        path.write_bytes(np.int32(len(record)).tobytes() + record.astype(np.float32).tobytes())
        r = subprocess.run([str(exe), "--bench", str(path), str(seconds)], capture_output=True, text=True, check=True)
    return float(r.stdout.split()[0])


# --------------------------------------------------------------------------- checks against PyTorch


def record_class(logits: np.ndarray | torch.Tensor, n: int, stride: int) -> int:
    """Class of a record as predict.py decides it: argmax of the mean logits of its steps."""
    steps = max(1, n // stride)
    return int(np.asarray(logits)[:steps].mean(0).argmax())


def compare(model: HannunNet, p: Program, exe: Path, records: list[np.ndarray]) -> dict:
    """C logits against the (unshrunk, unfolded) PyTorch network on ``records``: largest
    relative difference (over the record's logits, relative to their largest magnitude)
    and the share of records given the same class."""
    got = run_c(exe, records, p.samples // p.stride, p.classes)
    worst, same = 0.0, 0
    for x, c in zip(records, got, strict=True):
        inp = torch.zeros(1, 1, p.samples)
        inp[0, 0, :len(x)] = (torch.from_numpy(x.astype(np.float32)) - p.norm["mean"]) / p.norm["std"]
        with torch.inference_mode():
            want = model(inp)[0].numpy()
        worst = max(worst, float(np.abs(c - want).max() / max(np.abs(want).max(), 1e-12)))
        same += record_class(c, len(x), p.stride) == record_class(want, len(x), p.stride)
    return {"records": len(records), "max_rel_diff": worst, "same_class": same / len(records)}


def compare_stream(model: HannunNet, p: Program, exe: Path, records: list[np.ndarray]) -> dict:
    """As ``compare``, for the streaming program: every step of each record (zero-padded
    to the stride, not to the window) against the whole-record PyTorch pass."""
    got, _ = run_c_stream(exe, records, p.classes)
    worst, same = 0.0, 0
    for x, c in zip(records, got, strict=True):
        inp = torch.zeros(1, 1, p.stride * -(-len(x) // p.stride))
        inp[0, 0, :len(x)] = (torch.from_numpy(x.astype(np.float32)) - p.norm["mean"]) / p.norm["std"]
        with torch.inference_mode():
            want = model(inp)[0].numpy()
        if c.shape != want.shape:
            raise ExportCError(f"streaming C gave {c.shape[0]} steps for a record of {want.shape[0]}")
        worst = max(worst, float(np.abs(c - want).max() / max(np.abs(want).max(), 1e-12)))
        same += record_class(c, len(x), p.stride) == record_class(want, len(x), p.stride)
    return {"records": len(records), "max_rel_diff": worst, "same_class": same / len(records)}


# --------------------------------------------------------------------------- loading tickets


def read_ticket(run: Path) -> tuple[HannunNet, dict]:
    """(network with its mask applied, normaliser) of a run folder, a ticket file, or a round
    whose weights are only in its method folder's committed state.npz (run_state.py)."""
    if run.suffix == ".npz" and run.is_file():
        model, meta = et.load_ticket(run)
        return model, meta["normalizer"]
    if (run / train.FINAL).is_file():
        cfg, state, masks, norm, _ = et.read_run(run)
        model = et.build_model(cfg, state)
        if masks is not None:
            for name, w in pm.prunable_weights(model).items():
                if name in masks:
                    w.data.mul_(masks[name])
        return model, norm
    state_file = run.parent / run_state.STATE
    key = f"{run.parent.name}/{run.name}/{train.FINAL}"
    if state_file.is_file():
        arrays = dict(np.load(state_file))
        if any(k.startswith(key + run_state.SEP) for k in arrays):
            try:
                flags = json.loads((run.parent / rf.CONFIG).read_text())["flags"]
                norm = json.loads((run / train.METRICS).read_text())["normalizer"]
            except (OSError, KeyError, ValueError) as e:
                raise ExportCError(f"{run}: unreadable run files ({type(e).__name__}: {e})") from e
            model = et.build_model(HannunConfig(**flags["model"]), run_state.unpack_tensors(key, arrays))
            return model, norm
    raise ExportCError(f"{run}: no {train.FINAL}, no ticket file and no weights in {state_file}: give a finished "
                       "run folder, a ticket-*.npz, or a round kept in its method folder's state.npz")


def random_ticket(width: float, compression: float, blocks: int = 16, seed: int = 0) -> HannunNet:
    """A network of ``width`` with a random global mask keeping 1 / ``compression`` of the
    prunable weights (sizes only: the values mean nothing)."""
    torch.manual_seed(seed)
    model = HannunNet(HannunConfig(width=width, blocks=blocks)).eval()
    weights = pm.prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total)[: round(total / compression)]] = True
    at = 0
    with torch.no_grad():
        for w in weights.values():
            w.mul_(keep[at:at + w.numel()].view_as(w))
            at += w.numel()
    return model


def parse_bytes(text: str) -> int:
    """'256KB', '64 kB', '1MB', '4096' -> bytes (KB = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)[iI]?[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 256KB, 64KB, 1MB)")
    return int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()])


def longest_window_steps(model: HannunNet, norm: dict, ram: int, dtype: str) -> int:
    """The most output steps (windows of steps x stride samples) whose arena fits ``ram``
    bytes: estimated from one step (the arena grows about linearly), then checked."""
    stride = model.cfg.stride

    def arena(steps: int) -> int:
        return plan_arena(build_program(model, norm, steps * stride / FS), ACT_BYTES[dtype])[1]

    if arena(1) > ram:
        return 0
    steps = max(1, ram // arena(1))
    while steps > 1 and arena(steps) > ram:
        steps -= 1
    while arena(steps + 1) <= ram:
        steps += 1
    return steps


def fit_budget(levels: dict[float, HannunNet], flash: int, ram: int, seconds: float, dtype: str,
               norm: dict | None = None) -> tuple[list[dict], float | None]:
    """(a row of costs per compression level, the first level, in increasing compression,
    whose flash and arena fit ``flash`` and ``ram`` bytes; None if none does). Each row
    also gives the longest window (whole output steps, in seconds) whose arena fits ``ram``,
    and the RAM of the streaming program (its rings) and whether that fits instead."""
    norm = norm or {"mean": 0.0, "std": 1.0}
    rows, first = [], None
    for compression, model in sorted(levels.items()):
        p = build_program(model, norm, seconds)
        row = {"compression": compression, **costs(p, dtype, ring_plan(p)[0])}
        row["longest_window_s_in_ram"] = longest_window_steps(model, norm, ram, dtype) * p.stride / FS
        row["fits_flash"] = row["flash_bytes"] <= flash
        row["fits"] = row["fits_flash"] and row["arena_bytes"] <= ram
        row["fits_streaming"] = row["fits_flash"] and row["stream_ring_bytes"] <= ram
        rows.append(row)
        if first is None and row["fits"]:
            first = compression
    return rows, first


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder (round_NN or dense), or a ticket-*.npz")
    p.add_argument("--out", type=Path, help="folder for the C sources (one sub-folder per dtype) and report")
    p.add_argument("--dtypes", default="fp32,int8", help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--seconds", type=float, default=30.0, help="window classified at once (RAM grows with it)")
    p.add_argument("--data", type=Path, help="built data set: int8 calibration (train split) and --check (test)")
    p.add_argument("--calibration", type=int, default=32, help="training records for the int8 scales")
    p.add_argument("--check", type=int, default=0, help="compare the C logits with PyTorch on this many test records")
    p.add_argument("--fit", action="store_true", help="list flash/RAM/MACs per compression level and the first "
                   "that fits --flash and --ram (levels of a randomly pruned network of --width)")
    p.add_argument("--width", type=float, default=1.0, help="with --fit: network width")
    p.add_argument("--levels", default="1,2,4,8,16,32,64,128,256", help="with --fit: compression levels")
    p.add_argument("--flash", default="256KB", help="with --fit: flash budget")
    p.add_argument("--ram", default="64KB", help="with --fit: RAM budget for activations")
    args = p.parse_args(argv)
    try:
        args.flash_bytes, args.ram_bytes = parse_bytes(args.flash), parse_bytes(args.ram)
        args.levels = [float(v) for v in args.levels.split(",")]
    except ValueError as e:
        p.error(f"--flash/--ram/--levels: {e}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}, got {args.dtypes}")
    if not args.fit and (args.run is None or args.out is None):
        p.error("give --run and --out (or --fit)")
    if args.seconds * FS < 1:
        p.error("--seconds must cover at least one sample")
    if args.check and args.data is None:
        p.error("--check compares on test records: give --data too")
    if set(args.dtypes) - {"fp32"} and not args.fit and args.data is None:
        p.error("int8 needs --data (training records calibrate the activation scales), or --dtypes fp32")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.fit:
        levels = {c: random_ticket(args.width, c) for c in args.levels}
        report = {"width": args.width, "flash_budget": args.flash_bytes, "ram_budget": args.ram_bytes}
        for dtype in args.dtypes:
            rows, first = fit_budget(levels, args.flash_bytes, args.ram_bytes, args.seconds, dtype)
            report[dtype] = {"levels": rows, "first_fit": first}
            print(f"{dtype}, width {args.width:g}, window {args.seconds:g} s, budget flash {args.flash} RAM {args.ram}")
            print("compression  flash_bytes  arena_bytes  MACs/s_ECG  longest_window_s_in_RAM  fits  "
                  "stream_ring_bytes  fits_streaming")
            for r in rows:
                print(f"{r['compression']:>11g}  {r['flash_bytes']:>11,}  {r['arena_bytes']:>11,}  "
                      f"{r['macs_per_second_of_ecg']:>10,}  {r['longest_window_s_in_ram']:>23}  {r['fits']!s:>4}  "
                      f"{r['stream_ring_bytes']:>17,}  {r['fits_streaming']}")
            flash_only = next((r["compression"] for r in rows if r["fits_flash"]), None)
            streaming = next((r["compression"] for r in rows if r["fits_streaming"]), None)
            report[dtype]["first_fit_streaming"] = streaming
            print(f"first level that fits: {first if first is not None else 'none'} "
                  f"(flash alone: {flash_only if flash_only is not None else 'none'}; "
                  f"streaming: {streaming if streaming is not None else 'none'})\n")
        return report
    try:
        model, norm = read_ticket(args.run)
        p = build_program(model, norm, args.seconds)
    except (ExportCError, et.TicketError) as e:
        sys.exit(f"error: {e}")
    report: dict = {"source": str(args.run), "code_version": rf.code_version(), "cpu_flags": cpu_flags()}
    ds = None
    if args.data is not None:
        et.check_made_with(args.run, args.data)  # its test records must not be ones it was trained on
        from build_datasets import DatasetError, load_dataset  # noqa: PLC0415

        try:
            ds = load_dataset(args.data)
        except DatasetError as e:
            sys.exit(f"error: {e}")

    def records(split: str, n: int) -> list[np.ndarray]:
        idx = ds.indices(split)[:n]
        return [ds.signals[i, : min(ds.lengths[i], p.samples)].astype(np.float32) for i in idx]

    cap = ring_plan(p)[0]
    if set(args.dtypes) - {"fp32"}:
        calibrate(p, records("train", args.calibration))
    for dtype in args.dtypes:
        folder = write_c(p, dtype, args.out / dtype, str(args.run))
        exe = build(folder)
        row = costs(p, dtype, cap)
        row.update(compiled_sizes(folder))
        stream_exe = build(write_c(p, dtype, args.out / f"{dtype}-stream", str(args.run), stream=True), stream=True)
        test = records("test", args.check) if ds is not None and args.check else []
        if test:
            row["check"] = compare(model, p, exe, test)
            row["check_stream"] = compare_stream(model, p, stream_exe, test)
        probe = test[0] if test else np.zeros(p.samples, dtype=np.float32)
        row["c_ms_per_window_host"] = c_latency_ms(exe, probe)
        report[dtype] = row
    rf.atomic_write(args.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
