"""Export a lottery ticket as a genuinely small network, and measure what it really saves.

A pruned network saved by train.py is a dense fp32 checkpoint full of zeros: no smaller than
the dense one. This script writes a ticket (a pruning round's folder, or a dense run) in a
compact format and accounts for it honestly:

  ticket-<dtype>.npz  per pruned layer only the surviving weights (fp32, fp16, or int8 with a
                      per-layer scale) plus a cheap index of where they sit: a bitmask
                      (1 bit per weight) or, when fewer bytes, the gaps between survivors
                      (uint16/uint32 each); biases and BatchNorm as fp32; the network's
                      configuration and input normalisation as JSON. ``load_ticket`` rebuilds
                      the network exactly (fp32) or dequantised (fp16, int8).
  ticket.onnx         (--onnx) the same network, dead channels removed, for ONNX runtimes,
                      checked against PyTorch; with --data also
  ticket-int8.onnx    statically quantised by onnxruntime.quantization (QDQ, int8 weights
                      per channel, uint8 activations, min-max ranges calibrated on
                      --calibration training records), with its F1, bytes and latency in
                      the report next to the fp32 graph's.
  report.json / .md   non-zero parameters (with and without biases and BatchNorm), bytes on
                      disk of the dense fp32 checkpoint, of each ticket file and of both
                      xz-compressed, FLOPs per 30-s record dense vs sparse, CPU latency per
                      30-s record at 1 and 2 threads for the dense network and the ticket
                      (dense kernels, dead inner channels removed, sparse CSR kernels), and
                      with --data the validation/test F1 of every exported variant next to
                      the trained ticket's.

Example:
    python export_ticket.py --run results/demo/seed0/lr_rewind/round_05 --out tickets/demo \\
        --data data/synthetic --onnx
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import lzma
import math
import re
import statistics
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import batching
import operating_point
import prune as pm
import run_folders as rf
import train
from build_datasets import DatasetError, load_dataset
from model import CLASSES, RECORD_SAMPLES, HannunConfig, HannunNet, SameConv1d, flops, output_positions
from run_folders import atomic_write, code_version

DTYPES = ("fp32", "fp16", "int8")
FORMAT = "ecg-lth ticket 1"
FS = 200


class TicketError(Exception):
    """A run folder or ticket file that cannot be exported or loaded; names the file."""


# --------------------------------------------------------------------------- reading a run


def read_run(run: Path) -> tuple[HannunConfig, dict, pm.Masks | None, dict, dict]:
    """(network config, trained weights, masks or None for a dense run, normaliser, metrics)
    of a train.py run folder (``<seed>/dense`` or ``<seed>/<method>/round_NN``). The run's
    flags are in ``metrics["flags"]``."""
    weights = run / train.FINAL
    if not weights.is_file():
        raise TicketError(f"{run} holds no trained network ({weights.name} missing): is the run finished? "
                          "(checkpoints are not kept in git: export on the machine that trained it)")
    config = next((p / rf.CONFIG for p in (run, run.parent) if (p / rf.CONFIG).is_file()), None)
    if config is None:
        raise TicketError(f"no {rf.CONFIG} in {run} or {run.parent}: not a train.py run folder")
    try:
        flags = json.loads(config.read_text())["flags"]
        model_cfg = HannunConfig(**flags["model"])
        metrics = {**json.loads((run / train.METRICS).read_text()), "flags": flags,
                   "data_fingerprint": json.loads(config.read_text()).get("data_fingerprint")}
        norm = metrics["normalizer"]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise TicketError(f"{run}: unreadable run files ({type(e).__name__}: {e})") from e
    try:
        state = rf.load_pt(weights)
        masks = rf.load_pt(run / train.MASK) if (run / train.MASK).is_file() else None
    except SystemExit as e:
        raise TicketError(str(e).removeprefix("error: ")) from None
    check_finite(state, weights)
    return model_cfg, state, masks, norm, metrics


def check_finite(state: dict, source: Path) -> None:
    """Refuse a network with NaN or infinite parameters: it would classify every record
    confidently and wrongly."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        raise TicketError(f"{source}: {sum(bad.values())} non-finite values in {len(bad)} tensors "
                          f"(e.g. {next(iter(bad))}); the training diverged: it is no ticket")


def build_model(cfg: HannunConfig, state: dict) -> HannunNet:
    model = HannunNet(cfg)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------- compact format


def encode_layer(weight: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, str, bytes]:
    """(surviving values as fp32, index kind, index bytes) of one layer; the index is the
    cheaper of a bitmask (1 bit per weight) and the gaps between survivors (2 or 4 bytes
    per survivor)."""
    w = weight.detach().float().flatten().numpy()
    flat = mask.flatten().cpu().numpy().astype(bool)
    pos = np.flatnonzero(flat)
    gaps = np.diff(pos, prepend=-1)  # >= 1; survivors at cumsum(gaps) - 1
    gap_type = np.uint16 if len(gaps) == 0 or gaps.max() <= np.iinfo(np.uint16).max else np.uint32
    if w.size / 8 <= len(pos) * np.dtype(gap_type).itemsize:
        return w[pos], "bits", np.packbits(flat).tobytes()
    return w[pos], f"gaps{8 * np.dtype(gap_type).itemsize}", gaps.astype(gap_type).tobytes()


