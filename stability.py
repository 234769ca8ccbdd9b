"""Instability analysis (Frankle et al. 2020): is a network stable to SGD noise from step k?

From the weights at step k of a seed's dense training and a mask (the dense network's, or
that of a method's pruning round), train two copies for the steps [k, T) of the dense
schedule, each with its own data order and dropout, then evaluate the networks on the
straight line between them (``--points`` evenly spaced, BatchNorm statistics re-estimated at
each point on training batches, as the paper does) and report the error barrier: the
largest validation error on the path minus the mean of the two ends' errors (and the same
for challenge F1, as the drop below the ends' mean). A barrier near 0 means the two copies
land in one linearly connected region: the network is stable from step k, and rewinding to
k is expected to work (Frankle et al.: sparse networks match dense accuracy exactly when
they are stable from their rewind point).

It reads an experiment made by run_experiments.py: the seed's dense run (its flags, data,
init.pt) and the masks of the rounds named (``mask.pt`` files are checkpoints, not kept in
git: run it where the grid ran). The weights at step k are made by replaying the dense
training for k steps from init.pt (every step is seeded, so they equal the dense run's).
Everything resumes: each copy is a train.py run folder, and a finished (mask, k) is read
back from its ``path.csv`` and ``path_predictions.csv``.

Writes EXP/stability/seed<S>/: ``<mask>_k<k>/path.csv`` per pair (alpha, validation error,
challenge F1) and ``path_predictions.csv`` (each validation record's class at each point,
which the barrier's 95 % bootstrap interval over the records resamples: see
``barrier_interval``), ``stability.csv``
(one row per mask and k, of this run and the earlier ones: compression, barriers and the
error barrier's interval, the ends' own metrics and the two copies' test F1 and AF
sensitivity / PPV) and ``stability.png``
(as the summary's, for this seed); and, over every seed run so far, EXP/stability/
``stability.md`` (mean barrier and each seed's, per mask and k) and ``stability.png`` (barrier
and the copies' test F1 against k).

Example (CPU scale, after the grid):
    python stability.py --exp results/cinc2017-cpu --seed 0 \\
        --masks dense,weight_rewind/round_02,weight_rewind/round_04,weight_rewind/round_06 \\
        --rewind-to 0,100it,1ep,2ep
    python stability.py --exp results/cinc2017-cpu --seed 0 --masks random:weight_rewind/round_04 --rewind-to 0
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import batching  # noqa: E402
import prune as pm  # noqa: E402
import run_folders as rf  # noqa: E402
import train as tr  # noqa: E402
from build_datasets import DatasetError, load_dataset  # noqa: E402
from metrics import af_scores  # noqa: E402

RANDOM = "random:"
"""--masks prefix of the random-pruning control (``masks_from``)."""
PREDICTED = "path_predictions.csv"
"""Per pair: every validation record's predicted class at each point of the path."""


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    """(1 - alpha) a + alpha b for floating-point tensors; the others (counters) from a."""
    return {k: torch.lerp(a[k], b[k], alpha) if a[k].is_floating_point() else a[k] for k in a}


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, ctx: tr.Context, batches: int, seed: int) -> None:
    """Running BatchNorm statistics recomputed as the plain mean over ``batches`` training
    batches (as training makes them: cropped, bf16 if training used it)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    rng = np.random.default_rng([seed, 7])
    order = batching.length_buckets(ctx.ds.lengths, ctx.ds.indices("train"), ctx.cfg.batch_size, rng)
    for idx in order[:batches]:
        x, _, _ = ctx.batcher(idx, ctx.cfg.crop, rng)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            model(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()


def evaluate_point(ctx: tr.Context, state: dict, bn_batches: int) -> dict:
    """Validation error, challenge F1 and per-record predicted classes (``predicted``, in
    the split's order) of the network ``state`` with BatchNorm re-estimated."""
    model = ctx.new_model(0)
    model.load_state_dict(state)
    reestimate_batchnorm(model, ctx, bn_batches, ctx.cfg.seed)
    val = tr.evaluate(model, ctx.batcher, ctx.ds, "val", ctx.cfg, ctx.bf16)
    return {"val_error": 1 - val["accuracy"], "val_challenge_f1": val["challenge_f1"],
            "predicted": np.asarray(val["predicted"])}


def linear_path(ctx: tr.Context, a: dict, b: dict, points: int,
                bn_batches: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The networks on the line from ``a`` (alpha 0) to ``b`` (alpha 1), evaluated: the path
    (alpha, validation error, challenge F1) and the validation records' predicted class at
    every point (record, label, one column per alpha), which the barrier's interval
    resamples."""
    points_ = [(float(alpha), evaluate_point(ctx, interpolate(a, b, float(alpha)), bn_batches))
               for alpha in np.linspace(0, 1, points)]
    path = pd.DataFrame([{"alpha": alpha, "val_error": e["val_error"], "val_challenge_f1": e["val_challenge_f1"]}
                         for alpha, e in points_])
    idx = ctx.ds.indices("val")
    predicted = pd.DataFrame({"record": np.asarray(ctx.ds.names)[idx], "label": ctx.ds.labels[idx],
                              **{f"{alpha:.4f}": e["predicted"] for alpha, e in points_}})
    return path, predicted


def barriers(path: pd.DataFrame) -> dict:
    """Error barrier (max error on the path - mean of the ends) and F1 barrier (mean of the
    ends - min F1 on the path); both 0 for a path between identical networks."""
    ends = path.iloc[[0, -1]]
    return {"error_barrier": float(path["val_error"].max() - ends["val_error"].mean()),
            "f1_barrier": float(ends["val_challenge_f1"].mean() - path["val_challenge_f1"].min())}


def barrier_interval(predicted: pd.DataFrame, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval, over the validation records (the networks fixed),
    of the barrier's excess at the path's worst point: the error at alpha* (the observed
    argmax, held fixed) minus the mean of the ends' errors, which is the error barrier.

    It is a mean of per-record differences, so its interval behaves and can include 0: it
    says whether the bump on the path is more than the record sample alone would make.
    Bootstrapping the max itself would not do: the max over the points includes the ends,
    so it never falls below half their gap, and a max of noisy errors is biased upward.
    Holding alpha* fixed ignores that it was picked as the worst of the points, so the
    interval leans a little high. It covers the records only; SGD's noise (and the mask's
    and initialisation's) is in the spread between seeds. ``predicted`` is linear_path's
    second table."""
    points = sorted((c for c in predicted.columns if c not in ("record", "label")), key=float)
    wrong = (predicted[points].to_numpy() != predicted["label"].to_numpy()[:, None]).astype(float)
    worst = int(np.argmax(wrong.mean(axis=0)))
    excess = wrong[:, worst] - wrong[:, [0, -1]].mean(axis=1)  # per record; its mean is the barrier
    rng = np.random.default_rng(seed)
    means = excess[rng.integers(0, len(excess), size=(draws, len(excess)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def weights_at(ctx: tr.Context, seed_dir: Path, k: int, work: Path) -> dict:
    """The dense run's weights after k steps: init.pt, its saved rewind point, or a replay of
    its first k steps (the same seeded batches and dropout, so the same weights)."""
    dense = seed_dir / tr.DENSE
    if k == 0:
        return ctx.load(dense / tr.INIT)
    if (dense / tr.rewind_file(k)).is_file():
        return ctx.load(dense / tr.rewind_file(k))
    run = work / f"dense_to_{k}"
    if not (run / tr.FINAL).is_file():
        model = ctx.new_model(ctx.cfg.seed)
        model.load_state_dict(ctx.load(dense / tr.INIT))
        run.mkdir(parents=True, exist_ok=True)
        tr.train(model, ctx.ds, ctx.cfg, run, ctx.device, ctx.bf16, ctx.checkpoint_minutes, quiet=True,
                 total_steps=k, batcher=ctx.batcher)
        rf.atomic_save(model.state_dict(), run / tr.FINAL)
        (run / tr.CHECKPOINT).unlink(missing_ok=True)
    return ctx.load(run / tr.FINAL)


def train_copy(ctx: tr.Context, start: dict, masks: pm.Masks, k: int, run: Path) -> dict:
    """One copy: ``start`` under ``masks``, trained for the steps [k, T) like a pruning round
    (train.retrain: its own data order and dropout, from its folder's name)."""
    if not (run / tr.METRICS).is_file():
        run.mkdir(parents=True, exist_ok=True)
        tr.retrain(ctx, run, start, masks, lambda i: tr.lr_at(ctx.cfg, k + i, ctx.steps_per_epoch),
                   ctx.total_steps - k, {"stability_k": k})
    return ctx.load(run / tr.FINAL)


def masks_from(ctx: tr.Context, seed_dir: Path, source: str, seed: int) -> pm.Masks:
    """The masks ``--masks`` names: 'dense' (nothing pruned), a round folder of the seed
    (its IMP mask), or 'random:<round folder>', the random-pruning control: a random mask
    with that round's number of survivors in every layer, the same for every k and run of
    this seed (seeded by the seed and the folder's name). Its pairs tell whether a ticket
    is stable from k = 0 because it is sparse or because of the weights IMP kept."""
    random = source.startswith(RANDOM)
    folder = source.removeprefix(RANDOM)
    if folder == tr.DENSE and not random:
        return pm.full_masks(ctx.new_model(0))
    path = seed_dir / folder / tr.MASK
    if not path.is_file():
        raise FileNotFoundError(f"no mask at {path} (masks are checkpoints, not kept in git: run the grid "
                                "here, or restore them with run_state.py restore)")
    masks = ctx.load(path)
    return pm.random_masks_like(masks, zlib.crc32(f"{seed}/stability/{source}".encode())) if random else masks


def copies_scores(pair: Path) -> dict:
    """The two copies' own scores, averaged: each copy is the network a rewind to k under this
    mask would give (one retraining), so its test F1 sits next to the barrier."""
    metrics = [json.loads((pair / f"copy{c}" / tr.METRICS).read_text()) for c in (1, 2)]
    af = [af_scores(m["test"]["confusion"]) for m in metrics]
    return {"copies_val_f1": float(np.mean([m["val"]["challenge_f1"] for m in metrics])),
            "copies_test_f1": float(np.mean([m["test"]["challenge_f1"] for m in metrics])),
            "copies_test_sensitivity_A": float(np.mean([a[0] for a in af])),
            "copies_test_ppv_A": float(np.mean([a[1] for a in af]))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment folder of run_experiments.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", default="dense",
                   help="comma-separated: 'dense', round folders of the seed (e.g. weight_rewind/round_04), or "
                        "'random:<round folder>' (a random mask with that round's per-layer survivors)")
    p.add_argument("--rewind-to", default="0,1ep", help="comma-separated rewind points k ('0', '100it', '1ep')")
    p.add_argument("--points", type=int, default=11, help="networks evaluated on the path (>= 3)")
    p.add_argument("--bn-batches", type=int, default=30, help="training batches to re-estimate BatchNorm")
    args = p.parse_args(argv)
    if args.points < 3 or args.bn_batches < 1:
        p.error("--points must be >= 3 and --bn-batches >= 1")
    seed_dir = Path(args.exp) / f"seed{args.seed}"
    targs = tr.dense_args(seed_dir)
    try:
        ds = load_dataset(targs.data)
    except DatasetError as e:
        sys.exit(f"error: {e}")
    ctx = tr.Context.make(ds, targs)
    try:
        ks = {text: tr.parse_rewind(text, ctx.steps_per_epoch) for text in args.rewind_to.split(",")}
    except ValueError as e:
        p.error(str(e))
    if any(not 0 <= k < ctx.total_steps for k in ks.values()):
        p.error(f"every --rewind-to must lie in [0, {ctx.total_steps}) steps")
    work = Path(args.exp) / "stability" / f"seed{args.seed}"
    rows = []
    for source in [m.strip() for m in args.masks.split(",") if m.strip()]:
        try:
            masks = masks_from(ctx, seed_dir, source, args.seed)
        except FileNotFoundError as e:
            sys.exit(f"error: --masks {source}: {e}")
        name = source.replace("/", "_").replace(":", "_")
        for text, k in ks.items():
            pair = work / f"{name}_k{k}"
            if (pair / "path.csv").is_file() and (pair / PREDICTED).is_file():
                path, predicted = pd.read_csv(pair / "path.csv"), pd.read_csv(pair / PREDICTED)
            else:  # a path made before the predictions were kept is evaluated again from its copies
                trained = all((pair / f"copy{c}" / tr.METRICS).is_file() for c in (1, 2))
                start = {} if trained else weights_at(ctx, seed_dir, k, work)
                a, b = (train_copy(ctx, start, masks, k, pair / f"copy{c}") for c in (1, 2))
                path, predicted = linear_path(ctx, a, b, args.points, args.bn_batches)
                rf.atomic_write_text(predicted.to_csv(index=False), pair / PREDICTED)
                rf.atomic_write_text(path.to_csv(index=False, float_format="%.6g"), pair / "path.csv")
            low, high = barrier_interval(predicted)
            rows.append({"seed": args.seed, "masks": source, "compression": pm.compression_ratio(masks),
                         "k": k, "rewind_to": text, **barriers(path),
                         "error_barrier_low": low, "error_barrier_high": high,
                         "end_errors": f"{path['val_error'].iloc[0]:.4f}/{path['val_error'].iloc[-1]:.4f}",
                         **copies_scores(pair)})
            print(f"{source} k={text} ({k} steps): error barrier {rows[-1]['error_barrier']:+.4f}, "
                  f"F1 barrier {rows[-1]['f1_barrier']:+.4f}", flush=True)
    table = pd.DataFrame(rows)
    if (work / "stability.csv").is_file():  # pairs of earlier runs (other masks or k) are kept
        old = pd.read_csv(work / "stability.csv")
        kept = ~old.set_index(["masks", "k"]).index.isin(table.set_index(["masks", "k"]).index)
        table = pd.concat([old[kept], table], ignore_index=True)
    rf.atomic_write_text(table.to_csv(index=False, float_format="%.6g"), work / "stability.csv")
    plot_summary(table, work / "stability.png")
    print(f"wrote {work / 'stability.csv'} and stability.png")
    summarise(work.parent)


def summarise(root: Path) -> pd.DataFrame:
    """Every seed's stability.csv under ``root`` (EXP/stability) in one table: per mask and
    k, the barrier's mean and each seed's value, and the copies' test F1 and AF scores.
    Written to root/stability.md and drawn in root/stability.png; the run of the last seed
    to finish leaves them complete."""
    tables = [pd.read_csv(f) for f in sorted(root.glob("seed*/stability.csv"))]
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True).sort_values("seed", kind="stable")
    if "error_barrier_low" not in table:  # tables written before the interval was kept
        table["error_barrier_low"] = table["error_barrier_high"] = np.nan
    table["seed_barrier"] = [f"s{s} {b:+.3f}" + ("" if pd.isna(lo) else f" ({lo:+.3f} to {hi:+.3f})")
                             for s, b, lo, hi in table[["seed", "error_barrier", "error_barrier_low",
                                                        "error_barrier_high"]].itertuples(index=False)]
    cols = ["error_barrier", "f1_barrier", "copies_test_f1", "copies_test_sensitivity_A", "copies_test_ppv_A"]
    cols = [c for c in cols if c in table]  # tables written before the copies' scores were kept
    summary = (table.groupby(["masks", "k"], sort=False)  # k in steps: '1ep' and '214it' are one point
               .agg(rewind_to=("rewind_to", lambda v: "/".join(dict.fromkeys(map(str, v)))),
                    compression=("compression", "mean"), seeds=("seed", "nunique"),
                    **{c: (c, "mean") for c in cols}, barrier_per_seed=("seed_barrier", " / ".join))
               .reset_index())
    order = {m: i for i, m in enumerate(masks_by_compression(table))}
    summary = summary.sort_values(["masks", "k"], key=lambda c: c.map(order) if c.name == "masks" else c,
                                  ignore_index=True)
    lines = ["# Instability analysis (Frankle et al. 2020)", "",
             f"Seeds: {', '.join(str(s) for s in sorted(table['seed'].unique()))}. Error barrier: the largest "
             "validation error on the straight line between two copies trained from step k under the mask, "
             "minus the mean of the ends' errors (Frankle et al. call a network stable below 0.02); per seed "
             "with a 95 % bootstrap interval over the validation records (the networks fixed) of the excess "
             "at the path's worst point: whether the bump is more than the record sample alone would make; "
             "SGD's noise is in the spread between seeds, whose intervals share the same records. "
             "Copies' test F1 and AF sensitivity / PPV: the two copies' own scores (each is the network a "
             "rewind to k with this mask gives), mean over copies and seeds.", "",
             "| mask | compression | k | steps | seeds | error barrier (mean) | per seed (95 % CI) "
             "| F1 drop on the path | copies' test F1 | AF sens / PPV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        f1 = f"{r['copies_test_f1']:.3f}" if pd.notna(r.get("copies_test_f1")) else "n/a"
        af = (f"{r['copies_test_sensitivity_A']:.2f} / {r['copies_test_ppv_A']:.2f}"
              if pd.notna(r.get("copies_test_sensitivity_A")) else "n/a")
        lines.append(f"| {r['masks']} | {r['compression']:.1f}x | {r['rewind_to']} | {r['k']} | {r['seeds']} "
                     f"| {r['error_barrier']:+.3f} | {r['barrier_per_seed']} | {r['f1_barrier']:+.3f} | {f1} | {af} |")
    rf.atomic_write_text("\n".join(lines) + "\n", root / "stability.md")
    plot_summary(table, root / "stability.png")
    return summary


def masks_by_compression(table: pd.DataFrame) -> list[str]:
    """The table's masks from the densest to the sparsest (ties in order of appearance), so
    rows and colours read along the pruning curve whatever order the runs came in."""
    mean = table.groupby("masks", sort=False)["compression"].mean()
    return list(mean.sort_values(kind="stable").index)


def plot_summary(table: pd.DataFrame, out: Path) -> None:
    """Left: error barrier against k per mask (mean line, one dot per seed with its interval
    over the validation records); right: the copies' test F1 against k, the ticket a rewind
    to k gives."""
    panels = [("error_barrier", "error barrier on the linear path (validation)")]
    if "copies_test_f1" in table:
        panels.append(("copies_test_f1", "copies' test challenge F1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels, strict=True):
        for i, source in enumerate(masks_by_compression(table)):
            t, colour = table[table["masks"] == source], f"C{i}"
            mean = t.groupby("k")[col].mean()
            ax.plot(mean.index, mean.values, marker="o", color=colour, ls="--" if source.startswith(RANDOM) else "-",
                    label=f"{source} ({t['compression'].mean():.0f}x)")
            ax.scatter(t["k"], t[col], s=10, color=colour, alpha=0.5)
            if col == "error_barrier" and "error_barrier_low" in t:  # each seed's interval over records
                ax.vlines(t["k"], t["error_barrier_low"], t["error_barrier_high"], color=colour, alpha=0.4, lw=0.8)
        if col == "error_barrier":
            ax.axhline(0, color="black", lw=0.8)
            ax.axhline(0.02, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("rewind point k (steps of the dense schedule)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    seeds = ", ".join(str(s) for s in sorted(table["seed"].unique()))
    fig.suptitle(f"Instability analysis (Frankle et al. 2020), seeds {seeds}: lines are means, dots seeds; "
                 "grey dashed: 0.02; dashed lines: random masks", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150)
    plt.close(fig)
    rf.atomic_write(out, png.getvalue())  # two seeds' runs may finish together


if __name__ == "__main__":
    main()
