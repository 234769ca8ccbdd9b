"""Plot accuracy and F1 against the compression ratio, and summarise the winning tickets.

Reads ``EXP/results.csv`` (from run_experiments.py) and writes into ``EXP/plots/``:

  compression.png/.svg  challenge F1 and accuracy (test split by default) against the
                        compression ratio on a log axis: one line per method (mean over
                        seeds, shaded min-max; one per seed for a --goal chain, whose
                        seeds stop at different levels), controls dashed, the dense level and a
                        "dense - 1 %" band, the LTH-ECG claim (142x, < 1 % F1 loss) marked
  layers.png/.svg       remaining weights per layer of the best ticket
  summary.md            the winning ticket of each method: the largest compression whose
                        mean validation challenge F1 stays within --tolerance of the dense
                        network's, with its test F1 (mean +- sd over seeds) and a 95 %
                        bootstrap interval (test records and seeds); validation and test F1
                        per compression level and method; each ticket against its random
                        controls with a paired bootstrap interval of the difference; under
                        --goal (LTH-ECG's schedule) where each seed's chain stopped and
                        what its last ticket lost against dense
  winners.csv           the same table, best first, for export_ticket.py --winner

Tickets are chosen on the validation split; the test split is only reported.

``--score windows`` reads every score as measured on consecutive windows of the training
length (``--crop``; train.predict_windows) instead of on whole records, and writes into
``EXP/plots-windows/``: the same figures and tables, for a recipe whose training windows are
shorter than its records (see window_eval.py for why the two can differ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

import operating_point as op  # noqa: E402
import prune as pm  # noqa: E402
import run_experiments  # noqa: E402
import ticket_bytes as tb  # noqa: E402
from metrics import bootstrap  # noqa: E402
from model import CLASSES, HannunConfig  # noqa: E402
from run_folders import TableError, atomic_write_text, read_table, script_errors  # noqa: E402
from train import BASELINES, CONTROLS, METHODS, PREDICTIONS, WINDOWS_COLUMN, WINDOWS_SUFFIX  # noqa: E402

LTH_ECG_RATIO = 142.0
"""Sahu et al. 2022 (LTH-ECG): a 142x smaller network with < 1 % loss of test F1."""
COLORS = {"weight_rewind": "#1f77b4", "late_reset": "#2ca02c", "lr_rewind": "#d62728", "finetune": "#7f7f7f",
          "dense_equal_steps": "#000000"}
LABELS = {"weight_rewind": "weight rewind (Frankle & Carbin)", "late_reset": "late reset (Frankle et al. 2020)",
          "lr_rewind": "LR rewind (Renda et al.)", "finetune": "fine-tune",
          "dense_equal_steps": "dense, equal steps (as LR rewind)"}
CONTROL_STYLE = {"random_reinit": ("--", "random re-init"), "random_prune": (":", "random pruning")}


def partial(exp: Path) -> str:
    """'' for a finished grid, else how much of it is done: the grid of the last
    run_experiments.py command recorded in ``exp`` (experiment.json), its cells counted as
    finished on disk (run_experiments.grid_progress), whoever ran them."""
    progress = run_experiments.grid_progress(exp)
    if progress is None or progress[0] == progress[1]:
        return ""
    return f"partial: {progress[0]} of {progress[1]} cells finished"


SCORES = {"whole": ("", "predicted"), "windows": (WINDOWS_SUFFIX, WINDOWS_COLUMN)}
"""--score: the suffix of results.csv's score columns, and predictions.csv's class column."""
WINDOWS_TITLE = ", records scored on windows of the training length"
"""What a figure's title adds under --score windows."""
WINDOWS_BANNER = ("**Every score below is on windows of the training length** (each record cut into consecutive "
                  "windows of --crop samples, the class from the mean logits over all windows' steps: "
                  "train.predict_windows), not on whole records")
"""What a markdown file under --score windows opens with (each adds where the whole-record one is)."""
score = "whole"
"""How the records were scored (a key of SCORES), set once by main()."""


def load(exp: Path) -> pd.DataFrame:
    """The accepted rows of ``exp/results.csv`` (under --goal a rejected try is not a level)."""
    return place_baselines(load_all(exp).query("accepted"))


def load_all(exp: Path) -> pd.DataFrame:
    """Every row of ``exp/results.csv``, rejected --goal tries included; a clear error when
    the table is missing or lacks a column this script reads."""
    path = exp / "results.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run run_experiments.py --exp {exp} first "
                         "(it writes the table after each finished cell)")
    try:
        table = read_table(path, RESULTS_SCHEMA, key=("seed", "method", "control", "round", "attempt"),
                           allowed={"method": (*METHODS, *BASELINES), "control": ("none", *CONTROLS),
                                    "accepted": (True, False)}, optional={"attempt": "int"})
    except TableError as e:
        raise SystemExit(f"error: {e}; rebuild it from the runs' rounds.csv with "
                         f"python run_experiments.py --exp {exp} --collect (same grid flags)") from None
    return scored_as(table, exp, score)


def scored_as(table: pd.DataFrame, exp: Path, how: str) -> pd.DataFrame:
    """``table`` with its score columns (val_/test_ challenge F1, accuracy, per-class F1, AF
    sensitivity and PPV) as scored ``how`` (a key of SCORES): under "windows" each replaced
    by its ``*_windows`` column, and an error naming a run that has none."""
    suffix = SCORES[how][0]
    if not suffix:
        return table
    cols = [c for c in table.columns if c.endswith(suffix)]
    need = [f"{split}_challenge_f1{suffix}" for split in ("val", "test")]
    missing = table[table[need].isna().any(axis=1)] if set(need) <= set(cols) else table
    if len(missing):
        raise SystemExit(f"error: {len(missing)} run(s) of {exp} have no scores on windows of the training length, "
                         f"e.g. {missing['folder'].iloc[0]}: score them with python window_eval.py {exp} on the "
                         f"machine that holds their weights, then python run_experiments.py --exp {exp} --collect")
    return table.assign(**{c.removesuffix(suffix): table[c] for c in cols})


RESULTS_SCHEMA = {"folder": "str", "seed": "int", "method": "str", "control": "str", "round": "int",
                  "accepted": "bool", "remaining": "float", "compression": "float",
                  "val_challenge_f1": "float", "test_challenge_f1": "float", "val_accuracy": "float",
                  "test_accuracy": "float"}
"""The columns of results.csv this script reads: each present and complete in every row (and
``attempt``, checked where present: tables made before --goal lack it)."""


def place_baselines(table: pd.DataFrame) -> pd.DataFrame:
    """A baseline's round r (dense_equal_steps: never pruned) is placed at the compression
    of lr_rewind's round r of the same seed, whose cumulative steps it matches, so it plots
    and pairs at that level (its own ratio stays 1: see ``remaining``). Rounds with no such
    ticket are left out."""
    base = table["method"].isin(BASELINES) & (table["round"] > 0)
    if not base.any():
        return table
    tickets = table[~table["method"].isin(BASELINES) & (table["control"] == "none")]
    ref = tickets[tickets["method"] == "lr_rewind"] if (tickets["method"] == "lr_rewind").any() else tickets
    ratio = ref.groupby(["seed", "round"])["compression"].first().rename("placed")
    placed = table[base].join(ratio, on=["seed", "round"]).dropna(subset=["placed"])
    placed = placed.assign(compression=placed["placed"]).drop(columns="placed")
    return pd.concat([table[~base], placed], ignore_index=True)


def level(compression: pd.Series) -> pd.Series:
    """The compression level of each row: rounds of different seeds line up by ratio, not
    by round number, which differs under --goal."""
    return pm.ratio_key(compression)