def decode_mask(kind: str, index: bytes, shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
    if kind == "bits":
        return np.unpackbits(np.frombuffer(index, dtype=np.uint8), count=n).astype(bool)
    gaps = np.frombuffer(index, dtype={"gaps16": np.uint16, "gaps32": np.uint32}[kind]).astype(np.int64)
    mask = np.zeros(n, dtype=bool)
    mask[np.cumsum(gaps) - 1] = True
    return mask


def quantize(values: np.ndarray, dtype: str) -> tuple[np.ndarray, float]:
    """(stored values, scale): fp32 and fp16 as they are, int8 symmetric per layer."""
    if dtype != "int8":
        return values.astype(np.float32 if dtype == "fp32" else np.float16), 1.0
    top = float(np.abs(values).max()) if len(values) else 0.0
    scale = top / 127 if top > 0 else 1.0
    return np.clip(np.round(values / scale), -127, 127).astype(np.int8), scale


def other_keys(model: HannunNet) -> list[str]:
    """State entries stored densely, in a fixed order: all but the pruned weights and the
    BatchNorm step counters. The layout follows from the configuration, so the file holds
    no names or shapes."""
    pruned = {f"{n}.weight" for n in pm.prunable_weights(model)}
    return [k for k in model.state_dict() if k not in pruned and not k.endswith("num_batches_tracked")]


def ticket_arrays(cfg: HannunConfig, state: dict, masks: pm.Masks | None, norm: dict, dtype: str,
                  source: str, extra: dict | None = None) -> dict[str, np.ndarray]:
    """Everything a ticket file holds, packed into five arrays (few headers: the format's
    overhead stays ~1 KB): ``values`` (survivors of all pruned layers, in ``dtype``),
    ``scales`` (per layer), ``index`` (all layers' bitmasks or gaps), ``others`` (biases and
    BatchNorm, fp32) and ``meta`` (JSON: configuration, normaliser, and per pruned layer in
    the network's order: survivors, index kind, index bytes; plus ``extra``, the optional
    fields of OPTIONAL_META: the data it was made with, its AF operating point)."""
    model = build_model(cfg, state)
    masks = masks if masks is not None else pm.full_masks(model)
    values, scales, index, layers = [], [], [], []
    for name, weight in pm.prunable_weights(model).items():
        mask = masks.get(name, torch.ones_like(weight, dtype=torch.bool)).cpu()
        survivors, kind, idx = encode_layer(weight * mask, mask)
        stored, scale = quantize(survivors, dtype)
        values.append(stored)
        scales.append(scale)
        index.append(idx)
        layers.append([len(survivors), kind, len(idx)])
    others = [state[k].detach().float().cpu().numpy().ravel() for k in other_keys(model)]
    meta = {"format": FORMAT, "model": vars(cfg), "normalizer": norm, "classes": list(CLASSES),
            "fs": FS, "dtype": dtype, "layers": layers, "source": source, "code_version": code_version(),
            **(extra or {})}
    return {"values": np.concatenate(values), "scales": np.asarray(scales, dtype=np.float32),
            "index": np.frombuffer(b"".join(index), dtype=np.uint8),
            "others": np.concatenate(others).astype(np.float32),
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}


def save_ticket(arrays: dict[str, np.ndarray], path: Path) -> int:
    """Write a ticket atomically; returns its size in bytes."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
    return len(buf.getvalue())


META_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str, "model": dict, "normalizer": dict, "classes": list, "fs": (int, float), "dtype": str,
    "layers": list, "source": str, "code_version": str}
"""The keys a ticket's metadata must hold, and their JSON types."""
OPTIONAL_META: dict[str, type] = {"data_fingerprint": str, "split": dict, "af_operating_point": dict, "window": int}
"""Keys a ticket's metadata may hold (tickets made before them have none, and still load):
``data_fingerprint`` and ``split`` name the data set it was trained on and the validation
and test records it was measured on (made_with; every evaluation on --data checks them:
check_ticket_data); ``af_operating_point`` is the threshold on P(AF) chosen on validation
(operating_point.shipped_threshold), which predict.py applies; ``window`` is the length in
samples of the windows it was trained on (train.py --crop), on which predict.py --windows
scores a record."""
SPLIT_KEYS = ("val", "test", "digest")
INDEX_KINDS = ("bits", "gaps16", "gaps32")
STORED_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


def check_meta(meta: dict, arrays: dict[str, np.ndarray], path: Path) -> None:
    """Refuse a ticket whose metadata would make predictions wrong without an error: class
    names in another order (probabilities under the wrong names), a normaliser that is not
    finite or has std <= 0 (every probability NaN), another input rate, a layout that does
    not match the stored arrays. Each refusal names the field."""
    def bad(what: str) -> TicketError:
        return TicketError(f"{path}: {what}; the ticket's metadata was changed or damaged: export it again "
                           "with export_ticket.py")

    for key, kind in META_SCHEMA.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise bad(f"metadata field {key!r} is {meta.get(key)!r}, expected a JSON "
                      f"{' or '.join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))}")
    if meta["classes"] != list(CLASSES):
        raise bad(f"classes {meta['classes']!r}, expected exactly {list(CLASSES)!r} in this order (the network's "
                  "outputs are in that order)")
    norm = meta["normalizer"]
    if set(norm) != {"mean", "std"} or not all(isinstance(norm[k], (int, float)) and not isinstance(norm[k], bool)
                                               and math.isfinite(norm[k]) for k in norm) or norm["std"] <= 0:
        raise bad(f"normalizer {norm!r}, expected finite 'mean' and 'std' with std > 0")
    if meta["model"].get("num_classes", len(CLASSES)) != len(CLASSES):
        raise bad(f"num_classes {meta['model']['num_classes']!r} in the network's configuration, expected "
                  f"{len(CLASSES)} ({', '.join(CLASSES)})")
    if meta["fs"] != FS:
        raise bad(f"input rate {meta['fs']!r} Hz, expected {FS} (the rate the network was trained at)")
    if meta["dtype"] not in DTYPES:
        raise bad(f"dtype {meta['dtype']!r}, expected one of {', '.join(DTYPES)}")
    for layer in meta["layers"]:
        if not (isinstance(layer, list) and len(layer) == 3 and isinstance(layer[0], int) and layer[0] >= 0
                and layer[1] in INDEX_KINDS and isinstance(layer[2], int) and layer[2] >= 0):
            raise bad(f"layer entry {layer!r}, expected [survivors, one of {', '.join(INDEX_KINDS)}, index bytes]")
    expected = {"values": STORED_DTYPES[meta["dtype"]], "scales": np.float32, "index": np.uint8,
                "others": np.float32}
    for name, dtype in expected.items():
        a = arrays[name]
        if a.ndim != 1 or a.dtype != dtype:
            raise bad(f"array {name!r} is {a.dtype} of shape {a.shape}, expected 1-D {np.dtype(dtype)}")
    if len(arrays["scales"]) != len(meta["layers"]):
        raise bad(f"{len(arrays['scales'])} scales for {len(meta['layers'])} layers")
    if not (np.isfinite(arrays["scales"]).all() and (arrays["scales"] > 0).all()):
        raise bad("a layer's scale is not finite and positive")
    for key, kind in OPTIONAL_META.items():
        if key in meta and not isinstance(meta[key], kind):
            raise bad(f"metadata field {key!r} is {meta[key]!r}, expected a JSON {kind.__name__}")
    if "data_fingerprint" in meta and not re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{16}", meta["data_fingerprint"]):
        raise bad(f"data_fingerprint {meta['data_fingerprint']!r}, expected two 16-digit hex digests joined by '-'")
    if "window" in meta:  # an int by now (OPTIONAL_META); bool is an int to isinstance, not here
        window, stride = meta["window"], HannunConfig(**meta["model"]).stride
        if isinstance(window, bool) or window < stride or window % stride:
            raise bad(f"window {window!r}, expected a positive multiple of the network's output stride ({stride} "
                      "samples): the length of the windows it was trained on")
    split = meta.get("split")
    if split is not None and not (set(split) == set(SPLIT_KEYS) and isinstance(split["digest"], str)
                                  and all(isinstance(split[k], int) and split[k] >= 0 for k in ("val", "test"))):
        raise bad(f"split {split!r}, expected record counts 'val' and 'test' and a 'digest'")
    op = meta.get("af_operating_point")
    if op is not None:
        t = op.get("threshold")
        if (op.get("class") != "A" or op.get("target") not in ("ppv", "sensitivity")
                or not isinstance(op.get("value"), (int, float)) or not 0 < op["value"] <= 1
                or not (t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1))):
            raise bad(f"af_operating_point {op!r}, expected class 'A', target 'ppv' or 'sensitivity', a value in "
                      "(0, 1] and a threshold in [0, 1] (or null: the target was not reached on validation)")


