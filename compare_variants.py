"""Compare variants of one grid level by level: one-shot against iterative pruning, and
where pruning cuts (global, layerwise, fan-in normalised, the output layer at half rate).

Each variant is one or more experiment folders of run_experiments.py (one-shot pruning has
one folder per level) that share the reference grid's dense networks (``--dense-from``),
seeds and test records, so every difference is paired: variant minus reference, seed by
seed and record by record (the two-level bootstrap of metrics.py). At each of
``--levels`` (a compression of the prunable weights, matched within 2 %) it reports, for
``--method``'s tickets:

  comparison.md  test challenge F1 (mean ± sd over seeds), the reference's over the
                 seeds both ran, variant - reference (95 % CI, per-seed range),
                 validation F1, and the AF class's sensitivity / PPV
  layers.png     the share of weights surviving in each layer, one panel per level, one
                 bar per variant (seed ``--layers-seed``): where each allocation cuts

Example (the issue "Why tickets win or fail here", after the configs' runs):
    python compare_variants.py --reference results/cinc2017-cpu --method weight_rewind \\
        --variant oneshot=results/cinc2017-cpu-oneshot-4x,results/cinc2017-cpu-oneshot-16x,\\
results/cinc2017-cpu-oneshot-64x,results/cinc2017-cpu-oneshot-142x \\
        --variant layerwise=results/cinc2017-cpu-scope-layerwise \\
        --variant fanin=results/cinc2017-cpu-scope-fanin --variant headhalf=results/cinc2017-cpu-scope-headhalf \\
        --levels 4,16,64,142 --out results/cinc2017-cpu-variants
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import plot_results as pr  # noqa: E402
from run_folders import atomic_write_text  # noqa: E402

MATCH = 0.02  # a level matches a row whose compression is within 2 % of it (log scale)


def variant_rows(exps: list[Path], method: str) -> pd.DataFrame:
    """The accepted pruned rounds of ``method`` (no control) in ``exps``, with ``folder``
    made a path that holds on its own (so rows of several experiments can be paired)."""
    parts = []
    for exp in exps:
        table = pr.load(exp)
        rows = table[(table["method"] == method) & (table["control"] == "none") & (table["round"] > 0)]
        parts.append(rows.assign(folder=[str(exp / f) for f in rows["folder"]]))
    rows = pd.concat(parts, ignore_index=True)
    if rows.empty:
        raise SystemExit(f"error: no finished {method} round in {', '.join(map(str, exps))}")
    return rows


def at_level(rows: pd.DataFrame, level: float) -> pd.DataFrame:
    """One row per seed at ``level`` (within 2 %); under --goal or with several matches,
    the seed's last such round."""
    near = rows[np.abs(np.log(rows["compression"]) - np.log(level)) < MATCH]
    return near.sort_values(["seed", "round"]).drop_duplicates("seed", keep="last")


def mean_sd(values: pd.Series) -> str:
    return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "") + f" (n={len(values)})"