def ticket_rows(table: pd.DataFrame, best: pd.Series) -> pd.DataFrame:
    """Every seed's row of one ticket (method, control and compression level of ``best``)."""
    return table[(table["method"] == best["method"]) & (table["control"] == best["control"])
                 & (level(table["compression"]) == best["level"])]


def curves(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, min, max and sd of ``metric`` over seeds per (method, control, compression
    level); the dense round 0 is shared by a method and its controls."""
    dense = table[table["round"] == 0]
    rows = [table]
    for control in table.loc[table["control"] != "none", "control"].unique():
        for method in table.loc[table["control"] == control, "method"].unique():
            rows.append(dense[dense["method"] == method].assign(control=control))
    full = pd.concat(rows).assign(level=lambda t: level(t["compression"]))
    if "flops" not in full:  # tables made before the FLOPs column
        full = full.assign(flops=np.nan)
    return (full.groupby(["method", "control", "level"])
            .agg(round=("round", "min"), compression=("compression", "mean"), mean=(metric, "mean"),
                 low=(metric, "min"), high=(metric, "max"), sd=(metric, "std"), seeds=("seed", "nunique"),
                 flops=("flops", "mean"))
            .reset_index().sort_values(["method", "control", "compression"]))


def dense_level(table: pd.DataFrame, metric: str, seeds: list[int] | None = None) -> float:
    """Mean over seeds (``seeds`` only, when given) of the dense networks' ``metric`` (one
    dense run per seed)."""
    dense = dense_rows(table)
    return float((dense if seeds is None else dense[dense["seed"].isin(seeds)])[metric].mean())


def run_seeds(table: pd.DataFrame, method: str, control: str = "none") -> list[int]:
    """The seeds a method (or one of its controls) has pruned rounds for: a grid extended by
    later seeds for some methods only compares each with the dense networks of its own seeds."""
    rows = table[(table["method"] == method) & (table["control"] == control) & (table["round"] > 0)]
    return sorted(rows["seed"].unique())


def winners(table: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per method and control: the largest compression (a pruned round, reached by every
    seed it ran) whose mean validation challenge F1 over seeds is at least ``dense * (1 -
    tolerance)``, dense averaged over the same seeds. A method with no such round has no
    winner (the dense network is not a ticket, nor is a baseline)."""
    table = table[~table["method"].isin(BASELINES)]
    keys = ["method", "control", "level"]
    val, test = curves(table, "val_challenge_f1"), curves(table, "test_challenge_f1")
    acc = curves(table, "test_accuracy")
    merged = val.merge(test.drop(columns=["round"]), on=keys, suffixes=("_val", "_test")).merge(
        acc[[*keys, "mean"]].rename(columns={"mean": "test_accuracy"}), on=keys)
    seeds = {mc: run_seeds(table, *mc) for mc in set(zip(merged["method"], merged["control"], strict=True))}
    mc = list(zip(merged["method"], merged["control"], strict=True))
    merged["dense_val"] = [dense_level(table, "val_challenge_f1", seeds[k]) for k in mc]
    merged["dense_test"] = [dense_level(table, "test_challenge_f1", seeds[k]) for k in mc]
    ok = merged[(merged["mean_val"] >= merged["dense_val"] * (1 - tolerance))
                & (merged["seeds_val"] == [len(seeds[k]) for k in mc]) & (merged["round"] > 0)]
    best = ok.loc[ok.groupby(["method", "control"])["compression_val"].idxmax()]
    return best.sort_values("compression_val", ascending=False)


def predictions_of(exp: Path, rows: pd.DataFrame, split: str = "test"
                     ) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Labels of the ``split`` records and every row's predicted classes (as class indices;
    scored as --score says), records sorted by name. None when a run's predictions.csv or its
    column is missing (e.g. a run made before it existed); an error when two runs were
    evaluated on different records."""
    labels, preds, records, column = None, [], None, SCORES[score][1]
    for folder in rows["folder"]:
        path = exp / folder / PREDICTIONS
        if not path.is_file():
            return None
        test = pd.read_csv(path, keep_default_na=False).query("split == @split").sort_values("record")
        if records is not None and not np.array_equal(records, test["record"].to_numpy()):
            raise SystemExit(f"error: {path} has other test records than {rows['folder'].iloc[0]}: "
                             "the runs of one experiment must share the data split")
        records = test["record"].to_numpy()
        labels = test["label"].map(CLASSES.index).to_numpy()
        if column not in test:
            return None
        preds.append(test[column].map(CLASSES.index).to_numpy())
    return None if labels is None else (labels, preds)


def bootstrap_interval(exp: Path, table: pd.DataFrame, best: pd.Series) -> tuple[float, float] | None:
    """95 % bootstrap interval of a ticket's test challenge F1 (mean over seeds); None when
    a seed's predictions are missing."""
    found = predictions_of(exp, ticket_rows(table, best))
    return None if found is None else bootstrap(*found)