def load_ticket(path: Path | str) -> tuple[HannunNet, dict]:
    """The network of a ticket file (eval mode, pruned weights exactly zero) and its meta."""
    path = Path(path)
    if path.is_dir():
        raise TicketError(f"{path}: a folder, not a ticket file (give its ticket-*.npz)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise TicketError(f"{path}: cannot be read ({e.strerror or e})") from e
    if head != b"PK\x03\x04":  # an .npz is a zip archive
        raise TicketError(f"{path}: not a ticket file (export_ticket.py writes .npz archives; this file "
                          f"starts with {head!r})")
    try:
        z = np.load(path, allow_pickle=False)
        with z:
            arrays = {k: z[k] for k in ("values", "scales", "index", "others", "meta")}
        meta = json.loads(arrays["meta"].tobytes())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
        check_meta(meta, arrays, path)
        model = HannunNet(HannunConfig(**meta["model"]))
        state = model.state_dict()
        v = i = o = 0
        index = arrays["index"].tobytes()
        weights = pm.prunable_weights(model)
        if len(meta["layers"]) != len(weights):
            raise ValueError(f"{len(meta['layers'])} pruned layers stored, the network has {len(weights)}")
        for (name, weight), (n, kind, nbytes), scale in zip(weights.items(), meta["layers"], arrays["scales"],
                                                             strict=True):
            mask = decode_mask(kind, index[i:i + nbytes], tuple(weight.shape))
            if int(mask.sum()) != n:
                raise ValueError(f"layer {name}: index holds {int(mask.sum())} survivors, expected {n}")
            w = np.zeros(weight.numel(), dtype=np.float32)
            w[mask] = arrays["values"][v:v + n].astype(np.float32) * np.float32(scale)
            state[f"{name}.weight"] = torch.from_numpy(w).view(weight.shape)
            v, i = v + n, i + nbytes
        for key in other_keys(model):
            n = state[key].numel()
            state[key] = torch.from_numpy(arrays["others"][o:o + n].copy()).view(state[key].shape)
            o += n
        if (v, i, o) != (len(arrays["values"]), len(index), len(arrays["others"])):
            raise ValueError("the stored arrays do not match the network's layout")
        model.load_state_dict(state)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError, IndexError,
            RuntimeError) as e:
        raise TicketError(f"{path}: not a readable ticket file ({type(e).__name__}: {e})") from e
    check_finite(model.state_dict(), path)
    return model.eval(), meta


