"""Run-folder bookkeeping shared by every script that writes results: atomic writes, the
code version, file digests, the check that a folder is resumed only with the flags and data
it was made with, and locks that keep two workers off the same run folder.

A result folder is only ever changed by whole-file atomic replaces, so a crash or
``kill -9`` leaves each file old or new, never torn; and a training runs under the folder's
lock (an ``fcntl`` lock on ``.lock`` in it), which dies with its process, so a worker killed
mid-training leaves the folder resumable by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
STATE = "state.npz"
"""A run's weights and masks carried in git by run_state.py (checkpoints are not committed)."""
REUSED_FROM = "reused_from.json"
"""In a dense folder linked by ``run_experiments.py --dense-from``: the folder it was linked
from, whose state.npz carries the weights for every experiment that links it."""
RESUME_NEUTRAL = {"device", "checkpoint_minutes", "quiet", "step_mode", "busy"}
"""Flags that may differ when a run is resumed (they do not change its results)."""
ADDED_FLAGS = {"max_steps": 0, "definitions_version": 1, "numerics_version": 1, "max_retries": 0}
"""Flags added after the first results were made, with the default that older runs had."""


class Busy(Exception):
    """A run folder is locked by another worker (and the caller asked not to wait)."""

    def __init__(self, message: str, folder: Path | None = None):
        super().__init__(message)
        self.folder = folder


# --------------------------------------------------------------------------- versions, digests


def code_version() -> str:
    """``git describe``-style version of this checkout, '+dirty' when its code has local
    edits (results/ does not count: see _git_version), as it was when this process imported
    the code (a long run records the code it runs, not what the checkout holds by the time a
    folder is written)."""
    return _CODE_VERSION


def _git_version(here: Path | None = None) -> str:
    """The checkout's commit, '+dirty' when a tracked file outside results/ has local edits
    (the runs themselves rewrite their committed results files, which is not a code change)."""
    here = here or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)results"],
                               cwd=here, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty.strip() else "")


_CODE_VERSION = _git_version()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()



# --------------------------------------------------------------------------- atomic files


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then ``os.replace``: a crash
    at any point leaves either the old file or the new one, never a torn one. The temporary
    name holds the writer's pid (``<name>.<pid>.tmp``), so two processes writing the same
    file never rename each other's half-written copy; the leftover of a writer killed
    half-way (its pid gone) is removed by the next write of the same file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: name the file meant, not the temporary one
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, f"{e.strerror or e} (writing it failed; the previous {path.name}, if any, is unchanged)",
                      str(path)) from e
    for stale in path.parent.glob(f"{path.name}.*tmp"):
        pid = stale.name[len(path.name) + 1:].removesuffix("tmp").removesuffix(".")
        if not pid.isdigit() or not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, written atomically (a crash leaves the previous file intact)."""
    import torch  # noqa: PLC0415 - here, so that the data scripts do not import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, text.encode())


def load_pt(path: Path, device: object = "cpu") -> dict:
    """``torch.load`` (weights only) that names a missing or damaged file and says how to
    recover: every training is seeded per step, so redoing one gives the same weights."""
    import torch  # noqa: PLC0415

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        problem = "is missing"
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        problem = f"is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if path.name == CHECKPOINT:
        advice = ("delete it and re-run the same command: this training restarts from its first step and ends "
                  "with the same weights")
    elif path.parent.name.startswith("round_"):
        advice = ("on a fresh clone, `python run_state.py restore <experiment>` brings back a chain saved with "
                  f"`run_state.py save`; else delete {path.parent} and any later round of "
                  f"{path.parent.parent.name}, then re-run: those rounds are redone from the earlier ones")
    elif path.parent.name == "dense" and (path.name in ("init.pt", "model.pt") or path.name.startswith("rewind_")):
        advice = ("checkpoints are not kept in git: `OMP_NUM_THREADS=1 python run_state.py rebuild-dense "
                  "<experiment>` retrains that dense run and keeps its weights if it repeats the recorded one")
    else:
        advice = (f"delete {path.parent} and re-run: that training is redone (the same weights); "
                  "the runs that need it are kept")
    raise SystemExit(f"error: {path} {problem}; {advice}")



# --------------------------------------------------------------------------- script boundary


ADVICE = {errno.ENOSPC: "the disk is full: free space and run the same command again (what finished is kept; "
                        "a training resumes from its last checkpoint)",
          errno.EDQUOT: "the disk quota is used up: free space and run the same command again",
          errno.EROFS: "the file system is read-only: choose another folder (--out/--exp)",
          errno.EACCES: "no permission: choose a writable folder (--out/--exp) or fix its permissions",
          errno.EPERM: "no permission: choose a writable folder (--out/--exp) or fix its permissions"}


@contextlib.contextmanager
def script_errors() -> Iterator[None]:
    """Around a script's main: a file-system error (full disk, read-only or foreign folder,
    a path that vanished) ends in one sentence naming the path and what to do, not a
    traceback; and output never fails on a path that is not valid UTF-8 (it is printed
    with backslash escapes)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    except OSError as e:
        where = e.filename if e.filename is not None else "a file"
        advice = ADVICE.get(e.errno, "check the path and run the same command again")
        raise SystemExit(f"error: {where}: {e.strerror or e}; {advice}") from None