def tables(reference: pd.DataFrame, variants: dict[str, pd.DataFrame], levels: list[float],
           seeds: int) -> list[str]:
    """The markdown of comparison.md: per level, every variant's test F1, the reference's
    over the seeds both ran (what the paired difference compares with), the paired
    difference, validation F1 and AF sensitivity / PPV."""
    here = Path(".")  # the rows' folders are already full paths
    lines = []
    for level in levels:
        ref = at_level(reference, level)
        lines += [f"### {level:g}x", "",
                  "| variant | compression (prunable; all) | test F1 | reference on the shared seeds | "
                  "test F1 - reference (95 % CI) | val F1 | AF sens. / PPV |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, rows in {"reference": reference, **variants}.items():
            mine = at_level(rows, level)
            if mine.empty:
                lines.append(f"| {name} | not reached | | | | | |")
                continue
            ratio = f"{mine['compression'].mean():.1f}x"
            if "compression_all" in mine and mine["compression_all"].notna().all():
                ratio += f"; {mine['compression_all'].mean():.1f}x"
            pair = None if name == "reference" else pr.paired(here, "test", mine, ref)
            diff = pr.paired_text(pair, seeds)
            # the reference row averages all its seeds; a variant is paired over the seeds both ran
            same_text = "" if pair is None else f"{pair['theirs']:.3f} (n={pair['seeds']})"
            af = (f"{mine['test_sensitivity_A'].mean():.2f} / {mine['test_ppv_A'].mean():.2f}"
                  if "test_sensitivity_A" in mine else "n/a")
            lines.append(f"| {name} | {ratio} | {mean_sd(mine['test_challenge_f1'])} | {same_text} | {diff} | "
                         f"{mine['val_challenge_f1'].mean():.3f} | {af} |")
        lines.append("")
    return lines


def plot_layers(reference: pd.DataFrame, variants: dict[str, pd.DataFrame], levels: list[float], seed: int,
                out: Path) -> None:
    """Surviving share per layer, one panel per level, one bar per variant (one seed)."""
    named = {"reference": reference, **variants}
    fig, axes = plt.subplots(len(levels), 1, figsize=(13, 3.2 * len(levels)), squeeze=False)
    for ax, level in zip(axes[:, 0], levels, strict=True):
        found = {}
        for name, rows in named.items():
            mine = at_level(rows[rows["seed"] == seed], level)
            path = Path(mine["folder"].iloc[0]) / "sparsity.csv" if len(mine) else None
            if path is not None and path.is_file():
                found[name] = pd.read_csv(path)
        width = 0.8 / max(len(found), 1)
        for i, (name, sparsity) in enumerate(found.items()):
            x = np.arange(len(sparsity))
            ax.bar(x + (i - (len(found) - 1) / 2) * width, 1 - sparsity["sparsity"], width, label=name)
            ax.set_xticks(x, sparsity["layer"], rotation=90, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("share remaining")
        ax.set_title(f"{level:g}x (seed {seed})" + ("" if found else ": no run at this level"), fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.25)
        if found:
            ax.legend(fontsize=7, ncol=len(found))
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=130)
    plt.close(fig)


def parse_variant(text: str) -> tuple[str, list[Path]]:
    name, sep, folders = text.partition("=")
    if not sep or not name or not folders:
        raise argparse.ArgumentTypeError(f"a variant is NAME=EXP[,EXP...], got {text!r}")
    return name, [Path(f) for f in folders.split(",") if f]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="the grid the variants are compared with")
    p.add_argument("--variant", action="append", type=parse_variant, required=True,
                   help="NAME=EXP[,EXP...]: experiments holding one variant (repeat the flag per variant)")
    p.add_argument("--method", default="weight_rewind", help="whose tickets are compared")
    p.add_argument("--levels", default="16,64,142", help="comma-separated compressions of the prunable weights")
    p.add_argument("--layers-seed", type=int, default=0, help="the seed whose masks layers.png draws")
    p.add_argument("--out", required=True, type=Path, help="folder for comparison.md and layers.png")
    args = p.parse_args(argv)
    try:
        levels = [float(x) for x in args.levels.split(",")]
    except ValueError:
        p.error(f"--levels must be comma-separated numbers, got {args.levels!r}")
    if not levels or min(levels) <= 1:
        p.error(f"--levels must be compressions above 1, got {args.levels!r}")
    names = [name for name, _ in args.variant]
    if len(set(names)) != len(names) or "reference" in names:
        p.error(f"variant names must be distinct and not 'reference', got {', '.join(names)}")
    reference = variant_rows([args.reference], args.method)
    variants = {name: variant_rows(exps, args.method) for name, exps in args.variant}
    seeds = reference["seed"].nunique()
    args.out.mkdir(parents=True, exist_ok=True)
    head = [f"# {args.method}: variants against {args.reference}", "",
            f"Test challenge F1 at each level; the difference is paired (same seeds, same test records; "
            f"95 % two-level bootstrap of records and seeds; 95 % t interval over the per-seed differences, "
            f"'t, k df' for k + 1 seeds; per-seed range). Reference: {args.reference}; "
            + "; ".join(f"{n}: {', '.join(map(str, e))}" for n, e in args.variant) + ".", ""]
    marked = {exp: m for exp in [args.reference, *(e for _, exps in args.variant for e in exps)]
              if (m := pr.exploratory(exp))}
    if marked:
        groups: dict[tuple, list[str]] = {}  # experiments with the same seeds and reason, named once
        for exp, m in marked.items():
            groups.setdefault((tuple(m["seeds"]), m["why"]), []).append(str(exp))
        head += ["**Exploratory** (results chosen after test figures were seen): "
                 + "; ".join(f"{', '.join(exps)}, seeds {', '.join(map(str, seeds))} ({why})"
                             for (seeds, why), exps in groups.items()) + ".", ""]
    text = "\n".join(head + tables(reference, variants, levels, seeds)) + "\n"
    atomic_write_text(text, args.out / "comparison.md")
    plot_layers(reference, variants, levels, args.layers_seed, args.out)
    print(text)
    print(f"wrote {args.out}/comparison.md, layers.png")


if __name__ == "__main__":
    main()
