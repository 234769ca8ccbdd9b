"""Do tickets break first? Test challenge F1 of dense networks and tickets under input
corruptions a wearable meets, with paired intervals. Evaluation only: no training.

Conditions, applied to each test record's samples (int16 uV at 200 Hz, as predict.py feeds
the network, before the training set's z-scoring), seeded per record so every network sees
the same corrupted record:

  clean           the record as built
  wander-A        baseline wander of amplitude A mV: a sinusoid at 0.05-0.3 Hz with a random
                  phase (build_datasets.synthetic_record's wander, at a fixed amplitude)
  emg-R           muscle (EMG) noise: white Gaussian noise of R uV RMS, the synthetic
                  generator's muscle-noise model (band-limited by the 200 Hz sampling)
  gain-G          the amplitude times G (a wrong gain in a header, or an electrode that
                  picks up a smaller or larger ECG); inputs are z-scored with the training
                  set's fixed mean and std, so gain is not normalised away
  fs-F            the record as a device at F Hz would pass it on: resampled 200 -> F -> 200
                  Hz with build_datasets.resample, the polyphase path predict.py takes for a
                  record at F Hz (it cannot add what a 200 Hz record lacks above 100 Hz, so
                  it tests the resampling path, not a device's analog front end)

Networks: every trained network under --exp for --seeds (``seedS/dense`` and
``seedS/<method>/round_NN`` that hold a model.pt, e.g. after ``run_state.py restore``),
named by method and compression level, plus ``--net NAME:SEED=PATH`` (a ticket .npz or a
run folder). A network is compared with the dense network of its own seed.

Statistics (95 % two-level percentile bootstrap as plot_results.bootstrap: test records and
seeds resampled, the same draws for every term, so each difference is paired record by
record and seed by seed): per network and condition, the F1 and its change from clean;
per ticket, **how much more it loses than dense**: [F1(ticket, c) - F1(ticket, clean)] -
[F1(dense, c) - F1(dense, clean)] (negative: the ticket breaks first).

Writes OUT/predictions.csv (condition, record, label, then the class each network
predicted: one column per network and seed),
OUT/robustness.md (the tables) and OUT/robustness.png.

Example (the CPU-scale grid's seeds 3 and 4, with the shipped ticket; 9 conditions x 8 networks,
855 records each, ~7 s per evaluation on an idle core):
    python run_state.py restore results/cinc2017-cpu
    python ship_ticket.py --exp results/cinc2017-cpu --out results/robustness-cinc2017 --remake 3:weight_rewind:6
    python robustness.py --exp results/cinc2017-cpu --seeds 3,4 --data data/cinc2017 \\
        --net "weight_rewind 4x, shipped:3=results/ticket-cinc2017/ticket-fp32.npz" \\
        --net "weight_rewind 64x:3=results/robustness-cinc2017/retrained/seed3/weight_rewind/round_06" \\
        --out results/robustness-cinc2017
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import export_ticket as et  # noqa: E402
import train as tr  # noqa: E402
from batching import Batcher, Normalizer  # noqa: E402
from build_datasets import FS, DatasetError, ECGDataset, load_dataset, resample  # noqa: E402
from metrics import class_f1, confusion  # noqa: E402
from model import CLASSES  # noqa: E402
from run_folders import atomic_write_text  # noqa: E402

DEFAULT_CONDITIONS = "clean,wander-0.3,wander-1,emg-25,emg-100,gain-0.5,gain-2,fs-250,fs-500"
CONDITION = re.compile(r"^(clean|wander-[0-9.]+|emg-[0-9.]+|gain-[0-9.]+|fs-[0-9.]+)$")


# --------------------------------------------------------------------------- corruptions


def corrupt(x: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    """One record (int16 uV at 200 Hz, unpadded) under ``condition``, as int16."""
    if condition == "clean":
        return x
    kind, value = condition.split("-", 1)
    v = float(value)
    y = x.astype(np.float64)
    if kind == "wander":
        t = np.arange(len(x)) / FS
        y += 1000 * v * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi))
    elif kind == "emg":
        y += v * rng.standard_normal(len(x))
    elif kind == "gain":
        y *= v
    elif kind == "fs":
        y = resample(resample(x, FS, int(v)), int(v), FS)[: len(x)].astype(np.float64)
        y = np.pad(y, (0, len(x) - len(y)))
    else:
        raise ValueError(f"unknown condition {condition!r}")
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def corrupted_split(ds: ECGDataset, split: str, condition: str, seed: int) -> ECGDataset:
    """The records of ``split`` alone, each under ``condition`` (record i seeded by (seed, i))."""
    idx = ds.indices(split)
    signals = np.zeros((len(idx), ds.signals.shape[1]), dtype=np.int16)
    for row, i in enumerate(idx):
        n = ds.lengths[i]
        signals[row, :n] = corrupt(ds.signals[i, :n], condition, np.random.default_rng([seed, int(i)]))
    return replace(ds, names=ds.names[idx], labels=ds.labels[idx], lengths=ds.lengths[idx],
                   split=np.full(len(idx), split), signals=signals)


# --------------------------------------------------------------------------- networks


def load_network(path: Path) -> tuple[torch.nn.Module, dict]:
    """(network in eval mode, normaliser) of a ticket file or a train.py run folder."""
    try:
        if path.is_file():
            model, meta = et.load_ticket(path)
            return model, meta["normalizer"]
        cfg, state, masks, norm, _ = et.read_run(path)
    except et.TicketError as e:
        raise SystemExit(f"error: {e}") from e
    model = et.build_model(cfg, state)
    if masks is not None:
        for name, w in et.pm.prunable_weights(model).items():
            if name in masks:
                w.data.mul_(masks[name])
    return model, norm


def discover(exp: Path, seeds: list[int]) -> list[tuple[str, int, Path]]:
    """(name, seed, run folder) of every trained network of ``seeds`` under ``exp``, named
    'dense' or '<method> <compression>x' from exp/results.csv (accepted, no controls)."""
    table = pd.read_csv(exp / "results.csv")
    table = table[table["accepted"].astype(bool) & (table["control"] == "none") & table["seed"].isin(seeds)]
    nets = {}
    for _, row in table.iterrows():
        folder = exp / row["folder"]
        if (folder / tr.FINAL).is_file():
            name = "dense" if row["round"] == 0 else f"{row['method']} {row['compression']:.0f}x"
            nets[(name, int(row["seed"]))] = folder
    return [(n, s, f) for (n, s), f in sorted(nets.items(), key=lambda kv: (kv[0][0] != "dense", kv[0]))]


@torch.inference_mode()
def predicted_classes(model: torch.nn.Module, norm: dict, ds: ECGDataset, batch_size: int) -> np.ndarray:
    """Each record's class (mean of its per-step logits, as training evaluates)."""
    batcher = Batcher(ds, Normalizer(**norm), model.cfg.stride, torch.device("cpu"))
    cfg = tr.TrainConfig(eval_batch_size=batch_size)
    return tr.predict(model, batcher, np.arange(len(ds.labels)), cfg, bf16=False)["mean"]


