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
                               A few hundred kB to a few MB per chain, small enough to commit.
                               With ``--dense`` (or when a chain has no round yet) also
                               ``dense/state.npz``: the dense run's trained and rewind weights
                               (~2.6 MB each at width 0.25), for runs that start from them;
                               a dense folder linked by ``--dense-from`` (reused_from.json)
                               is carried by its source's state.npz, committed once.
                               With ``--masks``, a finished chain's state.npz keeps every
                               round's mask (for stability.py), and later saves keep it; a
                               finished chain's other state.npz is removed.
  restore EXP [EXP ...]        write those back as mask.pt / model.pt / rewind_<k>.pt (a
                               linked dense folder's from its source's state.npz), and
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

import run_experiments
import run_folders as rf
import train as tr
from build_datasets import DatasetError, load_dataset
from model import HannunNet

STATE = rf.STATE
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
    """Each tensor as its shape, a bit-packed non-zero pattern and its non-zero values, and
    where a float tensor holds -0.0 (a pruned negative weight times its 0 mask) the pattern
    of those: exact to the bit, and small for pruned weights and masks."""
    for name, t in tensors.items():
        a = t.detach().cpu().numpy()
        nonzero = a != 0
        out[SEP.join((prefix, name, "shape"))] = np.asarray(a.shape, dtype=np.int64)
        out[SEP.join((prefix, name, "nonzero"))] = np.packbits(nonzero.ravel())
        if a.dtype != np.bool_:
            out[SEP.join((prefix, name, "values"))] = a[nonzero]
            out[SEP.join((prefix, name, "dtype"))] = np.asarray(str(a.dtype))
            negative_zero = ~nonzero & np.signbit(a) if a.dtype.kind == "f" else None
            if negative_zero is not None and negative_zero.any():
                out[SEP.join((prefix, name, "negzero"))] = np.packbits(negative_zero.ravel())


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
            if key("negzero") in arrays:
                a[np.unpackbits(arrays[key("negzero")], count=count).astype(bool)] = -0.0
        else:
            a = nonzero
        tensors[name] = torch.from_numpy(a.reshape(shape))
    return tensors


# --------------------------------------------------------------------------- save / restore


def method_folders(exp: Path) -> list[Path]:
    """Every method folder (seed*/<method>, controls included) that holds a rounds.csv."""
    return sorted(p.parent for p in exp.glob("seed*/*/" + tr.ROUNDS))


def controls_pending(method_dir: Path, last_round: int) -> bool:
    """Whether the experiment's latest command (experiment.json) asks for controls of this
    method that have no row for its last accepted round yet: they need its masks and
    weights, so a finished chain is carried until its controls are done."""
    path = method_dir.parent.parent / "experiment.json"
    if not path.is_file() or last_round == 0:
        return False
    args, _ = run_experiments.parse_args(json.loads(path.read_text())["commands"][-1]["argv"])
    if method_dir.name not in args.control_methods:
        return False
    for control in args.controls:
        rounds = method_dir.parent / f"{method_dir.name}+{control}" / tr.ROUNDS
        if not rounds.is_file() or last_round not in set(pd.read_csv(rounds)["round"]):
            return True
    return False


def unfinished(method_dir: Path) -> bool:
    """Whether the chain may still train: its flags' --goal/--target-ratio/--rounds are not
    reached, or its controls are pending (the test of train.finished_table). A control
    folder carries nothing: its masks and weights come from the method's chain."""
    if "+" in method_dir.name:
        return False
    flags = json.loads((method_dir / rf.CONFIG).read_text())["flags"]
    args = argparse.Namespace(**{**flags, "control": None, "out": method_dir.parent})
    if tr.finished_table(args, method_dir) is None:
        return True
    last = pd.read_csv(method_dir / tr.ROUNDS).query("accepted").iloc[-1]
    return controls_pending(method_dir, int(last["round"]))


REWINDING = ("weight_rewind", "late_reset")
"""Methods whose rounds start from fixed early weights, not from the last round's."""


def chain_files(method_dir: Path) -> list[Path] | None:
    """What a chain needs to go on: every round's mask, the trained weights of its last
    accepted round (they set the next round's mask, and a weight-keeping method starts from
    them), the round before only while a weight-keeping method's controls of the last round
    are pending (random_prune starts from that round's start weights), and late_reset's
    rewind weights. One round, not two: at full width a round's weights are ~21 MB at 2x.
    None when they are not on this machine."""
    masks = round_masks(method_dir)
    exp_dir = method_dir.parent.parent
    table = pd.read_csv(method_dir / tr.ROUNDS)
    accepted = [exp_dir / f for f in table.loc[table["accepted"], "folder"] if (exp_dir / f).parent == method_dir]
    last_round = int(table.loc[table["accepted"], "round"].max()) if table["accepted"].any() else 0
    both = method_dir.name not in REWINDING and controls_pending(method_dir, last_round)
    models = [d / tr.FINAL for d in accepted[-2 if both else -1:]]
    rewind = sorted((method_dir.parent / tr.DENSE).glob("rewind_*.pt")) if method_dir.name == "late_reset" else []
    return masks + models + rewind if masks is not None and all(f.is_file() for f in models + rewind) else None