# --------------------------------------------------------------------------- tables


class TableError(ValueError):
    """A CSV table that does not match its schema; the message names the file and the row."""


def read_table(path: Path, columns: dict[str, str], key: tuple[str, ...] = (),
               allowed: dict[str, Iterable[object]] | None = None,
               optional: dict[str, str] | None = None) -> pd.DataFrame:
    """A CSV written by this project, checked against its schema before anything uses it.

    ``columns``: name -> kind ('str', 'int', 'float', 'bool'), each required and complete in
    every row (an empty cell is refused, as is a value of another type); ``key``: columns
    whose combination must be unique (those present); ``allowed``: the values a column may
    take; ``optional``: columns checked like ``columns`` where the table has them. A file that
    does not end with a newline was cut off mid-line (every writer here ends it with one),
    and a file with no rows is refused too: neither may give a table that looks right."""
    import pandas as pd  # noqa: PLC0415 - here: run_folders is imported by scripts that need no pandas

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TableError(f"{path}: cannot be read ({e.strerror or e})") from e
    if not raw.strip():
        raise TableError(f"{path}: empty")
    if not raw.endswith(b"\n"):
        raise TableError(f"{path}: its last line is cut off (no newline at the end): the file was truncated")
    try:
        table = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:  # also UnicodeDecodeError
        raise TableError(f"{path}: not a readable CSV table ({type(e).__name__}: {e})") from e
    if table.empty:
        raise TableError(f"{path}: a header and no rows")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TableError(f"{path}: lacks column(s) {', '.join(missing)}")
    out = table.copy()
    columns = {**columns, **{k: v for k, v in (optional or {}).items() if k in table.columns}}
    for name, kind in columns.items():
        cells = table[name].str.strip()
        if kind == "str":
            parsed, bad = cells, cells == ""
        elif kind == "bool":
            parsed, bad = cells == "True", ~cells.isin(["True", "False"])
        else:
            number = pd.to_numeric(cells, errors="coerce")
            bad = number.isna() | (number != number.round() if kind == "int" else False)
            parsed = number.astype("int64") if kind == "int" and not bad.any() else number
        if allowed and name in allowed:
            bad = bad | ~pd.Series(parsed).isin(list(allowed[name]))
        if bad.any():
            i = int(bad.to_numpy().argmax())
            row = ",".join(table.iloc[i].astype(str))[:80]
            expect = (f"one of {', '.join(map(str, allowed[name]))}" if allowed and name in allowed
                      else f"a complete {kind} value")
            raise TableError(f"{path}: row {i + 2} ({row!r}): column {name!r} is {table[name].iloc[i]!r}, expected "
                             f"{expect}")
        out[name] = parsed
    for name in table.columns:  # the other columns: numbers where they are numbers, as pandas reads them
        if name not in columns:
            number = pd.to_numeric(table[name].replace("", "nan"), errors="coerce")
            if number.notna().sum() == (table[name] != "").sum():
                out[name] = number
    key = tuple(k for k in key if k in out.columns)
    if key:
        dup = out.duplicated(list(key), keep=False)
        if dup.any():
            i = int(dup.to_numpy().argmax())
            raise TableError(f"{path}: row {i + 2} repeats {', '.join(f'{k}={out[k].iloc[i]}' for k in key)}")
    return out


# --------------------------------------------------------------------------- locks