def recorded_agreement(run: Path, split: str, names: np.ndarray, predicted: np.ndarray) -> float:
    """Share of records whose class here equals the one in the run's predictions.csv: 1.0
    shows the weights (restored by run_state.py) are the recorded run's."""
    recorded = pd.read_csv(run / tr.PREDICTIONS, keep_default_na=False).query("split == @split")
    mine = pd.Series([CLASSES[i] for i in predicted], index=names)
    return float((recorded.set_index("record")["predicted"].reindex(names) == mine).mean())


# --------------------------------------------------------------------------- statistics


def challenge_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(class_f1(confusion(labels, preds))[:3].mean())


def paired_bootstrap(labels: np.ndarray, terms: list[tuple[float, list[np.ndarray]]],
                     replicates: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high): the mean over seeds of sum_k coef_k x challenge F1(preds_k[s]),
    with a 95 % interval that resamples the records and the seeds, the same draws for
    every term (each term lists one prediction array per seed, in the same seed order)."""
    seeds = len(terms[0][1])
    if any(len(p) != seeds for _, p in terms):
        raise ValueError("every term needs one prediction array per seed, the same seeds")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(labels), (replicates, len(labels)))
    which = rng.integers(0, seeds, (replicates, seeds))
    per_seed = sum(c * np.stack([class_f1(confusion(labels[picks], p[picks]))[:, :3].mean(1) for p in preds])
                   for c, preds in terms)
    scores = per_seed[which, np.arange(replicates)[:, None]].mean(1)
    point = float(np.mean([sum(c * challenge_f1(labels, preds[s]) for c, preds in terms) for s in range(seeds)]))
    low, high = np.percentile(scores, [2.5, 97.5])
    return point, float(low), float(high)


def network_order(name: str) -> tuple:
    """Dense first, then by the compression in the name ('lr_rewind 8x' before '16x')."""
    ratio = re.search(r"(\d+(?:\.\d+)?)x\b", name)
    return (name != "dense", float(ratio[1]) if ratio else math.inf, name)


def tables(preds: pd.DataFrame, conditions: list[str], replicates: int) -> tuple[pd.DataFrame, list[str]]:
    """One row per (network, condition): F1, change from clean and ticket - dense change,
    with intervals; and the Markdown lines of the tables."""
    rows = []
    nets = sorted(dict.fromkeys(preds["network"]), key=network_order)
    pivot = {key: g.sort_values("record") for key, g in preds.groupby(["network", "seed", "condition"])}
    for name in nets:
        seeds = sorted(preds.loc[preds["network"] == name, "seed"].unique())
        dense_seeds = [s for s in seeds if ("dense", s, "clean") in pivot]
        for cond in conditions:
            p = lambda n, c, ss: [pivot[(n, s, c)]["predicted"].to_numpy() for s in ss]  # noqa: E731
            labels = pivot[(name, seeds[0], cond)]["label"].to_numpy()
            f1 = paired_bootstrap(labels, [(1.0, p(name, cond, seeds))], replicates)
            row = {"network": name, "seeds": ",".join(map(str, seeds)), "condition": cond,
                   "f1": f1[0], "f1_low": f1[1], "f1_high": f1[2]}
            if cond != "clean":
                d = paired_bootstrap(labels, [(1.0, p(name, cond, seeds)), (-1.0, p(name, "clean", seeds))], replicates)
                row.update(change=d[0], change_low=d[1], change_high=d[2])
                if name != "dense" and dense_seeds:
                    terms = [(1.0, p(name, cond, dense_seeds)), (-1.0, p(name, "clean", dense_seeds)),
                             (-1.0, p("dense", cond, dense_seeds)), (1.0, p("dense", "clean", dense_seeds))]
                    dd = paired_bootstrap(labels, terms, replicates)
                    row.update(vs_dense=dd[0], vs_dense_low=dd[1], vs_dense_high=dd[2], paired_seeds=len(dense_seeds))
            rows.append(row)
    table = pd.DataFrame(rows)
    def ci(r: pd.Series, k: str) -> str:
        return "" if k not in r or pd.isna(r[k]) else f"{r[k]:+.3f} ({r[k + '_low']:+.3f} to {r[k + '_high']:+.3f})"

    seeds_of = {n: table.loc[table["network"] == n, "seeds"].iloc[0] for n in nets}
    lines = ["Test challenge F1 under each condition (mean over the network's seeds; 95 % interval over test records "
             "and seeds):", "", "| condition | " + " | ".join(f"{n} (seeds {seeds_of[n]})" for n in nets) + " |",
             "| --- |" + " ---: |" * len(nets)]
    for cond in conditions:
        cells = [table[(table["network"] == n) & (table["condition"] == cond)].iloc[0] for n in nets]
        lines.append(f"| {cond} | " + " | ".join(f"{r['f1']:.3f} ({r['f1_low']:.3f}-{r['f1_high']:.3f})"
                                                 for r in cells) + " |")
    lines += ["", "Change from clean, F1(condition) - F1(clean), paired record by record and seed by seed:", "",
              "| condition | " + " | ".join(nets) + " |", "| --- |" + " ---: |" * len(nets)]
    for cond in conditions[1:] if conditions[0] == "clean" else conditions:
        cells = [table[(table["network"] == n) & (table["condition"] == cond)].iloc[0] for n in nets]
        lines.append(f"| {cond} | " + " | ".join(ci(r, "change") for r in cells) + " |")
    tickets = [n for n in nets if n != "dense"]
    lines += ["", "Does the ticket break first? Its change from clean less dense's change, "
              "[F1(ticket, c) - F1(ticket, clean)] - [F1(dense, c) - F1(dense, clean)], over the seeds both have "
              "(negative: the ticket loses more):", "",
              "| condition | " + " | ".join(tickets) + " |", "| --- |" + " ---: |" * len(tickets)]
    for cond in conditions[1:] if conditions[0] == "clean" else conditions:
        cells = [table[(table["network"] == n) & (table["condition"] == cond)].iloc[0] for n in tickets]
        lines.append(f"| {cond} | " + " | ".join(ci(r, "vs_dense") for r in cells) + " |")
    noisy = (preds.assign(noisy=preds["predicted"] == CLASSES.index("~"))
             .groupby(["network", "condition"])["noisy"].mean())
    lines += ["", "Share of records called noise ('~'; the challenge F1 averages N, A and O only, so a record "
              "called noise counts as missed), mean over seeds:", "",
              "| condition | " + " | ".join(nets) + " |", "| --- |" + " ---: |" * len(nets)]
    for cond in conditions:
        lines.append(f"| {cond} | " + " | ".join(f"{noisy[(n, cond)]:.0%}" for n in nets) + " |")
    return table, lines


def plot(table: pd.DataFrame, conditions: list[str], out: Path) -> None:
    """F1 per condition, one marker per network, with its interval."""
    nets = sorted(dict.fromkeys(table["network"]), key=network_order)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(nets)
    for k, name in enumerate(nets):
        part = table[table["network"] == name].set_index("condition").loc[conditions]
        x = np.arange(len(conditions)) - 0.4 + width * (k + 0.5)
        ax.errorbar(x, part["f1"], yerr=[part["f1"] - part["f1_low"], part["f1_high"] - part["f1"]], fmt="o",
                    ms=4, capsize=2, label=f"{name} (seeds {part['seeds'].iloc[0]})")
    ax.set_xticks(np.arange(len(conditions)), conditions, rotation=20)
    ax.set_ylabel("test challenge F1")
    ax.set_title("Input corruptions: dense networks and tickets (95 % interval: records and seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="the data set the networks were trained on")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions.csv, robustness.md and .png")
    p.add_argument("--exp", type=Path, help="experiment folder: every trained network of --seeds in it")
    p.add_argument("--seeds", default="", help="comma-separated seeds of --exp")
    p.add_argument("--net", action="append", default=[], metavar="NAME:SEED=PATH",
                   help="another network: a ticket .npz or a run folder, compared with dense of SEED")
    p.add_argument("--conditions", default=DEFAULT_CONDITIONS, help="comma-separated, from the list above")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates")
    p.add_argument("--batch-size", type=int, default=64,
                   help="records per forward pass (64, the grid's --eval-batch-size, repeats its predictions exactly)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the corruptions")
    p.add_argument("--tables-only", action="store_true",
                   help="re-make the tables and figure from OUT/predictions.csv, evaluating nothing")
    args = p.parse_args(argv)
    args.conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    bad = [c for c in args.conditions if not CONDITION.match(c)]
    if bad or not args.conditions:
        p.error(f"--conditions: unknown {bad or 'none given'}; "
                "use clean, wander-<mV>, emg-<uV RMS>, gain-<factor>, fs-<Hz>")
    for c in args.conditions:
        value = float(c.split("-", 1)[1]) if c != "clean" else 1.0
        if value <= 0 or (c.startswith("fs-") and not 50 <= value <= 5000):
            p.error(f"--conditions: {c} needs a positive value (fs: 50-5000 Hz)")
    if "clean" not in args.conditions:
        args.conditions.insert(0, "clean")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be integers, got {args.seeds!r}")
    if args.exp is not None and not (args.exp / "results.csv").is_file():
        p.error(f"--exp {args.exp}: no results.csv there")
    if args.exp is not None and not args.seeds:
        p.error("--exp needs --seeds")
    if args.tables_only:
        args.nets = []
        return args
    if args.data is None:
        p.error("--data is needed (unless --tables-only)")
    nets = discover(args.exp, args.seeds) if args.exp else []
    for spec in args.net:
        m = re.match(r"^(.+):(\d+)=(.+)$", spec)
        if not m or not Path(m[3]).exists():
            p.error(f"--net {spec!r}: expected NAME:SEED=PATH with an existing ticket .npz or run folder")
        nets.append((m[1], int(m[2]), Path(m[3])))
    if not any(n == "dense" for n, _, _ in nets):
        p.error("no dense network found: give --exp with restored dense weights (run_state.py restore) "
                "or --net dense:SEED=PATH")
    args.nets = nets
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    if args.tables_only:
        return write_tables(read_predictions(args.out / "predictions.csv"), args.conditions, args.out, args.replicates,
                            (args.out / "robustness.md").read_text().split("\n\nTest challenge F1 under")[0])
    for _, _, path in args.nets:  # before any work: F1 on records a network was trained on would be wrong
        et.check_made_with(path, args.data)
    try:
        ds = load_dataset(args.data)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    networks = [(name, seed, *load_network(path), path) for name, seed, path in args.nets]
    frames, checks = [], []
    for cond in args.conditions:
        part = corrupted_split(ds, args.split, cond, args.noise_seed)
        for name, seed, model, norm, path in networks:
            pred = predicted_classes(model, norm, part, args.batch_size)
            f1 = challenge_f1(part.labels, pred)
            print(f"{cond:>12}  {name} (seed {seed}): F1 {f1:.3f}  [{path}]", flush=True)
            if cond == "clean" and (path / tr.PREDICTIONS).is_file():
                checks.append(f"{name} seed {seed}: {recorded_agreement(path, args.split, part.names, pred):.1%}")
            frames.append(pd.DataFrame({"network": name, "seed": seed, "condition": cond, "record": part.names,
                                        "label": [CLASSES[i] for i in part.labels],
                                        "predicted": [CLASSES[i] for i in pred]}))
    preds = pd.concat(frames, ignore_index=True)
    wide = preds.assign(net=preds["network"] + " seed" + preds["seed"].astype(str)).pivot(
        index=["condition", "record", "label"], columns="net", values="predicted")
    atomic_write_text(wide[list(dict.fromkeys(preds["network"] + " seed" + preds["seed"].astype(str)))]
                      .reset_index().to_csv(index=False), args.out / "predictions.csv")
    command = "python robustness.py " + " ".join(f'"{a}"' if " " in a else a for a in (argv or sys.argv[1:]))
    head = "\n".join([f"# Robustness to input corruptions ({args.split} split, {len(part.labels)} records)", "",
                      f"Made by `{command}`; networks: "
                      + "; ".join(f"{n} seed {s}: `{p}`" for n, s, _, _, p in networks),
                      "", "Clean predictions equal to those the run recorded (its predictions.csv; 100 % when "
                      "the weights are the recorded ones): " + ("; ".join(checks) or "no run folder") + "."])
    return write_tables(preds, args.conditions, args.out, args.replicates, head)


def read_predictions(path: Path) -> pd.DataFrame:
    """The long table (network, seed, condition, record, label, predicted) of a predictions.csv
    this script wrote."""
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run without --tables-only first")
    wide = pd.read_csv(path, keep_default_na=False)
    long = wide.melt(id_vars=["condition", "record", "label"], var_name="net", value_name="predicted")
    parts = long["net"].str.extract(r"^(.*) seed(\d+)$")
    return long.assign(network=parts[0], seed=parts[1].astype(int)).drop(columns="net")


def write_tables(preds: pd.DataFrame, conditions: list[str], out: Path, replicates: int, head: str) -> pd.DataFrame:
    """robustness.md (``head``, then the tables), robustness.json and robustness.png."""
    conditions = [c for c in conditions if c in set(preds["condition"])]
    coded = preds.assign(label=preds["label"].map(CLASSES.index), predicted=preds["predicted"].map(CLASSES.index))
    table, lines = tables(coded, conditions, replicates)
    text = "\n".join([head, "", *lines, ""])
    atomic_write_text(text, out / "robustness.md")
    atomic_write_text(json.dumps(table.to_dict("records"), indent=1) + "\n", out / "robustness.json")
    plot(table, conditions, out / "robustness.png")
    print(text)
    return table


if __name__ == "__main__":
    main()
