"""Carry unfinished pruning chains from one machine to the next, and rebuild dense weights.

Checkpoints (``*.pt``) are not kept in git, so on a fresh clone a finished run is read back
from its text files but a chain of pruning rounds cannot go on: its next round needs the
masks and trained weights of the rounds before, and retraining them on another machine
gives other weights (see rebuild-dense). A CPU-scale LTH-ECG chain (25-30 trainings of ~7
minutes) is longer than one sitting, so this script carries it:

  save EXP [EXP ...]           for every method folder whose chain is unfinished, write
                               ``state.npz`` beside its rounds.csv: every round's mask
                               (bit-packed), the trained weights of its last two accepted
                               rounds (non-zero values only), a late_reset chain's weights at
                               the rewind step, and the digest of the seed's initial weights.
                               A few hundred kB per chain, small enough to commit.
  restore EXP [EXP ...]        write those back as mask.pt / model.pt / rewind_<k>.pt, and
                               re-create the seed's init.pt from its seed (``torch.manual_seed``
                               then the network's own initialisation), checked against the
                               saved digest. Existing files are never overwritten.
  rebuild-dense EXP [EXP ...]  retrain every finished dense run whose init.pt or model.pt is
                               missing, with the flags in its config.json, and keep the new
                               weights only if its predictions, metrics and per-epoch losses
                               equal the recorded ones exactly. Every step is seeded, so a run
                               repeats bit for bit on the same CPU model, software and thread
                               count (run it as run.sh runs the grid, ``OMP_NUM_THREADS=1``);
                               on another CPU it does not (measured: seed 2's dense run of
                               results/cinc2017-cpu, retrained in a later session, drifted from
                               epoch 1 and ended at validation F1 0.814 against the recorded
                               0.789), and the rebuild is refused rather than silently mixing
                               two runs. Dense folders linked between experiments
                               (``--dense-from``: the same metrics.json) are rebuilt once.

Then the same run.sh / run_experiments.py command resumes the chain where it stopped.
Example (end of one sitting, then the next one on a fresh clone):
    python run_state.py save results/cinc2017-cpu-lthecg && git add results/cinc2017-cpu-lthecg
    python run_state.py restore results/cinc2017-cpu-lthecg
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import prune as pm
import run_folders as rf
import train as tr
from build_datasets import DatasetError, load_dataset
from model import HannunConfig, HannunNet

STATE = "state.npz"
SEP = "|"  # between the parts of an array's name in state.npz


# --------------------------------------------------------------------------- tensors <-> arrays


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (not torch.save's bytes,
    which carry pickling details)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def pack_tensors(prefix: str, tensors: dict[str, torch.Tensor], out: dict[str, np.ndarray]) -> None:
    """Each tensor as its shape, a bit-packed non-zero pattern and its non-zero values:
    exact (a zero comes back as +0.0), and small for pruned weights and masks."""
    for name, t in tensors.items():
        a = t.detach().cpu().numpy()
        nonzero = a != 0
        out[SEP.join((prefix, name, "shape"))] = np.asarray(a.shape, dtype=np.int64)
        out[SEP.join((prefix, name, "nonzero"))] = np.packbits(nonzero.ravel())
        if a.dtype != np.bool_:
            out[SEP.join((prefix, name, "values"))] = a[nonzero]
            out[SEP.join((prefix, name, "dtype"))] = np.asarray(str(a.dtype))


def unpack_tensors(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    names = sorted({k.split(SEP)[1] for k in arrays if k.split(SEP)[0] == prefix})
    tensors = {}
    for name in names:
        key = SEP.join((prefix, name, "{}")).format
        shape = tuple(int(s) for s in arrays[key("shape")])
        count = int(np.prod(shape, dtype=np.int64))
        nonzero = np.unpackbits(arrays[key("nonzero")], count=count).astype(bool)
        if key("values") in arrays:
            a = np.zeros(count, dtype=np.dtype(str(arrays[key("dtype")])))
            a[nonzero] = arrays[key("values")]
        else:
            a = nonzero
        tensors[name] = torch.from_numpy(a.reshape(shape))
    return tensors


# --------------------------------------------------------------------------- save / restore


def method_folders(exp: Path) -> list[Path]:
    """Every method folder (seed*/<method>, controls included) that holds a rounds.csv."""
    return sorted(p.parent for p in exp.glob("seed*/*/" + tr.ROUNDS))


def unfinished(method_dir: Path) -> bool:
    """Whether the chain may still train: its flags' --goal/--target-ratio/--rounds are not
    reached (the test of train.finished_table, without the controls, which need the same
    state anyway). A control folder carries nothing: its masks and weights come from the
    method's chain."""
    if "+" in method_dir.name:
        return False
    flags = json.loads((method_dir / rf.CONFIG).read_text())["flags"]
    table = pd.read_csv(method_dir / tr.ROUNDS)
    last = table[table["accepted"]].iloc[-1]
    if method_dir.name in tr.BASELINES:
        return last["round"] < min(flags["rounds"], pm.rounds_to_reach(flags["target_ratio"], flags["prune_fraction"]))
    stopped = (flags.get("goal") and not table.iloc[-1]["accepted"]
               and table.iloc[-1]["fraction"] / flags["alpha"] < flags["min_fraction"])
    return not (last["compression"] >= flags["target_ratio"] * (1 - 1e-9) or last["round"] >= flags["rounds"]
                or stopped)