@contextlib.contextmanager
def locked(folder: Path, wait: bool = True, poll: float = 0.5) -> Iterator[None]:
    """Hold ``folder``'s lock (``folder/.lock``, created if needed) for the ``with`` block.

    ``wait``: block until the holder finishes; otherwise raise ``Busy`` at once. The lock is
    an advisory ``fcntl.flock``: the kernel drops it when its holder exits, however it exits,
    so a killed worker never leaves a folder locked. Re-entrant within one process (a nested
    ``locked`` of a folder this process holds passes through).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        yield
        return
    with open(folder / LOCK, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise Busy(f"{folder} is locked by another worker", folder) from None
                time.sleep(poll)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            fcntl.flock(f, fcntl.LOCK_UN)


_HELD: set[str] = set()


def locked_by_other(folder: Path) -> bool:
    """Whether another process holds ``folder``'s lock now: a probe that costs one open
    and one ``flock`` (for a worker waiting on a busy cell, which must not rebuild the
    cell's training just to learn that it is still busy)."""
    if str(folder.resolve()) in _HELD or not (folder / LOCK).is_file():
        return False
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def update_json(path: Path, change: Callable[[dict], dict]) -> dict:
    """Read-modify-write of a JSON file under its folder's lock: ``change(old) -> new``
    (old is {} for a missing file); concurrent writers never lose each other's changes."""
    with locked(path.parent):
        old = json.loads(path.read_text()) if path.is_file() else {}
        new = change(old)
        atomic_write_text(json.dumps(new, indent=2) + "\n", path)
    return new


# --------------------------------------------------------------------------- run-folder checks


def data_fingerprint(data: Path) -> str:
    """What identifies a built data set (its records, labels, split and samples), whatever
    path it is reached by: digests of records.csv and of the samples."""
    return sha256_of(data / "records.csv")[:16] + "-" + sha256_of(data / "samples.i16d.xz")[:16]


def check_same_data(data: Path, fingerprint: str | None, made: str) -> None:
    """Refuse to evaluate ``made`` (a run or ticket, named) on another data set than the one
    it was trained on: another build or split puts its training records in the test split."""
    try:
        here = data_fingerprint(data)
    except OSError as e:
        raise SystemExit(f"error: {data}: cannot read the data set ({e.strerror or e})") from None
    if fingerprint is None:
        raise SystemExit(f"error: {made} does not record the data it was trained on, so its F1 on {data} cannot be "
                         "trusted; evaluate it where it was trained (its config.json holds the fingerprint)")
    if here != fingerprint:
        raise SystemExit(f"error: {made} was trained on another data set (fingerprint {fingerprint}) than {data} "
                         f"({here}): another build or split would put its training records in the test split. "
                         "Give --data the data set the run was trained on (see its config.json)")


def reused_from(dense_dir: Path) -> Path | None:
    """The dense folder that ``dense_dir`` was linked from (``--dense-from``), or None for one
    trained in place. Each dense network's weights are then committed once, in the source's
    state.npz; a source whose config.json is not this folder's is refused, naming both."""
    ref = dense_dir / REUSED_FROM
    if not ref.is_file():
        return None
    try:
        source = Path(os.path.normpath(dense_dir / json.loads(ref.read_text())["source"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {ref}: unreadable ({type(e).__name__}: {e}); expected "
                         '{"source": "<path of the dense folder it was linked from, relative to this one>"}') from e
    try:
        same = (source / CONFIG).read_bytes() == (dense_dir / CONFIG).read_bytes()
    except OSError as e:
        raise SystemExit(f"error: {ref} names {source}, which has no readable {CONFIG} ({e.strerror})") from e
    if not same:
        raise SystemExit(f"error: {ref} names {source}, whose {CONFIG} differs from {dense_dir / CONFIG}: "
                         "not the run this folder was linked from")
    return source


def prepare_run(run_dir: Path, flags: dict, data: Path) -> dict:
    """Write (or check) ``config.json``: the flags, code version and data fingerprint.

    A run folder made with other flags or other data is refused rather than mixed. The data
    set is compared by its fingerprint, not by the path it was given by (an absolute path,
    a trailing slash or a copy of the same build is the same data). The file is created only
    under the folder's lock, and checked again there: of two processes starting one new
    folder at the same moment with other flags, the second is refused, never mixed in.
    """
    record = {"flags": flags, "data_fingerprint": data_fingerprint(data)}
    path = run_dir / CONFIG
    if not path.is_file():
        with locked(run_dir):  # held briefly: config.json exists before any training takes the lock
            if not path.is_file():
                record["code_version"] = code_version()
                atomic_write_text(json.dumps(record, indent=2) + "\n", path)
                return record
    old = json.loads(path.read_text())
    # a flag added to train.py after the folder was made counts as its default there
    # (a flag's default never changes what older runs did)
    before = {**{k: v for k, v in ADDED_FLAGS.items() if k in flags}, **old["flags"]}
    keys = (set(flags) | set(before)) - RESUME_NEUTRAL - {"data"}
    diff = {k: (before.get(k), flags.get(k)) for k in sorted(keys) if before.get(k) != flags.get(k)}
    if diff:
        raise SystemExit(f"error: {run_dir} was started with other flags: "
                         + ", ".join(f"--{k.replace('_', '-')} {a!r} (now {b!r})" for k, (a, b) in diff.items())
                         + "; use another --out (the finished runs in it are kept), or the flags it was made with")
    if old["data_fingerprint"] != record["data_fingerprint"]:
        raise SystemExit(f"error: {run_dir} was trained on other data than {data} "
                         f"({old['data_fingerprint']} vs {record['data_fingerprint']}): give --data the data set "
                         f"it was made with ({old['flags'].get('data')}) or another --out")
    return old