# --------------------------------------------------------------------------- the data a ticket was made with


def split_of(records: pd.Series, splits: pd.Series) -> dict:
    """Counts of the validation and test records and a digest of which records they are
    (sorted 'record,split' lines): the held-out part of a split, which decides whether an
    evaluation scores records the ticket was trained on."""
    held = sorted(f"{r},{s}" for r, s in zip(records, splits, strict=True) if s in ("val", "test"))
    return {"val": sum(line.endswith(",val") for line in held), "test": sum(line.endswith(",test") for line in held),
            "digest": hashlib.sha256("\n".join(held).encode()).hexdigest()[:16]}


def made_with(run: Path) -> dict:
    """The optional metadata naming the data a run folder was trained on: its data
    fingerprint (config.json) and its split (the records of its predictions.csv); empty
    for a run that records neither."""
    out = {}
    config = next((p / rf.CONFIG for p in (run, run.parent) if (p / rf.CONFIG).is_file()), None)
    fingerprint = json.loads(config.read_text()).get("data_fingerprint") if config else None
    if fingerprint:
        out["data_fingerprint"] = fingerprint
    if (run / train.PREDICTIONS).is_file():
        table = pd.read_csv(run / train.PREDICTIONS, keep_default_na=False, dtype=str)
        out["split"] = split_of(table["record"], table["split"])
    return out


def check_ticket_data(meta: dict, data: Path, path: Path | str) -> None:
    """Refuse to evaluate the ticket ``path`` on ``data`` unless it is the data set the ticket
    was made with (same fingerprint: records, labels, split and samples): on another build or
    split its training records would be scored as validation or test records. A ticket that
    records no fingerprint (exported before it was stored) is refused too: it cannot be checked."""
    try:
        here = rf.data_fingerprint(data)
        table = pd.read_csv(data / "records.csv", keep_default_na=False, dtype=str)
        split_here = split_of(table["record"], table["split"])
    except (OSError, KeyError, ValueError) as e:
        raise TicketError(f"{data}: cannot read the data set ({type(e).__name__}: {e}); give --data a folder "
                          "made by build_datasets.py") from None
    made = meta.get("data_fingerprint")
    if made is None:
        raise TicketError(f"{path} does not record the data set it was made with (exported before tickets stored "
                          f"it), so its figures on {data} (fingerprint {here}) cannot be trusted: export it again "
                          "from its run folder with export_ticket.py")
    if made != here:
        split = meta.get("split")
        how = ("another split of the records (its validation/test records are not those of --data: its training "
               "records would be scored as held-out ones)" if split is None or split != split_here else
               "the same validation and test records, but other samples or labels")
        raise TicketError(f"{path} was made with the data set of fingerprint {made}, but {data} has fingerprint "
                          f"{here}: {how}. Give --data the data set the ticket was made with (build_datasets.py "
                          "with the same flags and source), or use a ticket trained on this one")


def check_made_with(source: Path, data: Path) -> None:
    """Before evaluating ``source`` (a ticket file, or a run or round folder) on ``data``:
    exit with a sentence naming both fingerprints unless it was made with that data set."""
    try:
        if source.is_file():
            check_ticket_data(load_ticket(source)[1], data, source)
        else:
            rf.check_same_data(data, made_with(source).get("data_fingerprint"), str(source))
    except TicketError as e:
        raise SystemExit(f"error: {e}") from None


def restamp(path: Path, fields: dict) -> int:
    """Write ``path`` again with ``fields`` added to its metadata and every other array
    byte for byte as it was (the same weights); returns its new size in bytes."""
    load_ticket(path)  # refuse a damaged ticket before touching it
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = {**json.loads(arrays["meta"].tobytes()), **fields}
    check_meta(meta, arrays, path)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return save_ticket(arrays, path)


# --------------------------------------------------------------------------- accounting


def record_input(samples: int = RECORD_SAMPLES, stride: int = 256) -> torch.Tensor:
    """A 30-s record at 200 Hz, zero-padded to the output stride as training does."""
    return torch.randn(1, 1, stride * math.ceil(samples / stride), generator=torch.Generator().manual_seed(0))