def save(folder: Path, files: list[Path]) -> Path:
    """Write ``folder/state.npz``: ``files`` (paths in the seed folder) packed, the digest of
    the seed's initial weights, and ``folder``'s flags (a restore checks both)."""
    seed_dir = folder.parent
    arrays: dict[str, np.ndarray] = {}
    for f in files:
        pack_tensors(f.relative_to(seed_dir).as_posix(), rf.load_pt(f), arrays)
    arrays["init_digest"] = np.asarray(state_digest(rf.load_pt(seed_dir / tr.DENSE / tr.INIT)))
    arrays["flags"] = np.asarray(json.dumps(json.loads((folder / rf.CONFIG).read_text())["flags"], sort_keys=True))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    rf.atomic_write(folder / STATE, buffer.getvalue())
    return folder / STATE


def initial_weights(seed_dir: Path) -> dict[str, torch.Tensor]:
    """The seed's initial weights as train.py makes them (``Context.new_model``)."""
    args = tr.dense_args(seed_dir)
    torch.manual_seed(args.seed)
    return HannunNet(args.model).state_dict()


def state_file(folder: Path) -> Path:
    """``folder/state.npz``, or for a dense folder linked by ``--dense-from`` the state.npz of
    the folder it was linked from: each dense network's weights are committed once."""
    source = rf.reused_from(folder)
    return folder / STATE if source is None or (folder / STATE).is_file() else source / STATE


def restore(folder: Path) -> list[Path]:
    """Write back what ``save`` kept in ``folder``'s state.npz (``state_file``; never over an
    existing file), and the seed's init.pt; returns the files written."""
    seed_dir, state = folder.parent, state_file(folder)
    if not state.is_file():
        raise SystemExit(f"error: {folder}: no {STATE} carries its weights (looked for {state}); save them where "
                         "they were trained: python run_state.py save --dense EXP")
    arrays = dict(np.load(state))
    if json.loads(str(arrays["flags"])) != json.loads((folder / rf.CONFIG).read_text())["flags"]:
        raise SystemExit(f"error: {state} was saved with other flags than {folder / rf.CONFIG}; "
                         "it belongs to another run: delete it")
    init = initial_weights(seed_dir)
    if state_digest(init) != str(arrays["init_digest"]):
        raise SystemExit(f"error: the initial weights made from {seed_dir / tr.DENSE / rf.CONFIG}'s seed differ "
                         f"from those {state} was saved with (another torch version?): the run cannot go on here")
    written = []
    contents = {seed_dir / tr.DENSE / tr.INIT: init}
    contents.update({seed_dir / rel: unpack_tensors(rel, arrays)
                     for rel in sorted({k.split(SEP)[0] for k in arrays if SEP in k})})
    for path, tensors in contents.items():
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            rf.atomic_save(tensors, path)
            written.append(path)
    return written


# --------------------------------------------------------------------------- rebuild the dense


def rebuild_args(seed_dir: Path, out: Path) -> argparse.Namespace:
    """train.py's flags for re-running a seed's dense training into ``out``: those of its
    config.json, and the rewind step of the seed's methods (the dense run saves its weights
    there for late_reset)."""
    rewind = {json.loads(p.read_text())["flags"].get("rewind_to", "0") for p in seed_dir.glob("*/" + rf.CONFIG)}
    rewind.discard("0")
    if len(rewind) > 1:
        raise SystemExit(f"error: the methods of {seed_dir} rewind to different steps ({sorted(rewind)})")
    args = tr.dense_args(seed_dir)
    args.__dict__.update(layer_fraction=[], dense_layers=[], retrain=None, control=None, out=out, busy="wait",
                         rewind_to=rewind.pop() if rewind else "0")
    return args