def save(method_dir: Path) -> Path | None:
    """Write ``state.npz`` for one chain (see the module docstring); returns its path, or
    None when the chain's weights are not on this machine (a ``state.npz`` already there,
    from an earlier save, is kept)."""
    exp_dir = method_dir.parent.parent
    table = pd.read_csv(method_dir / tr.ROUNDS)
    accepted = [exp_dir / f for f in table.loc[table["accepted"], "folder"]]
    needed = [method_dir.parent / tr.DENSE / tr.INIT] + [d / tr.FINAL for d in accepted if d.parent == method_dir][-1:]
    if not all(p.is_file() for p in needed):
        return None
    arrays: dict[str, np.ndarray] = {}
    for folder in table["folder"]:
        d = exp_dir / folder
        if d.parent == method_dir and (d / tr.MASK).is_file():
            pack_tensors(f"mask:{d.name}", rf.load_pt(d / tr.MASK), arrays)
    for d in [d for d in accepted if d.parent == method_dir][-2:]:
        pack_tensors(f"model:{d.name}", rf.load_pt(d / tr.FINAL), arrays)
    dense = method_dir.parent / tr.DENSE
    arrays["init_digest"] = np.asarray(state_digest(rf.load_pt(dense / tr.INIT)))
    flags = json.loads((method_dir / rf.CONFIG).read_text())["flags"]
    if method_dir.name == "late_reset":
        for path in dense.glob("rewind_*.pt"):
            pack_tensors(f"rewind:{path.stem}", rf.load_pt(path), arrays)
    arrays["flags"] = np.asarray(json.dumps(flags, sort_keys=True))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    rf.atomic_write(method_dir / STATE, buffer.getvalue())
    return method_dir / STATE


def initial_weights(seed_dir: Path) -> dict[str, torch.Tensor]:
    """The seed's initial weights as train.py makes them (``Context.new_model``)."""
    flags = json.loads((seed_dir / tr.DENSE / rf.CONFIG).read_text())["flags"]
    torch.manual_seed(flags["seed"])
    return HannunNet(HannunConfig(**flags["model"])).state_dict()