def compression_table(table: pd.DataFrame, metric: str) -> list[str]:
    """Markdown table of ``metric`` (mean ± sd over seeds) per compression level, one column
    per method and control: the numbers behind compression.png. A cell that averages fewer
    seeds than the experiment has (a run still going, or --goal levels) says how many."""
    c = curves(table, metric)
    c["name"] = c["method"] + np.where(c["control"] == "none", "", " + " + c["control"])
    names = list(dict.fromkeys(c.assign(is_control=c["control"] != "none")
                               .sort_values(["is_control", "method", "control"])["name"]))
    total = table["seed"].nunique()
    text = {(lv, n): f"{m:.3f}" + ("" if np.isnan(sd) else f" ± {sd:.3f}") + (f" (n={k})" if k < total else "")
            for lv, n, m, sd, k in zip(c["level"], c["name"], c["mean"], c["sd"], c["seeds"], strict=True)}
    ratio = c.groupby("level")["compression"].mean()
    lines = ["| compression | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    for lv in sorted(ratio.index):
        lines.append(f"| {ratio[lv]:.1f}x | " + " | ".join(text.get((lv, n), "") for n in names) + " |")
    return lines


def controls_table(exp: Path, table: pd.DataFrame) -> list[str]:
    """Markdown table: at each level where a control ran, the ticket's and the control's
    test challenge F1 (mean over the seeds both have) and the difference with its paired
    95 % bootstrap interval (records and seeds, see ``bootstrap``)."""
    test = curves(table, "test_challenge_f1")
    lines = ["| method | control | compression | seeds | ticket test F1 | control test F1 | "
             "ticket - control (95 % CI) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    controls = test[(test["control"] != "none") & (test["round"] > 0)]
    for _, c in controls.iterrows():
        theirs = ticket_rows(table, c)
        mine = ticket_rows(table, pd.Series({**c, "control": "none"}))
        seeds = set(mine["seed"]) & set(theirs["seed"])  # under --goal a level may lack some seeds
        head = f"| {c['method']} | {c['control']} | {c['compression']:.1f}x | {len(seeds)} |"
        if not seeds:
            lines.append(f"{head} no ticket at this level | {theirs['test_challenge_f1'].mean():.3f} | |")
            continue
        mine = mine[mine["seed"].isin(seeds)].sort_values("seed")  # paired seed by seed in bootstrap
        theirs = theirs[theirs["seed"].isin(seeds)].sort_values("seed")
        ticket_f1, control_f1 = mine["test_challenge_f1"].mean(), theirs["test_challenge_f1"].mean()
        found = predictions_of(exp, pd.concat([mine, theirs]))  # also checks they share the records
        ci = " (no predictions.csv)"
        if found is not None:
            labels, preds = found
            low, high = bootstrap(labels, preds[:len(mine)], preds[len(mine):])
            ci = f" ({low:+.3f} to {high:+.3f})"
        lines.append(f"{head} {ticket_f1:.3f} | {control_f1:.3f} | {ticket_f1 - control_f1:+.3f}{ci} |")
    return lines if len(lines) > 2 else []


def dense_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per seed: its dense network (round 0, shared by every method of the seed)."""
    return table[table["round"] == 0].drop_duplicates("seed")


def t_interval(diffs: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The ``confidence`` interval of the mean of per-seed paired differences by Student's t
    with n - 1 degrees of freedom: mean -+ t(n-1) x sd / sqrt(n). It treats each seed as one
    draw (the records are not resampled), so with few seeds it is wider than the two-level
    bootstrap, whose seed level can take only a few distinct draws. None for one seed."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return None
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def noninferiority_p(diffs: np.ndarray | list[float], margin: float) -> float:
    """One-sided p-value over seeds (t, n - 1 degrees of freedom) against "the ticket loses
    ``margin`` or more" (H0: mean difference <= -margin): small p supports "within the
    margin of dense". nan for one seed; with no spread between seeds, 0 or 1."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float("nan")
    se = d.std(ddof=1) / np.sqrt(len(d))
    if se == 0:
        return 0.0 if d.mean() > -margin else 1.0
    return float(stats.t.sf((d.mean() + margin) / se, len(d) - 1))


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; nan
    entries (not testable) are left out of the family and stay nan."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def wider(d: dict) -> tuple[float, float, str]:
    """The wider of the bootstrap and the t interval of a paired difference (the bootstrap
    alone for one seed, or where the t interval is missing; the bootstrap on a tie), and
    which it is: what a verdict reads."""
    boot, t = (d["low"], d["high"]), (d["t_low"], d["t_high"])
    if np.isnan(t[0]) or (not np.isnan(boot[0]) and boot[1] - boot[0] >= t[1] - t[0]):
        return (*boot, "bootstrap")
    return (*t, "t")


def paired(exp: Path, split: str, mine: pd.DataFrame, theirs: pd.DataFrame) -> dict | None:
    """``mine - theirs`` in challenge F1 on ``split``, over the seeds both have (each seed's
    run paired with the same seed's): the mean difference, its 95 % two-level bootstrap
    interval (records and seeds, the same on both sides; see ``bootstrap``), its 95 % t
    interval over the per-seed differences (``t_interval``; nan for one seed) and the
    per-seed differences; ``mine`` and ``theirs``: each side's mean over those seeds.
    None when they share no seed; no bootstrap interval when a predictions.csv is missing."""
    seeds = sorted(set(mine["seed"]) & set(theirs["seed"]))
    if not seeds:
        return None
    mine = mine[mine["seed"].isin(seeds)].sort_values("seed")
    theirs = theirs[theirs["seed"].isin(seeds)].sort_values("seed")
    diffs = mine[f"{split}_challenge_f1"].to_numpy() - theirs[f"{split}_challenge_f1"].to_numpy()
    found = predictions_of(exp, pd.concat([mine, theirs]), split)
    low, high = bootstrap(found[0], found[1][:len(seeds)], found[1][len(seeds):]) if found else (np.nan, np.nan)
    t_low, t_high = t_interval(diffs) or (np.nan, np.nan)
    return {"seeds": len(seeds), "seed_list": seeds, "diffs": diffs, "diff": float(diffs.mean()),
            "low": low, "high": high, "t_low": t_low, "t_high": t_high,
            "min": float(diffs.min()), "max": float(diffs.max()),
            "mine": float(mine[f"{split}_challenge_f1"].mean()),
            "theirs": float(theirs[f"{split}_challenge_f1"].mean())}


def paired_text(d: dict | None, seeds: int = 0) -> str:
    """The difference, its bootstrap interval, its t interval over seeds ('t, k df': k + 1
    seeds) and per-seed range; ``seeds``: the experiment's number of seeds, so a difference
    over fewer of them (a grid still running) says so."""
    if d is None:
        return ""
    ci = "" if np.isnan(d["low"]) else f" ({d['low']:+.3f} to {d['high']:+.3f}"
    if not np.isnan(d["t_low"]):
        t = f"t, {d['seeds'] - 1} df {d['t_low']:+.3f} to {d['t_high']:+.3f}"
        ci = f"{ci}; {t})" if ci else f" ({t})"
    elif ci:
        ci += ")"
    spread = f", seeds {d['min']:+.3f}..{d['max']:+.3f}" if d["seeds"] > 1 else ""
    fewer = f", {d['seeds']} of {seeds} seeds" if d["seeds"] < seeds else ""
    return f"{d['diff']:+.3f}{ci}{spread}{fewer}"


def verdict_text(d: dict | None) -> str:
    """A verdict's figure: the difference with the wider of its two intervals (see
    ``wider``) and the seed count next to it."""
    if d is None:
        return ""
    low, high, which = wider(d)
    ci = "" if np.isnan(low) else f" ({low:+.3f} to {high:+.3f}, {which})"
    return f"{d['diff']:+.3f}{ci}, n = {d['seeds']} seed{'s' * (d['seeds'] > 1)}"


def levels_of(table: pd.DataFrame, method: str) -> list[float]:
    """The pruned compression levels (keys) a method's own rounds reached, ascending."""
    rows = table[(table["method"] == method) & (table["control"] == "none") & (table["round"] > 0)]
    return sorted(level(rows["compression"]).unique())


def level_rows(table: pd.DataFrame, method: str, lv: float) -> pd.DataFrame:
    return ticket_rows(table, pd.Series({"method": method, "control": "none", "level": lv}))


def ratio_text(table: pd.DataFrame, lv: float) -> str:
    """'8.0x (7.2x all)': the level's compression of prunable weights, and of all parameters
    (ShrinkBench: all parameters / non-zero ones), mean over its rows."""
    rows = table[(level(table["compression"]) == lv) & ~table["method"].isin(BASELINES)]
    text = f"{rows['compression'].mean():.1f}x"
    if "compression_all" in rows and rows["compression_all"].notna().any():
        text += f" ({rows['compression_all'].mean():.1f}x all)"
    return text


def methods_in(table: pd.DataFrame) -> list[str]:
    present = set(table.loc[table["control"] == "none", "method"])
    return [m for m in (*METHODS, *BASELINES) if m in present] + sorted(present - set(METHODS) - set(BASELINES))


def versus_dense_table(exp: Path, table: pd.DataFrame) -> list[str]:
    """Per level, each method's test challenge F1 minus its own seed's dense network's (and,
    where the dense_equal_steps baseline ran, minus that baseline at the same level: what
    pruning adds beyond the extra training), with paired 95 % intervals."""
    names = methods_in(table)
    has_base = "dense_equal_steps" in names
    dense = dense_rows(table)
    lvls = sorted({lv for m in names for lv in levels_of(table, m)})
    seeds = table["seed"].nunique()
    cols = [f"{m} - dense" for m in names] + [f"{m} - dense, equal steps" for m in names
                                              if has_base and m not in BASELINES]
    lines = ["| compression | " + " | ".join(cols) + " |", "| ---: |" + " ---: |" * len(cols)]
    for lv in lvls:
        cells = [paired_text(paired(exp, "test", level_rows(table, m, lv), dense), seeds) for m in names]
        if has_base:
            base = level_rows(table, "dense_equal_steps", lv)
            cells += [paired_text(paired(exp, "test", level_rows(table, m, lv), base), seeds)
                      for m in names if m not in BASELINES]
        lines.append(f"| {ratio_text(table, lv)} | " + " | ".join(cells) + " |")
    return lines


def methods_table(exp: Path, table: pd.DataFrame) -> list[str]:
    """Per level, every pair of methods: the difference of test challenge F1 with its paired
    95 % interval (the same resampled seeds and records on both sides)."""
    names = [m for m in methods_in(table) if m not in BASELINES]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if not pairs:
        return []
    lvls = sorted({lv for m in names for lv in levels_of(table, m)})
    seeds = table["seed"].nunique()
    lines = ["| compression | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |",
             "| ---: |" + " ---: |" * len(pairs)]
    for lv in lvls:
        cells = [paired_text(paired(exp, "test", level_rows(table, a, lv), level_rows(table, b, lv)), seeds)
                 for a, b in pairs]
        lines.append(f"| {ratio_text(table, lv)} | " + " | ".join(cells) + " |")
    return lines


def interval_winner(exp: Path, table: pd.DataFrame, method: str, tolerance: float
                    ) -> tuple[float | None, dict | None, float]:
    """(level, its validation difference from dense, the bar) of ``method``'s interval-rule
    winner (see ``interval_winners``); level None when no level passes."""
    dense, seeds = dense_rows(table), run_seeds(table, method)
    best, best_val = None, None
    margin = -tolerance * dense_level(table, "val_challenge_f1", seeds)
    for lv in levels_of(table, method):
        rows = level_rows(table, method, lv)
        d = paired(exp, "val", rows, dense)
        if d is None or rows["seed"].nunique() < len(seeds) or np.isnan(wider(d)[0]) or wider(d)[0] <= margin:
            break
        best, best_val = lv, d
    return best, best_val, margin


def interval_winners(exp: Path, table: pd.DataFrame, tolerance: float) -> list[str]:
    """The winning ticket with its uncertainty: per method, the largest level up to which
    (at it and at every lower level) the lower bound of the wider of the two 95 % paired
    intervals (bootstrap, t over seeds: see ``wider``) of validation F1(ticket) - F1(dense)
    stays above -tolerance x dense validation F1; chosen on validation, its test difference
    reported beside it (the wider interval again, with the seed count)."""
    dense = dense_rows(table)
    lines = ["| method | seeds | largest level with lower bound > -tolerance x dense val | val F1 - dense "
             "(wider 95 % CI, seeds) | test F1 - dense (wider 95 % CI, seeds) |", "| --- | --- | ---: | ---: | ---: |"]
    for m in [m for m in methods_in(table) if m not in BASELINES]:
        seeds = run_seeds(table, m)
        best, best_val, margin = interval_winner(exp, table, m, tolerance)
        seed_text = ",".join(map(str, seeds))
        if best is None:
            lines.append(f"| {m} | {seed_text} | none (bar {margin:+.4f}) | | |")
            continue
        test = paired(exp, "test", level_rows(table, m, best), dense)
        lines.append(f"| {m} | {seed_text} | {ratio_text(table, best)} (bar {margin:+.4f}) | {verdict_text(best_val)} "
                     f"| {verdict_text(test)} |")
    return lines


def goal_methods(everything: pd.DataFrame) -> set[str]:
    """Methods whose chains the over-pruning guard (--goal) acted on: a try was rejected.
    Their seeds stop at different compressions, so they are read seed by seed."""
    rejected = everything[~everything["accepted"].astype(bool) & (everything["control"] == "none")]
    return set(rejected["method"])


def goal_table(exp: Path, everything: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Under --goal (LTH-ECG's schedule): per method and seed, the compression its chain
    reached within the tolerance (its last accepted round), the trainings it took (rejected
    tries included: the search's real cost), its test F1 and AF sensitivity / PPV against its
    dense network's, and over the seeds the paired difference of these final tickets from
    dense (95 % two-level interval, see ``bootstrap``): the answer to "how far does the
    guard let the network shrink, and at what cost"."""
    methods = sorted(goal_methods(everything))
    if not methods:
        return []
    dense = dense_rows(table)
    af = "test_sensitivity_A" in table
    lines = ["| method | seed | trainings (rejected) | last try | compression (prunable; all) | val F1 (dense) | "
             "test F1 (dense) | test F1 - dense (95 % CI) | AF sens. / PPV (dense) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        finals = []
        for seed, runs in everything[(everything["method"] == method) & (everything["control"] == "none")
                                     & (everything["round"] > 0)].groupby("seed"):
            kept = runs[runs["accepted"].astype(bool)]
            if kept.empty:
                continue
            final, last, own = kept.iloc[-1], runs.iloc[-1], dense[dense["seed"] == seed]
            if own.empty:
                continue
            d = own.iloc[0]
            finals.append(final)
            tried = "accepted" if bool(last["accepted"]) else f"rejected (p = {last['fraction']:.3f})"
            all_ratio = f"{final['compression_all']:.1f}x" if "compression_all" in final else "n/a"
            sens = (f"{final['test_sensitivity_A']:.2f} / {final['test_ppv_A']:.2f} "
                    f"({d['test_sensitivity_A']:.2f} / {d['test_ppv_A']:.2f})" if af else "n/a")
            diff = paired(exp, "test", kept.iloc[[-1]], own)
            lines.append(f"| {method} | {seed} | {len(runs)} ({int((~runs['accepted'].astype(bool)).sum())}) | "
                         f"{tried} | {final['compression']:.1f}x; {all_ratio} | {final['val_challenge_f1']:.3f} "
                         f"({d['val_challenge_f1']:.3f}) | {final['test_challenge_f1']:.3f} "
                         f"({d['test_challenge_f1']:.3f}) | {paired_text(diff)} | {sens} |")
        if len(finals) > 1:
            finals = pd.DataFrame(finals)
            ratio = finals["compression"]
            lines.append(f"| {method} | all {len(finals)} | | | {np.exp(np.log(ratio).mean()):.1f}x geometric mean "
                         f"({ratio.min():.1f}-{ratio.max():.1f}x) | | {finals['test_challenge_f1'].mean():.3f} | "
                         f"{paired_text(paired(exp, 'test', finals, dense))} | |")
    return lines


def under_budget(everything: pd.DataFrame, method: str, seed: int, budget: int) -> pd.Series | None:
    """The last accepted ticket of one seed's --goal chain had it run with --max-retries
    ``budget``: the chain is the same try for try up to its first round that needed more than
    ``budget`` redos, where it would have stopped (exact, since every try is recorded)."""
    rows = everything[(everything["method"] == method) & (everything["control"] == "none")
                      & (everything["seed"] == seed) & (everything["round"] > 0)]
    last = None
    for _, tries in rows.groupby("round"):
        ok = tries[tries["accepted"].astype(bool)].sort_values("attempt")
        if ok.empty or ok.iloc[0]["attempt"] > budget:
            break
        last = ok.iloc[0]
    return last


def budget_table(exp: Path, everything: pd.DataFrame, table: pd.DataFrame, budget: int) -> list[str]:
    """Per --goal method and seed: where the chain would have stopped under a retry budget,
    against where it stopped, with the ticket's test F1 - its dense network's."""
    dense = dense_rows(table)
    lines = [f"| method | seed | stopped at (no budget) | under {budget} redos per round | test F1 - dense "
             "(95 % CI) |", "| --- | ---: | ---: | ---: | ---: |"]
    for method in sorted(goal_methods(everything)):
        finals = []
        for seed in sorted(everything.loc[everything["method"] == method, "seed"].unique()):
            kept = everything[(everything["method"] == method) & (everything["control"] == "none")
                              & (everything["seed"] == seed) & everything["accepted"].astype(bool)]
            own = dense[dense["seed"] == seed]
            last = under_budget(everything, method, seed, budget)
            if kept.empty or own.empty or last is None:
                continue
            finals.append(last)
            diff = paired(exp, "test", pd.DataFrame([last]), own)
            lines.append(f"| {method} | {seed} | {kept.iloc[-1]['compression']:.1f}x | {last['compression']:.1f}x | "
                         f"{paired_text(diff)} |")
        if len(finals) > 1:
            d = paired(exp, "test", pd.DataFrame(finals), dense)
            lines.append(f"| {method} | all {len(finals)} | | | {verdict_text(d)} |")
    return lines


def af_table(table: pd.DataFrame) -> list[str]:
    """Per level and method: the test sensitivity and PPV of the AF class (mean over seeds)."""
    if "test_sensitivity_A" not in table:
        return []
    names = methods_in(table)
    sens, ppv = curves(table, "test_sensitivity_A"), curves(table, "test_ppv_A")
    cell = {(r.method, r.level): f"{r.mean:.2f}" for r in sens[sens["control"] == "none"].itertuples()}
    cell = {k: f"{v} / {p:.2f}" for k, v in cell.items()
            for p in [ppv[(ppv["method"] == k[0]) & (ppv["control"] == "none") & (ppv["level"] == k[1])]["mean"]
                      .iloc[0]]}
    lvls = sorted({lv for (_, lv) in cell})
    lines = ["| compression | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    for lv in lvls:
        lines.append(f"| {ratio_text(table, lv) if lv else '1.0x (dense)'} | "
                     + " | ".join(cell.get((m, lv), "") for m in names) + " |")
    return lines


AF_PPV, AF_SENSITIVITY = 0.9, 0.9
"""The fixed PPV and the fixed sensitivity of the AF operating points in summary.md."""


def af_operating_table(exp: Path, table: pd.DataFrame) -> list[str]:
    """Per level and method (dense first): AF sensitivity and PPV on test at the threshold on
    P(AF) chosen on each seed's validation records for PPV >= AF_PPV, and for sensitivity >=
    AF_SENSITIVITY (operating_point.py; 95 % two-level bootstrap). Runs made before
    predictions.csv held probabilities give 'no probabilities'; [] when none has them."""
    dense = dense_rows(table)
    names = [m for m in methods_in(table) if m not in BASELINES]
    cells: dict[tuple[float, str], tuple[str, str]] = {}
    groups = [(0.0, "dense", dense)] + [(lv, m, level_rows(table, m, lv)) for m in names for lv in levels_of(table, m)]
    for lv, m, rows in groups:
        runs = [exp / f for f in rows.sort_values("seed")["folder"]]
        at_ppv = op.operating_point(runs, "ppv", AF_PPV)
        at_sens = op.operating_point(runs, "sensitivity", AF_SENSITIVITY)
        cells[(lv, m)] = (op.text(at_ppv), op.text(at_sens))
    if all(c == ("no probabilities", "no probabilities") for c in cells.values()):
        return []
    lines = [f"| compression | method | seeds | test at PPV >= {AF_PPV:.2f} on validation | test at sensitivity >= "
             f"{AF_SENSITIVITY:.2f} on validation |", "| ---: | --- | ---: | ---: | ---: |"]
    for (lv, m, rows), (a, b) in zip(groups, cells.values(), strict=True):
        ratio = "1.0x (dense)" if m == "dense" else ratio_text(table, lv)
        lines.append(f"| {ratio} | {m} | {rows['seed'].nunique()} | {a} | {b} |")
    return lines


def curve_label(method: str, suffix: str, curve: pd.DataFrame, seeds: int) -> str:
    """The legend entry of one curve; one whose pruned points have fewer seeds than the
    experiment (a grid still running) says how many, since the title gives the experiment's."""
    label = LABELS.get(method, method) + (f", {suffix}" if suffix else "")
    pruned = curve.loc[curve["round"] > 0, "seeds"]
    if len(pruned) and pruned.max() < seeds:
        label += f" ({pruned.max()} of {seeds} seeds)"
    return label


def round_ticks(ax: plt.Axes, low: float, high: float) -> None:
    """Label a log x axis at 1, 2 and 5 times powers of ten between ``low`` and ``high``, as
    "20k" or "500M": matplotlib's own log labels (4x10^8, 6x10^7, ...) overlap across the
    two to three decades of a FLOPs or weight-count axis."""
    ticks = [m * 10.0**e for e in range(0, 13) for m in (1, 2, 5) if low / 1.5 <= m * 10.0**e <= high * 1.5]
    names = [f"{t / 1e9:g}G" if t >= 1e9 else f"{t / 1e6:g}M" if t >= 1e6 else f"{t / 1e3:g}k" if t >= 1e3
             else f"{t:g}" for t in ticks]
    ax.set_xticks(ticks, names)
    ax.minorticks_off()


def plot_compression(table: pd.DataFrame, split: str, out: Path, note: str = "",
                     per_seed: set[str] | frozenset[str] = frozenset()) -> None:
    """Challenge F1 and accuracy against the compression ratio, and (where results.csv has
    the FLOPs column) challenge F1 against the FLOPs per 30-s record of each round's network.
    The methods in ``per_seed`` (the --goal chains, whose seeds stop at different levels)
    get one line per seed instead of a mean that would jump from seed to seed."""
    with_flops = "flops" in table and table["flops"].notna().all()
    fig, axes = plt.subplots(1, 3 if with_flops else 2, figsize=(18 if with_flops else 12, 4.8))
    f1 = ("challenge_f1", "challenge F1 (mean of N, A, O)")
    panels = [(*f1, "compression"), ("accuracy", "accuracy", "compression")] + ([(*f1, "flops")] if with_flops else [])
    for ax, (metric, name, x) in zip(axes, panels, strict=True):
        col = f"{split}_{metric}"
        dense = dense_level(table, col)
        ax.axhline(dense, color="black", lw=1, label="dense")
        ax.axhspan(dense * 0.99, dense, color="black", alpha=0.08, label="dense - 1 %")
        for (method, control), c in curves(table, col).groupby(["method", "control"], sort=False):
            style, suffix = CONTROL_STYLE.get(control, ("-." if method in BASELINES else "-", ""))
            label = curve_label(method, suffix, c, table["seed"].nunique())
            color = COLORS.get(method, None)
            if x == "flops" and method in BASELINES:
                continue  # the unpruned baseline has the dense network's FLOPs at every round
            if method in per_seed and control == "none":
                for i, (_, rows) in enumerate(table[(table["method"] == method)
                                                    & (table["control"] == "none")].groupby("seed")):
                    own = curves(rows, col)
                    ax.plot(own[x], own["mean"], "-", marker="o", ms=3, color=color, lw=1.1, alpha=0.85,
                            label=f"{LABELS.get(method, method)}, each seed" if i == 0 else None)
                continue
            if control != "none":  # controls only where they ran: no line from the dense network
                c = c[c["round"] > 0]
            ax.plot(c[x], c["mean"], style, marker="o" if control == "none" else "x", ms=3.5,
                    color=color, lw=1.6 if control == "none" else 1.2, label=label)
            if c["seeds"].max() > 1:
                ax.fill_between(c[x], c["low"], c["high"], color=color, alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_ylabel(f"{split} {name}")
        ax.grid(True, which="both", alpha=0.25)
        if x == "flops":
            round_ticks(ax, table["flops"].min(), table["flops"].max())
            ax.set_xlabel("FLOPs per 30-s record (non-zero weights only; lower is cheaper)")
            ax.invert_xaxis()  # compression grows to the right, as in the other panels
            continue
        if metric == "challenge_f1":
            ax.plot([LTH_ECG_RATIO], [dense * 0.99], marker="*", ms=14, color="gold", mec="black", ls="none",
                    label="LTH-ECG claim: 142x, < 1 % F1 loss")
        ax.axvline(LTH_ECG_RATIO, color="gold", lw=1, ls="-.")
        ax.set_xlabel("compression ratio (prunable weights / surviving weights)")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 142, 500, 1000) if t <= max(table["compression"].max(), 150)]
        ax.set_xticks(ticks, [f"{t}x" for t in ticks])
        ax.minorticks_off()
        add_all_parameters_axis(ax, table)
    seeds = table["seed"].nunique()
    kind = "One-shot (one round, the line only joins it to dense)" if table["round"].max() == 1 else "Iterative"
    scored = "" if score == "whole" else WINDOWS_TITLE
    fig.suptitle(f"{kind} magnitude pruning of the Hannun et al. ECG network ({split} split{scored}, mean over "
                 f"{seeds} seed{'s' * (seeds > 1)}, shaded: min-max)" + (f"\n{note.upper()}" if note else ""),
                 fontsize=11, color="firebrick" if note else "black")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    for ext in ("png", "svg"):
        fig.savefig(out / f"compression.{ext}", dpi=150)
    plt.close(fig)


def add_all_parameters_axis(ax: plt.Axes, table: pd.DataFrame) -> None:
    """A top axis with the compression of all parameters (ShrinkBench: parameters / non-zero
    parameters, biases and BatchNorm included), a function of the bottom axis's ratio since
    the parameters that are never pruned are the same for every row."""
    prunable = float(table["prunable"].iloc[0])
    fixed = float((table["nonzero_parameters"] - table["remaining"]).iloc[0])  # never pruned
    total = prunable + fixed

    def to_all(c: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return total / (fixed + prunable / np.asarray(c, dtype=float))

    def to_prunable(a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return prunable / (total / np.asarray(a, dtype=float) - fixed)

    top = ax.secondary_xaxis("top", functions=(to_all, to_prunable))
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if t < total / max(fixed, 1)]
    top.set_xticks(ticks, [f"{t}x\n{100 / t:.3g} %" for t in ticks], fontsize=7)
    top.minorticks_off()
    top.set_xlabel("all parameters (ShrinkBench): compression, share remaining", fontsize=8)


def plot_layers(exp: Path, table: pd.DataFrame, best: pd.Series, out: Path) -> None:
    """Remaining share of weights per layer of one seed's copy of the best ticket."""
    row = ticket_rows(table, best).iloc[0]
    sparsity = pd.read_csv(exp / row["folder"] / "sparsity.csv")
    fig, ax = plt.subplots(figsize=(12, 4))
    x = np.arange(len(sparsity))
    ax.bar(x, 1 - sparsity["sparsity"], color=COLORS.get(row["method"], "#1f77b4"))
    ax.set_yscale("log")
    ax.set_xticks(x, sparsity["layer"], rotation=90, fontsize=7)
    ax.set_ylabel("share of weights remaining")
    ax.set_title(f"Best ticket: {LABELS.get(row['method'], row['method'])}, round {row['round']}, "
                 f"{row['compression']:.0f}x overall (seed {row['seed']})", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"layers.{ext}", dpi=150)
    plt.close(fig)


def byte_ratios(rows: pd.DataFrame) -> dict[str, float]:
    """Mean over ``rows`` of each dense file's bytes over the ticket's (export; entropy)."""
    out = {}
    for unit in tb.UNITS:
        out[unit] = float((rows[unit] / rows["bytes_ticket"]).mean())
        out[f"{unit} entropy"] = float((rows[unit] / rows["bytes_ticket_entropy"]).mean())
    return out


def bytes_section(exp: Path, table: pd.DataFrame, best: pd.DataFrame, tolerance: float) -> list[str]:
    """The unit of "142x" (issue 32 item 3): per level, the ticket in bytes next to its ratio
    of weights; the byte ratios the winners within the tolerance reach; and how a 142x ratio
    in bytes reads in weights, for this width and the full network."""
    if not set(tb.BYTE_COLUMNS) <= set(table.columns):
        return ["", f"(No byte columns in {exp / 'results.csv'}: rebuild it with `python run_experiments.py --exp "
                f"{exp} --collect`.)"]
    tickets = table[~table["method"].isin(BASELINES) & (table["control"] == "none")]
    dense = dense_rows(table)
    fp32, adam = dense["bytes_dense_fp32"].iloc[0], dense["bytes_dense_adam"].iloc[0]
    lines = ["", "The unit of the ratio: each level's ticket in bytes as a user counts it, next to its ratio of "
             f"weights (ticket_bytes.py; mean over methods and seeds). Dense network: fp32 checkpoint "
             f"(`torch.save(state_dict)`) {fp32:,.0f} B; with Adam's two moments (a training checkpoint, as PyTorch "
             f"and Keras users save one) {adam:,.0f} B. Ticket: export_ticket.py's fp32 file (survivors + bitmask or "
             "gap index + biases and BatchNorm + header), and the same with each mask at its entropy.", "",
             "| compression (weights) | surviving weights | ticket file B | ticket, mask at entropy B | "
             "fp32 checkpoint / ticket (file; entropy) | Adam checkpoint / ticket (file; entropy) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lv in sorted(level(tickets["compression"]).unique()):
        rows = tickets[level(tickets["compression"]) == lv]
        r = byte_ratios(rows)
        lines.append(f"| {ratio_text(table, lv)} | {rows['remaining'].mean():,.0f} | "
                     f"{rows['bytes_ticket'].mean():,.0f} | "
                     f"{rows['bytes_ticket_entropy'].mean():,.0f} | {r['bytes_dense_fp32']:.1f}x; "
                     f"{r['bytes_dense_fp32 entropy']:.1f}x | {r['bytes_dense_adam']:.1f}x; "
                     f"{r['bytes_dense_adam entropy']:.1f}x |")
    lines += ["", f"The byte ratios of the largest level within {tolerance:.0%} of dense, per method (point rule: "
              "mean validation F1; interval rule: the wider interval's lower bound, both chosen on validation):", "",
              "| method | rule | compression (weights) | fp32 checkpoint / ticket (file; entropy) | "
              "Adam checkpoint / ticket (file; entropy) |", "| --- | --- | ---: | ---: | ---: |"]
    for m in [m for m in methods_in(table) if m not in BASELINES]:
        point = best[(best["method"] == m) & (best["control"] == "none")]
        chosen = {"point": point["level"].iloc[0] if len(point) else None,
                  "interval": interval_winner(exp, table, m, tolerance)[0]}
        for rule, lv in chosen.items():
            if lv is None:
                lines.append(f"| {m} | {rule} | none | | |")
                continue
            r = byte_ratios(level_rows(table, m, lv))
            lines.append(f"| {m} | {rule} | {ratio_text(table, lv)} | {r['bytes_dense_fp32']:.1f}x; "
                         f"{r['bytes_dense_fp32 entropy']:.1f}x | {r['bytes_dense_adam']:.1f}x; "
                         f"{r['bytes_dense_adam entropy']:.1f}x |")
    cfg = tb.run_config(exp / dense["folder"].iloc[0])
    lines += ["", f"How LTH-ECG's \"{LTH_ECG_RATIO:g}x\" reads if it is a ratio of bytes: the compression of the "
              "prunable weights (uniform density over the layers) at which each dense file over the compact ticket "
              f"is {LTH_ECG_RATIO:g}x (the paper speaks of a model of more than 100 MB; a public reproduction "
              "quotes 115 MB to about 0.8 MB, about 144x in bytes). 'unreachable': the biases, BatchNorm and "
              "header alone exceed the target.", "",
              "| network | fp32 checkpoint, ticket file | fp32 checkpoint, mask at entropy | Adam checkpoint, "
              "ticket file | Adam checkpoint, mask at entropy |", "| --- | ---: | ---: | ---: | ---: |"]
    full = HannunConfig(**{**vars(cfg), "width": 1.0})
    for name, c in ((f"this experiment (width {cfg.width:g})", cfg), ("the full network (width 1)", full)):
        sizes = tb.dense_bytes(c)
        cells = []
        for unit in tb.UNITS:
            for entropy in (False, True):
                w = tb.weight_ratio_at(c, LTH_ECG_RATIO, unit, entropy)
                cells.append("unreachable" if np.isinf(w) else f"{w:.0f}x")
        lines.append(f"| {name}: {sizes[0] / 1e6:.1f} MB fp32, {sizes[1] / 1e6:.1f} MB with Adam | "
                     + " | ".join(cells) + " |")
    return lines


EXPLORATORY = "exploratory.json"
"""An experiment's seeds added after its test figures were seen: {"seeds": [...], "why": "..."}."""


def seeds_text(seeds: list[int]) -> str:
    """'seed 2' or 'seeds 3, 4', as the exploratory seeds are named in summaries."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def exploratory(exp: Path) -> dict | None:
    """The experiment's exploratory seeds (``EXP/exploratory.json``), or None; a clear error
    when the file is malformed."""
    path = exp / EXPLORATORY
    if not path.is_file():
        return None
    try:
        marked = json.loads(path.read_text())
        seeds = [int(s) for s in marked["seeds"]]
        why = str(marked["why"])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} must be JSON {{\"seeds\": [3, 4], \"why\": \"...\"}}: {e}") from e
    return {"seeds": seeds, "why": why}


def claim_family(exp: Path, table: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """The family of comparisons the LTH-ECG claim ("a ticket within 1 % of dense at a high
    compression") rests on: every method's ticket against its own seed's dense network at
    every level all its seeds reached, on test F1. For each, the one-sided t test over seeds
    of "within the margin" (``noninferiority_p``; margin = tolerance x the dense test F1 of
    those seeds) and its Holm-adjusted p over the whole family."""
    dense, rows = dense_rows(table), []
    for m in [m for m in methods_in(table) if m not in BASELINES]:
        seeds = run_seeds(table, m)
        margin = tolerance * dense_level(table, "test_challenge_f1", seeds)
        for lv in levels_of(table, m):
            d = paired(exp, "test", level_rows(table, m, lv), dense)
            if d is None or d["seeds"] < len(seeds):
                continue
            rows.append({"method": m, "level": lv, "d": d, "margin": margin,
                         "p": noninferiority_p(d["diffs"], margin)})
    family = pd.DataFrame(rows, columns=["method", "level", "d", "margin", "p"])
    return family.assign(holm=holm(family["p"].to_numpy()) if len(family) else [])


def claim_table(table: pd.DataFrame, family: pd.DataFrame) -> list[str]:
    lines = ["| method | compression | seeds | test F1 - dense (wider 95 % CI, seeds) | margin | p (one-sided t) | "
             "Holm p | within 1 % of dense (Holm, 0.05) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in family.itertuples():
        within = "n/a (one seed)" if np.isnan(r.holm) else ("yes" if r.holm < 0.05 else "not shown")
        p_text = "n/a" if np.isnan(r.p) else f"{r.p:.3g}"
        holm_text = "n/a" if np.isnan(r.holm) else f"{r.holm:.3g}"
        lines.append(f"| {r.method} | {ratio_text(table, r.level)} | {','.join(map(str, r.d['seed_list']))} | "
                     f"{verdict_text(r.d)} | -{r.margin:.4f} | {p_text} | {holm_text} | {within} |")
    return lines


def claim_section(exp: Path, table: pd.DataFrame, tolerance: float) -> list[str]:
    """The claim's family, Holm-corrected: over every seed (exploratory when the experiment
    marks seeds so) and, where seeds are marked, over the pre-registered seeds alone."""
    text = ("The family of comparisons the LTH-ECG claim rests on (a ticket within "
            f"{tolerance:.0%} of dense): every method at every level all its seeds reached, ticket - dense on test "
            "F1; p: one-sided t over the per-seed differences against \"loses the margin or more\" (margin = "
            f"{tolerance:g} x the dense test F1 of the same seeds), Holm-adjusted over the whole family. \"yes\" "
            "means this family shows the ticket within the margin at 5 % family-wise error.")
    marked = exploratory(exp)
    family = claim_family(exp, table, tolerance)
    if not len(family):
        return []
    if marked is None:
        return ["", text, "", *claim_table(table, family)]
    pre = table[~table["seed"].isin(marked["seeds"])]
    lines = ["", text, "", f"Confirmatory: the pre-registered seeds only ({seeds_text(marked['seeds'])} "
             "left out).", ""]
    confirmatory = claim_family(exp, pre, tolerance)
    lines += claim_table(pre, confirmatory) if len(confirmatory) else ["(no comparison)"]
    lines += ["", f"Exploratory: every seed, {seeds_text(marked['seeds'])} included ({marked['why']}).",
              "", *claim_table(table, family)]
    return lines


def summary(table: pd.DataFrame, best: pd.DataFrame, tolerance: float, exp: Path | None = None,
            note: str = "", retry_budget: int | None = None) -> str:
    dense_val, dense_test = dense_level(table, "val_challenge_f1"), dense_level(table, "test_challenge_f1")
    head = ([f"**{note.capitalize()}** (the grid was interrupted or is still running: these tables hold only "
             "the finished cells).", ""] if note else [])
    if score == "windows":
        head += [f"{WINDOWS_BANNER} as in plots/summary.md.", ""]
    if exp is not None and (marked := exploratory(exp)):
        head += [f"**Exploratory {seeds_text(marked['seeds'])}** ({marked['why']}): every figure "
                 "below that averages or pairs over them (a cell over more seeds than the pre-registered "
                 f"{', '.join(map(str, sorted(set(table['seed']) - set(marked['seeds']))))}) is exploratory; "
                 "the claim's family is also given over the pre-registered seeds alone (confirmatory).", ""]
    lines = head + [
             f"Winning ticket per method: the largest compression whose mean validation challenge F1 is at "
             f"least dense x (1 - {tolerance:g}), dense averaged over the seeds the method ran (all "
             f"{table['seed'].nunique()} seed(s): validation {dense_val:.4f}, bar {dense_val * (1 - tolerance):.4f}, "
             f"test {dense_test:.4f}).", "",
             "| method | control | seeds | compression | remaining weights | FLOPs per 30-s record (dense) | val F1 "
             "(bar) | test F1 (mean ± sd) | test F1 95 % CI | test F1 - dense (wider 95 % CI, seeds) | test accuracy |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense_flops = table.loc[table["round"] == 0, "flops"].mean() if "flops" in table else np.nan
    for _, b in best.iterrows():
        remaining = ticket_rows(table, b)["remaining"].mean()
        ticket_flops = ticket_rows(table, b)["flops"].mean() if "flops" in table else np.nan
        flops_text = "n/a" if np.isnan(ticket_flops) else f"{ticket_flops / 1e6:,.1f} M ({dense_flops / 1e6:,.1f} M)"
        sd = 0.0 if np.isnan(b["sd_test"]) else b["sd_test"]
        ci = bootstrap_interval(exp, table, b) if exp is not None else None
        ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "n/a"
        seed_text = ",".join(map(str, run_seeds(table, b["method"], b["control"])))
        versus = (verdict_text(paired(exp, "test", ticket_rows(table, b), dense_rows(table))) if exp is not None
                  else f"{b['mean_test'] - b['dense_test']:+.4f}")
        lines.append(f"| {b['method']} | {b['control']} | {seed_text} | {b['compression_val']:.1f}x | "
                     f"{remaining:,.0f} | {flops_text} | {b['mean_val']:.4f} "
                     f"({b['dense_val'] * (1 - tolerance):.4f}) | "
                     f"{b['mean_test']:.4f} ± {sd:.4f} | {ci_text} | {versus} | "
                     f"{b['test_accuracy']:.4f} |")
    candidates = table.loc[~table["method"].isin(BASELINES), ["method", "control"]].drop_duplicates()
    missing = set(map(tuple, candidates.values)) - set(map(tuple, best[["method", "control"]].values))
    for method, control in sorted(missing):
        seed_text = ",".join(map(str, run_seeds(table, method, control)))
        lines.append(f"| {method} | {control} | {seed_text} | none within tolerance | | | | | | | |")
    seeds = table["seed"].nunique()
    for split, name in (("val", "Validation"), ("test", "Test")):
        lines += ["", f"{name} challenge F1 against compression (mean ± sd over {seeds} seed(s); the numbers "
                  "behind compression.png):", "", *compression_table(table, f"{split}_challenge_f1")]
    if exp is None:
        return "\n".join(lines) + "\n"
    if goal := goal_table(exp, load_all(exp), table):
        lines += ["", "Over-pruning guard (--goal, LTH-ECG's schedule): where each seed's chain stopped. A round "
                  "whose validation F1 falls below the tolerance is discarded and redone at a smaller rate, so "
                  "seeds stop at different compressions and the tables above, which average seeds level by "
                  "level, mix them; this table reads each seed's last accepted ticket.", "", *goal]
        if retry_budget is not None:
            lines += ["", f"The same chains read post hoc under a retry budget of {retry_budget} redos per round "
                      "(train.py --max-retries; the pre-registered rule of configs/cinc2017-cpu-lthecg-prereg.sh): "
                      "a chain is the same try for try up to its first round over the budget, where it stops.", "",
                      *budget_table(exp, load_all(exp), table, retry_budget)]
    how = ("Two 95 % intervals stand beside every difference: first a two-level bootstrap (each replicate draws "
           "the records and the seeds with replacement, the same records and seeds on both sides of a difference, "
           "each seed's run paired with the same seed's), then 't, k df': Student's t over the k + 1 per-seed "
           "paired differences (each seed one draw; none for one seed). With few seeds the bootstrap's seed level "
           "can take only a few distinct draws and is too narrow, so the per-seed differences are given too "
           "(`seeds min..max`), and every verdict (this table, the point rule's test difference above, the "
           "claim's family below) reads the wider of the two intervals and gives its seed count.")
    lines += ["", f"Winning tickets with their uncertainty (the interval rule; chosen on validation). {how}", "",
              *interval_winners(exp, table, tolerance)]
    lines += claim_section(exp, table, tolerance)
    lines += bytes_section(exp, table, best, tolerance)
    lines += ["", "Each method against the dense network of its own seed, and against the dense network trained "
              "for the same cumulative steps (dense_equal_steps, placed at the level of lr_rewind's round with the "
              "same budget): test challenge F1 difference, mean over the seeds both sides have (95 % CI, per-seed "
              "range; 'k of n seeds' where a side has fewer seeds than the experiment).", "",
              *versus_dense_table(exp, table)]
    if methods := methods_table(exp, table):
        lines += ["", "Method against method at each level: test challenge F1 difference over the seeds both "
                  "methods have (95 % CI, per-seed range; 'k of n seeds' as above).", "", *methods]
    if af := af_table(table):
        lines += ["", "Atrial fibrillation (class A) on the test split: sensitivity / PPV, mean over seeds.", "",
                  *af]
    if score != "whole":
        lines += ["", "AF operating points: left out here; they threshold P(AF) of whole records (predictions.csv "
                  "keeps no windowed probabilities): see plots/summary.md."]
    elif operating := af_operating_table(exp, table):
        lines += ["", f"AF operating points: the threshold on P(AF) (softmax of the mean logits, predictions.csv) "
                  f"chosen on each seed's validation records for PPV >= {AF_PPV:g} (the most AF found), and for "
                  f"sensitivity >= {AF_SENSITIVITY:g} (the fewest false alarms); test sensitivity / PPV at it, mean "
                  "over seeds (95 % two-level bootstrap of test records and seeds).", "", *operating]
    else:
        lines += ["", "AF operating points: none, since no run here has class probabilities in its predictions.csv "
                  "(train.py writes them for runs made from 2026-12-05 on)."]
    if controls := controls_table(exp, table):
        lines += ["", "Tickets against the random controls (test challenge F1, mean over seeds; the interval as "
                  "above): above 0 means these tickets beat these controls on records like these.", "", *controls]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", help="experiment folder holding results.csv")
    p.add_argument("--widths", help="EXP,EXP,...: experiments of one grid at several network widths; draws "
                   "widths.png and widths.md (plot_widths.py) into --out instead of one experiment's plots")
    p.add_argument("--out", default=None, help="output folder (default EXP/plots; with --widths, required)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="split drawn in compression.png")
    p.add_argument("--score", default="whole", choices=list(SCORES),
                   help="records scored whole (default) or on windows of the training length (default --out "
                   "EXP/plots-windows)")
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed relative loss of validation F1")
    p.add_argument("--retry-budget", type=int, default=None,
                   help="--goal chains: also read each seed's chain as if run with train.py --max-retries N")
    args = p.parse_args(argv)
    if not 0 <= args.tolerance < 1:
        p.error(f"--tolerance must be in [0, 1), got {args.tolerance}")
    global score
    score = args.score  # read by load_all and predictions_of
    if (args.exp is None) == (args.widths is None):
        p.error("give one of --exp EXP (one experiment) or --widths EXP,EXP,... (across widths)")
    if args.widths is not None:
        import plot_widths  # imports this module: loaded only when asked for
        exps = [Path(e) for e in args.widths.split(",") if e]
        if args.out is None:
            p.error("--widths needs --out, the folder for widths.png and widths.md")
        for e in exps:
            if not (e / "results.csv").is_file():  # a grid not yet started: the others still draw
                print(f"note: {e} has no results.csv yet (no finished cell): left out")
        exps = [e for e in exps if (e / "results.csv").is_file()]
        if not exps:
            p.error(f"--widths: none of {args.widths!r} has a results.csv yet")
        print(plot_widths.main(exps, Path(args.out), args.tolerance, score))
        print(f"wrote {args.out}/widths.png/.svg, widths.md")
        return
    exp = Path(args.exp)
    out = Path(args.out) if args.out else exp / ("plots" if score == "whole" else f"plots-{score}")
    out.mkdir(parents=True, exist_ok=True)
    table = load(exp)
    note = partial(exp)
    plot_compression(table, args.split, out, note, goal_methods(load_all(exp)))
    best = winners(table, args.tolerance)
    tickets = best[(best["control"] == "none") & (best["round"] > 0)]
    if len(tickets):
        plot_layers(exp, table, tickets.iloc[0], out)
    if args.retry_budget is not None and args.retry_budget < 1:
        p.error(f"--retry-budget must be >= 1, got {args.retry_budget}")
    text = summary(table, best, args.tolerance, exp, note, args.retry_budget)
    atomic_write_text(text, out / "summary.md")  # export_ticket.py --winner reads winners.csv: never torn
    cols = ["method", "control", "round", "compression_val", "mean_val", "mean_test", "sd_test"]
    atomic_write_text(best[cols].rename(columns={"compression_val": "compression", "mean_val": "val_challenge_f1",
                                                 "mean_test": "test_challenge_f1", "sd_test": "test_challenge_f1_sd"})
                      .to_csv(index=False, float_format="%.6g"), out / "winners.csv")
    print(text)
    print(f"wrote {out}/compression.png/.svg, {'layers.png/.svg, ' if len(tickets) else ''}summary.md, winners.csv")


if __name__ == "__main__":
    with script_errors():
        main()