def flops_per_record(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(dense, sparse) multiply-add FLOPs (2 per MAC) of the convolutions and the linear
    layer for input ``x``; sparse counts only the non-zero weights (model.flops)."""
    positions = output_positions(model, x)
    layers = dict(model.named_modules())
    return (flops(positions, {n: layers[n].weight.numel() for n in positions}),
            flops(positions, {n: int(torch.count_nonzero(layers[n].weight)) for n in positions}))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    prunable = pm.prunable_weights(model)
    weights = sum(int(torch.count_nonzero(w)) for w in prunable.values())
    others = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in prunable
                 or not n.endswith("weight"))
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "prunable_weights": sum(w.numel() for w in prunable.values()),
            "nonzero_weights": weights, "with_biases_and_bn": weights + others}


def xz_size(data: bytes) -> int:
    return len(lzma.compress(data, preset=9))


# --------------------------------------------------------------------------- faster sparse inference


def shrink(model: HannunNet) -> HannunNet:
    """A copy without the dead inner channels of each residual block: a channel between
    conv1 and conv2 that conv2 never reads (all its weights zero) is removed from conv1,
    bn2 and conv2. Exact: the removed values are multiplied by zero."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        keep = block.conv2.weight.detach().abs().sum(dim=(0, 2)) > 0
        if keep.all():
            continue
        keep = keep if keep.any() else torch.arange(len(keep)) == 0  # keep one channel
        c1, bn, c2 = block.conv1, block.bn2, block.conv2
        new1 = SameConv1d(c1.in_channels, int(keep.sum()), c1.kernel_size[0], c1.stride[0])
        new2 = SameConv1d(int(keep.sum()), c2.out_channels, c2.kernel_size[0], 1)
        newbn = nn.BatchNorm1d(int(keep.sum()))
        with torch.no_grad():
            new1.weight.copy_(c1.weight[keep])
            new1.bias.copy_(c1.bias[keep])
            new2.weight.copy_(c2.weight[:, keep])
            new2.bias.copy_(c2.bias)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(newbn, name).copy_(getattr(bn, name)[keep])
        block.conv1, block.bn2, block.conv2 = new1, newbn.eval(), new2
    return model.eval()


class SparseConv1d(nn.Module):
    """Inference-only conv as im2col + a CSR sparse matrix product, for very sparse layers
    (CPU, fp32; its tensors are plain attributes, not parameters: build it on the device
    and in the dtype it will run in)."""

    def __init__(self, conv: SameConv1d):
        super().__init__()
        out_ch = conv.out_channels
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.weight = conv.weight.detach().reshape(out_ch, -1).to_sparse_csr()
        self.bias = conv.bias.detach().clone()
        self.k, self.stride, self.padding, self.same_pad = (conv.kernel_size[0], conv.stride[0],
                                                            conv.padding[0], conv.same_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.same_pad if self.same_pad is not None else (self.padding, self.padding))
        cols = x.unfold(2, self.k, self.stride)  # [B, in, L_out, k]
        b, c, n, k = cols.shape
        cols = cols.permute(1, 3, 0, 2).reshape(c * k, b * n)  # rows ordered (in, k) like the weight
        y = torch.sparse.mm(self.weight, cols) + self.bias[:, None]
        return y.view(-1, b, n).transpose(0, 1)


def sparsify(model: HannunNet, max_density: float = 0.1) -> HannunNet:
    """A copy whose convs with at most ``max_density`` non-zero weights use SparseConv1d."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SameConv1d):
                density = float(torch.count_nonzero(child.weight)) / child.weight.numel()
                if density <= max_density:
                    setattr(parent, name, SparseConv1d(child))
    return model.eval()


def median_seconds(fn: Callable[[], object], seconds: float, warmup: int = 2, min_runs: int = 3) -> float:
    """Median seconds of one call of ``fn``, after ``warmup`` calls, over ``seconds`` of
    calls (at least ``min_runs``): robust to the odd slow call on a noisy machine."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency_ms(model: nn.Module, x: torch.Tensor, threads: int, seconds: float = 2.0) -> float:
    """Median wall time of one forward pass (batch of one record) at ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return 1000 * median_seconds(lambda: model(x), seconds, warmup=3, min_runs=5)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> float:
    """Write ``model`` as ONNX (any batch size, any length that is a multiple of the output
    stride, as predict.py pads to) and return the largest absolute
    difference between onnxruntime's logits and PyTorch's on ``x``."""
    try:
        import onnx  # noqa: F401, PLC0415 - optional dependencies
        import onnxruntime  # noqa: PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError as e:
        raise TicketError("--onnx needs the optional packages in requirements-export.txt "
                          "(pip install -r requirements-export.txt)") from e
    batch, samples = torch.export.Dim("batch"), torch.export.Dim("steps")
    stride = model.cfg.stride
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["ecg"], output_names=["logits"],
                                dynamic_shapes={"x": {0: batch, 2: stride * samples}}, verbose=False)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.cat([x, x.flip(-1)])[..., : x.shape[-1] - stride]  # another batch size and length
    with torch.inference_mode():
        expected = model(probe).numpy()
    got = session.run(None, {"ecg": probe.numpy()})[0]
    return float(np.abs(got - expected).max())


class OnnxModule(nn.Module):
    """An onnxruntime session behind the call train.evaluate and latency_ms make (CPU, fp32
    in and out, ``threads`` intra-op threads)."""

    def __init__(self, path: Path, threads: int = 1):
        super().__init__()
        import onnxruntime  # noqa: PLC0415 - optional dependency

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"ecg": x.detach().float().cpu().numpy()})[0])


def calibration_inputs(data: Path, norm: dict, stride: int, records: int) -> list[np.ndarray]:
    """The first ``records`` training records, z-scored and zero-padded to the stride, as
    the network sees them (``[1, 1, L]`` float32 each)."""
    ds = load_dataset(data)
    out = []
    for i in ds.indices("train")[:records]:
        n = int(ds.lengths[i])
        x = np.zeros((1, 1, stride * math.ceil(n / stride)), dtype=np.float32)
        x[0, 0, :n] = (ds.signals[i, :n] - norm["mean"]) / norm["std"]
        out.append(x)
    return out


def quantize_onnx(fp32: Path, out: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 quantisation of an fp32 graph with onnxruntime.quantization: shape
    inference and BatchNorm folding first (quant_pre_process), then QDQ with per-channel
    int8 weights and uint8 activations whose ranges are the min-max over ``calibration``.
    (uint8 activations: onnxruntime's fast x86 kernels take u8 x s8; with int8 activations
    the same graph ran 5x slower here, with int16 slower than fp32.)"""
    from onnxruntime.quantization import (  # noqa: PLC0415 - optional dependency
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = iter(calibration)

        def get_next(self) -> dict | None:
            x = next(self.inputs, None)
            return None if x is None else {"ecg": x}

    prepared = out.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)


# --------------------------------------------------------------------------- F1 of the exports


def evaluate_variants(variants: dict[str, nn.Module], data: Path, norm: dict, stride: int, flags: dict
                      ) -> dict[str, dict[str, float]]:
    """Validation and test challenge F1 and accuracy of each network on ``data``, in fp32,
    with the run's evaluation settings (batch size, aggregation)."""
    ds = load_dataset(data)
    batcher = batching.Batcher(ds, batching.Normalizer(**norm), stride, torch.device("cpu"))
    cfg = train.TrainConfig(eval_batch_size=flags.get("eval_batch_size", 64), aggregate=flags.get("aggregate", "mean"))
    out = {}
    for label, model in variants.items():
        row = {}
        for split in ("val", "test"):
            m = train.evaluate(model, batcher, ds, split, cfg, bf16=False)
            row[f"{split}_challenge_f1"], row[f"{split}_accuracy"] = m["challenge_f1"], m["accuracy"]
        out[label] = row
    return out


# --------------------------------------------------------------------------- command line


def operating_point_lines(op: dict | None) -> list[str]:
    """The AF operating point of a report, as Markdown lines (none when there is none)."""
    if op is None:
        return []
    if op["threshold"] is None:
        return ["", f"AF operating point: no threshold on {op['score']} reaches {op['target']} {op['value']:g} "
                "on the validation records; predict.py reports the argmax class only."]
    ci = lambda d: f"{d['mean']:.3f} ({d['low']:.3f} to {d['high']:.3f})"  # noqa: E731
    return ["", f"AF operating point (predict.py flags a record as AF when {op['score']} >= {op['threshold']:.5g}): "
            f"the lowest threshold whose **validation** {op['target']} reaches {op['value']:g} "
            f"(operating_point.shipped_threshold; validation sensitivity {op['val_sensitivity']:.3f}, PPV "
            f"{op['val_ppv']:.3f}).", "",
            "| at the threshold, test records | value (95 % bootstrap interval over records) |",
            "| --- | ---: |",
            f"| AF sensitivity | {ci(op['test_sensitivity'])} |", f"| AF PPV | {ci(op['test_ppv'])} |"]


def report_markdown(r: dict) -> str:
    c, b = r["counts"], r["bytes"]
    lines = [f"# Ticket {r['source']}", "",
             f"Code version {r['code_version']}; compression {c['prunable_weights'] / c['nonzero_weights']:.1f}x "
             "of the prunable weights.", "",
             "| | dense | ticket | reduction |", "| --- | ---: | ---: | ---: |",
             f"| weights of convs + linear | {c['prunable_weights']:,} | {c['nonzero_weights']:,} | "
             f"{c['prunable_weights'] / c['nonzero_weights']:.1f}x |",
             f"| parameters: surviving weights + all biases and BatchNorm | {c['parameters']:,} | "
             f"{c['with_biases_and_bn']:,} | "
             f"{c['parameters'] / c['with_biases_and_bn']:.1f}x |",
             f"| FLOPs per 30-s record | {r['flops']['dense']:,} | {r['flops']['sparse']:,} | "
             f"{r['flops']['dense'] / r['flops']['sparse']:.1f}x |"]
    for dtype in r["dtypes"]:
        lines.append(f"| bytes on disk, {dtype} ticket (fp32 dense checkpoint) | {b['dense_fp32']:,} | "
                     f"{b[f'ticket_{dtype}']:,} | {b['dense_fp32'] / b[f'ticket_{dtype}']:.1f}x |")
        lines.append(f"| bytes xz-compressed, {dtype} | {b['dense_fp32_xz']:,} | {b[f'ticket_{dtype}_xz']:,} | "
                     f"{b['dense_fp32_xz'] / b[f'ticket_{dtype}_xz']:.1f}x |")
    lines += ["", "CPU latency per 30-s record (batch 1, fp32, median ms):", "",
              "| network | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in r["threads"]) + " |",
              "| --- |" + " ---: |" * len(r["threads"])]
    for label, times in r["latency_ms"].items():
        lines.append(f"| {label} | " + " | ".join(f"{times[str(t)]:.1f}" for t in r["threads"]) + " |")
    if r.get("f1"):
        lines += ["", "| network | val challenge F1 | test challenge F1 | val accuracy | test accuracy |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, m in r["f1"].items():
            lines.append(f"| {label} | {m['val_challenge_f1']:.4f} | {m['test_challenge_f1']:.4f} | "
                         f"{m['val_accuracy']:.4f} | {m['test_accuracy']:.4f} |")
    lines += operating_point_lines(r.get("af_operating_point"))
    if r.get("data_fingerprint"):
        split = r.get("split") or {}
        lines += ["", f"Made with the data set of fingerprint `{r['data_fingerprint']}`"
                  + (f" ({split['val']} validation and {split['test']} test records, digest `{split['digest']}`)"
                     if split else "") + "; evaluating it on other data is refused."]
    if "fp32_roundtrip_exact" in r:
        lines += ["", f"fp32 ticket loads back bit-exact: {'yes' if r['fp32_roundtrip_exact'] else 'NO'}."]
    if "onnx_max_abs_diff" in r:
        lines += ["", f"ONNX (dead channels removed): {r['onnx_bytes']:,} bytes; largest |logit difference| to "
                  f"PyTorch: {r['onnx_max_abs_diff']:.2e}"]
    if "onnx_int8_bytes" in r:
        lines += ["", f"ONNX int8 (static, calibrated on {r['onnx_int8_calibration_records']} training records): "
                  f"{r['onnx_int8_bytes']:,} bytes; its F1 and latency are in the tables above."]
    return "\n".join(lines) + "\n"


def resolve_run(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The run folder of --exp with --winner or --method/--round, for --seed: looked up in
    EXP/results.csv, so a redone round under --goal (round_NN_tryK) and the seed's own
    round number at the winning compression are found."""
    results = args.exp / "results.csv"
    if not results.is_file():
        p.error(f"{results} not found: run run_experiments.py --exp {args.exp} first")
    import plot_results  # noqa: PLC0415 - its results.csv reader checks the table's schema

    table = plot_results.load_all(args.exp)
    table = table[(table["seed"] == args.seed) & (table["control"] == "none") & table["accepted"]]
    if args.round == 0:
        rows = table[table["round"] == 0]
    elif args.winner:
        winners = args.exp / "plots" / "winners.csv"
        if not winners.is_file():
            p.error(f"{winners} not found: run plot_results.py --exp {args.exp} first")
        best = pd.read_csv(winners)
        best = best[(best["control"] == "none") & ((best["method"] == args.method) if args.method else True)]
        if best.empty:
            p.error(f"{winners} has no winning ticket{' for ' + args.method if args.method else ''}")
        args.method, ratio = best.iloc[0]["method"], float(best.iloc[0]["compression"])
        rows = table[(table["method"] == args.method) & (pm.ratio_key(table["compression"]) == pm.ratio_key(ratio))]
    elif args.method is None or args.round is None:
        p.error("--exp needs --method and --round (0 = dense), or --winner")
    else:
        rows = table[(table["method"] == args.method) & (table["round"] == args.round)]
    if rows.empty:
        p.error(f"{results}: no accepted run for seed {args.seed}, method {args.method}, round {args.round}"
                + (" at the winning compression" if args.winner else ""))
    row = rows.iloc[0]
    print(f"exporting {row['folder']} ({row['compression']:.1f}x)")
    return args.exp / row["folder"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a finished run folder: <exp>/seedS/<method>/round_NN or .../dense")
    p.add_argument("--exp", type=Path,
                   help="or: experiment folder, with --method and --round, or --winner (and --seed)")
    p.add_argument("--winner", action="store_true",
                   help="with --exp: the most compressed winning ticket in EXP/plots/winners.csv (plot_results.py), "
                   "of --method if given")
    p.add_argument("--method", help="retraining method (with --exp)")
    p.add_argument("--round", type=int, help="pruning round (with --exp; 0 = the dense network)")
    p.add_argument("--seed", type=int, default=0, help="seed (with --exp)")
    p.add_argument("--out", type=Path, required=True, help="folder for the ticket files and report")
    p.add_argument("--dtypes", default="fp32,fp16,int8", help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--data", type=Path, help="data set folder: also evaluate every exported variant on it")
    p.add_argument("--onnx", action="store_true", help="also write ticket.onnx, and with --data ticket-int8.onnx "
                   "(needs requirements-export.txt)")
    p.add_argument("--calibration", type=int, default=64, help="training records calibrating ticket-int8.onnx")
    p.add_argument("--threads", default="1,2", help="CPU thread counts for the latency table")
    p.add_argument("--latency-seconds", type=float, default=2.0, help="time spent measuring each latency")
    p.add_argument("--af-ppv", type=float, default=0.9,
                   help="the AF operating point stored in the ticket: the lowest threshold on P(AF) whose "
                   "validation PPV reaches this (needs the run's class probabilities in predictions.csv)")
    args = p.parse_args(argv)
    if not 0 < args.af_ppv <= 1:
        p.error(f"--af-ppv must be in (0, 1], got {args.af_ppv}")
    if (args.run is None) == (args.exp is None):
        p.error("give either --run or --exp with --method and --round")
    if args.run is not None and (args.winner or args.method or args.round is not None):
        p.error("--winner, --method and --round go with --exp, not --run")
    if args.exp is not None:
        args.run = resolve_run(p, args)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}, got {args.dtypes}")
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
        assert args.threads and min(args.threads) >= 1
    except (ValueError, AssertionError):
        p.error(f"--threads must be positive integers, got {args.threads!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    with rf.script_errors():
        return export(parse_args(argv))


def export(args: argparse.Namespace) -> dict:
    """What main() does with the parsed flags."""
    try:
        cfg, state, masks, norm, trained_metrics = read_run(args.run)
    except TicketError as e:
        sys.exit(f"error: {e}")
    if args.data is not None:  # before any work: F1 on other data would be a wrong number
        rf.check_same_data(args.data, trained_metrics.get("data_fingerprint"), str(args.run))
    args.out.mkdir(parents=True, exist_ok=True)
    trained = build_model(cfg, state)
    if masks is not None:  # the weights are zero where pruned; make sure of it
        for name, w in pm.prunable_weights(trained).items():
            if name in masks:  # layers kept dense (--dense-layers) have no mask
                w.data.mul_(masks[name])
    dense_buf = io.BytesIO()
    torch.save(state, dense_buf)
    report: dict = {"source": str(args.run), "code_version": code_version(), "dtypes": args.dtypes,
                    "threads": args.threads, "counts": parameter_counts(trained),
                    "bytes": {"dense_fp32": len(dense_buf.getvalue()), "dense_fp32_xz": xz_size(dense_buf.getvalue())}}
    extra = made_with(args.run)  # the data it was made with, checked wherever it is evaluated
    if trained_metrics["flags"].get("crop"):  # trained on windows: predict.py --windows scores on them
        extra["window"] = int(trained_metrics["flags"]["crop"])
    op = operating_point.shipped_threshold(args.run, "ppv", args.af_ppv)  # None: no probabilities
    if op is not None:
        extra["af_operating_point"] = op
    report.update(extra)
    variants: dict[str, nn.Module] = {}
    for dtype in args.dtypes:
        path = args.out / f"ticket-{dtype}.npz"
        size = save_ticket(ticket_arrays(cfg, state, masks, norm, dtype, str(args.run), extra), path)
        report["bytes"][f"ticket_{dtype}"] = size
        report["bytes"][f"ticket_{dtype}_xz"] = xz_size(path.read_bytes())
        variants[f"exported {dtype}"] = load_ticket(path)[0]
    exact = variants.get("exported fp32")
    if exact is not None:
        report["fp32_roundtrip_exact"] = all(torch.equal(a, exact.state_dict()[k])
                                             for k, a in trained.state_dict().items()
                                             if not k.endswith("num_batches_tracked"))
    x = record_input(stride=cfg.stride)
    dense_flops, sparse_flops = flops_per_record(trained, x)
    report["flops"] = {"dense": dense_flops, "sparse": sparse_flops}
    shrunk = shrink(trained)
    fast = {"ticket, dense kernels": trained, "ticket, dead channels removed": shrunk,
            "ticket, dead channels removed + sparse kernels": sparsify(shrunk)}
    with torch.inference_mode():
        reference = trained(x)
        report["max_abs_diff_fast_paths"] = {k: float((m(x) - reference).abs().max()) for k, m in fast.items()}
    report["inner_channels"] = {"before": sum(b.conv1.out_channels for b in trained.blocks),
                                "after": sum(b.conv1.out_channels for b in shrunk.blocks)}
    dense_net = HannunNet(cfg).eval()  # same architecture, random dense weights: the dense cost
    report["latency_ms"] = {
        label: {str(t): latency_ms(m, x, t, args.latency_seconds) for t in args.threads}
        for label, m in {"dense network": dense_net, **fast}.items()}
    onnx_variants: dict[str, Path] = {}
    if args.onnx:
        try:
            report["onnx_max_abs_diff"] = export_onnx(shrunk, x, args.out / "ticket.onnx")
            onnx_variants["ONNX fp32 (onnxruntime)"] = args.out / "ticket.onnx"
            if args.data is not None:
                calibration = calibration_inputs(args.data, norm, cfg.stride, args.calibration)
                quantize_onnx(args.out / "ticket.onnx", args.out / "ticket-int8.onnx", calibration)
                onnx_variants["ONNX int8 static (onnxruntime)"] = args.out / "ticket-int8.onnx"
                report["onnx_int8_bytes"] = (args.out / "ticket-int8.onnx").stat().st_size
                report["onnx_int8_calibration_records"] = len(calibration)
        except (TicketError, DatasetError) as e:
            sys.exit(f"error: {e}")
        report["onnx_bytes"] = (args.out / "ticket.onnx").stat().st_size
        for label, path in onnx_variants.items():
            report["latency_ms"][label] = {str(t): latency_ms(OnnxModule(path, t), x, t, args.latency_seconds)
                                           for t in args.threads}
    if args.data is not None:
        try:
            report["f1"] = {f"trained ticket (metrics.json{', bf16' if trained_metrics.get('bf16') else ''})": {
                f"{s}_{k}": trained_metrics[s][k] for s in ("val", "test") for k in ("challenge_f1", "accuracy")}}
            report["f1"].update(evaluate_variants({"trained ticket (fp32)": trained, **variants,
                                                   "dead channels removed + sparse kernels":
                                                   fast["ticket, dead channels removed + sparse kernels"],
                                                   **{k: OnnxModule(p) for k, p in onnx_variants.items()}},
                                                  args.data, norm, cfg.stride, trained_metrics["flags"]))
        except DatasetError as e:
            sys.exit(f"error: {e}")
    atomic_write(args.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    text = report_markdown(report)
    atomic_write(args.out / "report.md", text.encode())
    print(text)
    return report


def cli() -> None:
    """The ecg-export-ticket command (pyproject.toml): main() returns the report for callers in
    Python, which a console entry point would pass to sys.exit and print as an error."""
    main()


if __name__ == "__main__":
    cli()