def restore(method_dir: Path) -> list[Path]:
    """Write back what ``save`` kept (never over an existing file); returns the files written."""
    arrays = dict(np.load(method_dir / STATE))
    if json.loads(str(arrays["flags"])) != json.loads((method_dir / rf.CONFIG).read_text())["flags"]:
        raise SystemExit(f"error: {method_dir / STATE} was saved with other flags than {method_dir / rf.CONFIG}; "
                         "it belongs to another run: delete it")
    written = []

    def put(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            rf.atomic_save(tensors, path)
            written.append(path)

    dense = method_dir.parent / tr.DENSE
    init = initial_weights(method_dir.parent)
    if state_digest(init) != str(arrays["init_digest"]):
        raise SystemExit(f"error: the initial weights made from {dense / rf.CONFIG}'s seed differ from those "
                         f"{method_dir / STATE} was saved with (another torch version?): the chain cannot go on "
                         "here; re-run it from its dense network")
    put(init, dense / tr.INIT)
    for prefix in sorted({k.split(SEP)[0] for k in arrays if SEP in k}):
        kind, name = prefix.split(":", 1)
        tensors = unpack_tensors(prefix, arrays)
        if kind == "mask":
            put(tensors, method_dir / name / tr.MASK)
        elif kind == "model":
            put(tensors, method_dir / name / tr.FINAL)
        else:  # rewind
            put(tensors, dense / f"{name}.pt")
    return written


# --------------------------------------------------------------------------- rebuild the dense


def dense_args(seed_dir: Path, out: Path) -> argparse.Namespace:
    """train.py's flags for re-running a seed's dense training into ``out``: those of its
    config.json, and the rewind step of the seed's methods (the dense run saves its weights
    there for late_reset)."""
    flags = {**rf.ADDED_FLAGS, **json.loads((seed_dir / tr.DENSE / rf.CONFIG).read_text())["flags"]}
    rewind = {json.loads(p.read_text())["flags"].get("rewind_to", "0") for p in seed_dir.glob("*/" + rf.CONFIG)}
    rewind.discard("0")
    if len(rewind) > 1:
        raise SystemExit(f"error: the methods of {seed_dir} rewind to different steps ({sorted(rewind)})")
    flags.update(model=HannunConfig(**flags["model"]), milestones=tuple(flags["milestones"]),
                 layer_fraction=[], dense_layers=[], retrain=None, control=None, out=out, quiet=True,
                 busy="wait", rewind_to=rewind.pop() if rewind else "0")
    return argparse.Namespace(**flags)


def rebuild_dense(dense_dirs: list[Path]) -> None:
    """Retrain one dense run (the folders hold the same run) and link its weights into each."""
    first = dense_dirs[0]
    work = first.parent / ".dense-rebuild"
    args = dense_args(first.parent, work)
    try:
        ds = load_dataset(Path(args.data))
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from e
    print(f"{first}: retraining (seed {args.seed}) to rebuild its weights", flush=True)
    tr.run(args, ds, report=False)
    new = work / tr.DENSE
    old_metrics = json.loads((first / tr.METRICS).read_text())
    new_metrics = json.loads((new / tr.METRICS).read_text())
    differ = [f"{split} {key}: recorded {old_metrics[split][key]}, now {new_metrics[split][key]}"
              for split in ("val", "test") for key in old_metrics[split]
              if old_metrics[split][key] != new_metrics[split].get(key)]
    if (first / tr.PREDICTIONS).read_bytes() != (new / tr.PREDICTIONS).read_bytes():
        differ.append("predictions.csv differs")
    losses = ["step", "lr", "train_loss", "val_loss", "val_challenge_f1"]  # per epoch, 6 digits
    if not pd.read_csv(first / tr.HISTORY)[losses].equals(pd.read_csv(new / tr.HISTORY)[losses]):
        differ.append("the per-epoch losses in history.csv differ")
    if differ:
        raise SystemExit(f"error: the retrained {first} does not repeat the recorded run, so its weights are not "
                         f"those the results were made with (kept in {new} to inspect): " + "; ".join(differ[:4]))
    weights = [new / tr.INIT, new / tr.FINAL, *new.glob("rewind_*.pt")]
    for d in dense_dirs:
        for w in weights:
            if not (d / w.name).is_file():
                tmp = d / f".{w.name}.{os.getpid()}.tmp"
                shutil.copy2(w, tmp)
                os.replace(tmp, d / w.name)
        print(f"{d}: weights rebuilt ({', '.join(w.name for w in weights)}), predictions identical", flush=True)
    shutil.rmtree(work)


def dense_groups(exps: list[Path]) -> list[list[Path]]:
    """Finished dense runs that lack weights, grouped by identical metrics.json (linked runs)."""
    groups: dict[str, list[Path]] = {}
    for exp in exps:
        for d in sorted(exp.glob(f"seed*/{tr.DENSE}")):
            if (d / tr.METRICS).is_file() and not ((d / tr.INIT).is_file() and (d / tr.FINAL).is_file()):
                groups.setdefault(rf.sha256_of(d / tr.METRICS), []).append(d)
    return list(groups.values())


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["save", "restore", "rebuild-dense"])
    p.add_argument("exps", nargs="+", type=Path, help="experiment folders of run_experiments.py")
    args = p.parse_args(argv)
    for exp in args.exps:
        if not exp.is_dir():
            p.error(f"{exp} is not a folder")
    if args.action == "rebuild-dense":
        groups = dense_groups(args.exps)
        if not groups:
            print("every finished dense run has its weights")
        for group in groups:
            rebuild_dense(group)
        return
    for exp in args.exps:
        for method_dir in method_folders(exp):
            if args.action == "save" and unfinished(method_dir):
                path = save(method_dir)
                if path is None:
                    kept = "kept its earlier state.npz" if (method_dir / STATE).is_file() else "nothing saved"
                    print(f"{method_dir}: unfinished, but its weights are not here ({kept})")
                else:
                    print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")
            elif args.action == "save":
                (method_dir / STATE).unlink(missing_ok=True)  # finished: read back from its text files
            elif (method_dir / STATE).is_file():
                written = restore(method_dir)
                print(f"{method_dir}: restored {len(written)} file(s)")


if __name__ == "__main__":
    sys.exit(main())