def rebuild_dense(dense_dirs: list[Path]) -> None:
    """Retrain one dense run (the folders hold the same run) and link its weights into each."""
    first = dense_dirs[0]
    work = first.parent / ".dense-rebuild"
    args = rebuild_args(first.parent, work)
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
    recorded = pd.read_csv(first / tr.PREDICTIONS, keep_default_na=False, dtype=str)
    # a run recorded before predictions.csv held probabilities is compared on its own columns
    if not recorded.equals(pd.read_csv(new / tr.PREDICTIONS, keep_default_na=False, dtype=str)[recorded.columns]):
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
    p.add_argument("--dense", action="store_true",
                   help="save: also each seed's dense weights (model.pt, rewind_<k>.pt; ~2.6 MB each at width "
                        "0.25), for variants that will start from them on the next machine")
    p.add_argument("--masks", action="store_true",
                   help="save: also every round's mask of each finished chain (bit-packed, ~0.1 MB per round "
                        "at width 0.25), for stability.py on the next machine; a save without the flag "
                        "keeps such a state.npz")
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
        if args.action == "restore":
            linked = {d for d in exp.glob(f"seed*/{tr.DENSE}") if rf.reused_from(d)}
            for folder in sorted({s.parent for s in exp.glob(f"seed*/*/{STATE}")} | linked):
                if state_file(folder).is_file():
                    print(f"{folder}: restored {len(restore(folder))} file(s)")
                else:
                    print(f"{folder}: linked from {rf.reused_from(folder)}, which carries no {STATE}: nothing restored")
            continue
        for seed_dir in sorted(p for p in exp.glob("seed*") if (p / tr.DENSE / rf.CONFIG).is_file()):
            save_seed(seed_dir, args.dense, args.masks)


def masks_only(state: Path) -> bool:
    """Whether ``state`` is a finished chain's masks (``save --masks``): kept by every later
    save, so that a save without the flag never drops masks a clone has not restored yet."""
    if not state.is_file():
        return False
    with np.load(state) as arrays:
        files = {k.split(SEP)[0] for k in arrays.files if SEP in k}
    return bool(files) and all(f.endswith("/" + tr.MASK) for f in files)


def round_masks(method_dir: Path) -> list[Path] | None:
    """Every round's mask.pt of a chain (tries included); None when they are not here."""
    exp_dir = method_dir.parent.parent
    table = pd.read_csv(method_dir / tr.ROUNDS)
    masks = [exp_dir / f / tr.MASK for f in table["folder"] if (exp_dir / f).parent == method_dir]
    return masks if all(m.is_file() for m in masks) else None


def save_or_keep(method_dir: Path, files: list[Path] | None, missing: str) -> None:
    """``save`` a chain's ``files``, or, where they or the seed's init.pt are not on this
    machine (a fresh clone), say so and leave any earlier state.npz as it is."""
    if files is None or not (method_dir.parent / tr.DENSE / tr.INIT).is_file():
        kept = "kept its earlier state.npz" if (method_dir / STATE).is_file() else "nothing saved"
        print(f"{method_dir}: {missing} are not here ({kept})")
        return
    path = save(method_dir, files)
    print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


def save_seed(seed_dir: Path, with_dense: bool, with_masks: bool = False) -> None:
    """``save`` for every unfinished chain of a seed (a finished one is read back from its text
    files and loses a carried chain's state.npz; ``with_masks`` keeps its masks for
    stability.py), and for its dense run when asked or when a chain has no round of its
    own yet (its first round needs the dense weights)."""
    need_dense = with_dense
    for method_dir in method_folders(seed_dir.parent):
        if method_dir.parent != seed_dir:
            continue
        if not unfinished(method_dir):
            if not with_masks or "+" in method_dir.name:  # a control's masks serve no later analysis
                if not masks_only(method_dir / STATE):
                    (method_dir / STATE).unlink(missing_ok=True)  # a carried chain's state, now done with
                continue
            save_or_keep(method_dir, round_masks(method_dir), "finished, but its masks")
            continue
        table = pd.read_csv(method_dir / tr.ROUNDS)
        need_dense |= int(table["round"].max()) == 0
        save_or_keep(method_dir, chain_files(method_dir), "unfinished, but its weights")
    dense = seed_dir / tr.DENSE
    weights = [dense / tr.FINAL, *sorted(dense.glob("rewind_*.pt"))]
    source = rf.reused_from(dense)
    if need_dense and source is not None:
        where = "there" if (source / STATE).is_file() else f"missing: run_state.py save --dense {source.parent.parent}"
        print(f"{dense}: linked from {source}, whose {STATE} carries its weights ({where})")
    elif need_dense and (dense / tr.INIT).is_file() and (dense / tr.FINAL).is_file():
        path = save(dense, weights)
        print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")
    elif need_dense:
        kept = "kept its earlier state.npz" if (dense / STATE).is_file() else "nothing saved"
        print(f"{dense}: its weights are not here ({kept})")


if __name__ == "__main__":
    sys.exit(main())
