"""Ratio or capacity? Tickets of several network widths side by side (issue 32 item 2).

At one width a ticket that fails at 142x cannot tell whether the ratio is too high or too few
weights are left. Across widths the two part: if the ticket leaves the band around dense at
the same number of surviving weights whatever the width, capacity sets the edge; if at the
same ratio, the ratio does. ``python plot_results.py --widths EXP,EXP,... --out DIR`` writes:

  widths.png/.svg  ticket - dense (test challenge F1, paired seed by seed) against the
                   compression ratio (left) and against the surviving weights (right), one
                   curve per method and width, shaded: the wider of the two 95 % intervals
                   (two-level bootstrap, t over seeds; see plot_results.wider); the legend
                   gives each curve's seed count; dotted: -tolerance x each width's dense F1
  widths.md        per method and width, where the ticket leaves the band (validation
                   F1, where tickets are chosen): the last level inside and the first outside
                   by the point rule (mean difference) and by the interval rule (the wider
                   interval's lower bound), in compression and in surviving weights, with the
                   range of the point-rule edge over single seeds; then the test differences

An experiment may be partial (some levels, one seed): it draws what it has, and says n.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import plot_results as pr  # noqa: E402
import ticket_bytes as tb  # noqa: E402
from run_folders import atomic_write_text  # noqa: E402
from train import BASELINES  # noqa: E402

STYLES = ["-", "--", ":", "-."]


def width_of(exp: Path, table: pd.DataFrame) -> float:
    """The network width of an experiment (its dense run's configuration)."""
    dense = pr.dense_rows(table)
    if dense.empty:
        raise SystemExit(f"error: {exp} has no finished dense run yet: nothing to compare")
    return tb.run_config(exp / dense["folder"].iloc[0]).width


def curve_points(exp: Path, table: pd.DataFrame, method: str, split: str) -> pd.DataFrame:
    """Per level of ``method`` (its own rounds, control none): ticket - dense on ``split``
    paired over the seeds both have, the wider interval and which, the seeds, the mean
    compression and surviving weights, and each seed's difference."""
    dense, rows = pr.dense_rows(table), []
    for lv in pr.levels_of(table, method):
        mine = pr.level_rows(table, method, lv)
        d = pr.paired(exp, split, mine, dense)
        if d is None:
            continue
        low, high, which = pr.wider(d)
        rows.append({"level": lv, "compression": mine["compression"].mean(), "remaining": mine["remaining"].mean(),
                     "diff": d["diff"], "low": low, "high": high, "which": which, "seeds": d["seeds"],
                     "per_seed": dict(zip(d["seed_list"], d["diffs"], strict=True))})
    return pd.DataFrame(rows)


def at(r: pd.Series | None) -> str:
    """A level as 'compression (surviving weights)', or 'none'."""
    return "none" if r is None else f"{r['compression']:.0f}x ({r['remaining']:,.0f})"


def largest_inside(points: pd.DataFrame, inside: pd.Series) -> str:
    """The most compressed level ``inside``, whatever lies below it: the winning ticket's rule
    (plot_results.winners). It differs from ``edge`` where the curve leaves the band and comes
    back (a dip at middle levels, as whole-record scores of full-width tickets show)."""
    ok = points[inside.to_numpy()]
    return at(None if ok.empty else ok.loc[ok["compression"].idxmax()])


def edge(points: pd.DataFrame, bar: float, inside: pd.Series) -> str:
    """'last inside (weights) / first outside (weights)' of a run of levels from the lowest,
    stopped at the first level not ``inside``."""
    last, first = None, None
    for i, ok in enumerate(inside):
        if not ok:
            first = points.iloc[i]
            break
        last = points.iloc[i]

    if first is None:
        return f"inside to {at(last)}, the last level run"
    return f"{at(last)} / {at(first)}"


def seed_edges(points: pd.DataFrame, bars: dict[int, float]) -> str:
    """The point-rule edge of each seed alone (the last level inside before that seed's first
    level outside), as a range over the seeds, in compression and surviving weights."""
    lasts = {}
    for seed, bar in bars.items():
        last = None
        for _, r in points.iterrows():
            if r["per_seed"].get(seed, -np.inf) <= bar:
                break
            last = r
        lasts[seed] = last
    inside = [r for r in lasts.values() if r is not None]
    if not inside:
        return f"none on any of {len(lasts)} seeds"
    comp, weights = [r["compression"] for r in inside], [r["remaining"] for r in inside]
    if min(comp) == max(comp):
        text = f"{min(comp):.0f}x ({min(weights):,.0f} weights)"
    else:
        text = f"{min(comp):.0f}x-{max(comp):.0f}x ({max(weights):,.0f}-{min(weights):,.0f} weights)"
    none = len(lasts) - len(inside)
    n = f"{len(lasts)} seed" + ("s" if len(lasts) != 1 else "")
    return (f"none on {none} of {len(lasts)} seeds, " if none else "") + text + f", {n}"


def width_rows(exps: list[Path], tolerance: float) -> list[dict]:
    """Every experiment's curves: per method, the test and validation points and the bars."""
    out = []
    for exp in exps:
        table = pr.load(exp)
        if pr.dense_rows(table).empty:
            print(f"note: {exp} has no finished dense run yet: left out")
            continue
        width = width_of(exp, table)
        dense, goal = pr.dense_rows(table), pr.goal_methods(pr.load_all(exp))
        for method in [m for m in pr.methods_in(table) if m not in BASELINES and m not in goal]:
            seeds = pr.run_seeds(table, method)
            if not seeds:
                continue
            own = dense[dense["seed"].isin(seeds)]
            out.append({"exp": exp, "width": width, "method": method, "seeds": len(seeds),
                        "test": curve_points(exp, table, method, "test"),
                        "val": curve_points(exp, table, method, "val"),
                        "test_bar": -tolerance * own["test_challenge_f1"].mean(),
                        "val_bar": -tolerance * own["val_challenge_f1"].mean(),
                        "seed_bars": dict(zip(own["seed"], -tolerance * own["val_challenge_f1"], strict=True)),
                        "prunable": float(table["prunable"].iloc[0])})
    return out


def y_range(curves: list[dict], pad: float = 0.3) -> tuple[float, float]:
    """The figure's y range: every curve's points, 0 and each width's -1 % bar, padded by ``pad``
    of their span. Not the bands: a t interval over 2 seeds (1 df, t = 12.7) can be ten times
    wider than the curves and would squash them into a line."""
    ys = [0.0] + [c["test_bar"] for c in curves] + [v for c in curves for v in c["test"]["diff"].dropna()]
    low, high = min(ys), max(ys)
    margin = pad * (high - low) if high > low else 0.05
    return low - margin, high + margin


def plot(curves: list[dict], out: Path) -> list[str]:
    """Draw widths.png/.svg; returns the legend's labels."""
    scored = "" if pr.score == "whole" else pr.WINDOWS_TITLE
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2), sharey=True)
    widths = sorted({c["width"] for c in curves})
    for ax, x, name in ((axes[0], "compression", "compression ratio (prunable weights / surviving weights)"),
                        (axes[1], "remaining", "surviving prunable weights (fewer to the right)")):
        for c in curves:
            pts = c["test"]
            if pts.empty:
                continue
            style = STYLES[widths.index(c["width"]) % len(STYLES)]
            color = pr.COLORS.get(c["method"])
            n = pts["seeds"].min() if pts["seeds"].min() == pts["seeds"].max() else \
                f"{pts['seeds'].min()}-{pts['seeds'].max()}"
            seeds = f"n={n} seed" + ("s" if n != 1 else "")
            ax.plot(pts[x], pts["diff"], style, marker="o", ms=3.5, color=color, lw=1.5,
                    label=f"{pr.LABELS.get(c['method'], c['method'])}, width {c['width']:g} ({seeds})")
            ok = pts["low"].notna()
            ax.fill_between(pts.loc[ok, x], pts.loc[ok, "low"], pts.loc[ok, "high"], color=color, alpha=0.1, lw=0)
        for w in widths:
            bar = np.mean([c["test_bar"] for c in curves if c["width"] == w])
            ax.axhline(bar, color="black", lw=0.8, ls=STYLES[widths.index(w) % len(STYLES)], alpha=0.6)
        ax.axhline(0, color="black", lw=1)
        ax.set_xscale("log")
        if x == "remaining":
            pts = pd.concat([c["test"] for c in curves if not c["test"].empty])
            pr.round_ticks(ax, pts["remaining"].min(), pts["remaining"].max())
            ax.invert_xaxis()
        else:
            ax.axvline(pr.LTH_ECG_RATIO, color="gold", lw=1, ls="-.")
            top = max(c["test"]["compression"].max() for c in curves if not c["test"].empty)
            ticks = [t for t in (2, 4, 8, 16, 32, 64, 142, 256, 512, 1024) if t <= max(top, 150)]
            ax.set_xticks(ticks, [f"{t}x" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(name)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylim(*y_range(curves))  # shared by both panels
    axes[0].set_ylabel("ticket - dense, test challenge F1 (paired by seed)")
    fig.suptitle(f"Ratio or capacity? Ticket - dense across network widths{scored}\n(shaded: the wider of the "
                 "bootstrap and t 95 % intervals, cut at the axes: widths.md has them whole; black lines: 0 and "
                 "-1 % of each width's dense F1, styled by width)",
                 fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) + 2) // 3), 1, 0.93))
    for ext in ("png", "svg"):
        fig.savefig(out / f"widths.{ext}", dpi=130)
    plt.close(fig)
    return labels


def table_md(curves: list[dict], tolerance: float) -> list[str]:
    lines = [f"Where each method's ticket leaves the band of {tolerance:.0%} around dense, on validation F1 (where "
             "tickets are chosen): 'last level inside (its surviving weights) / first level outside'; point rule: "
             "the mean difference over seeds against -tolerance x dense; interval rule: the lower bound of the "
             "wider of the bootstrap and t 95 % intervals against the same bar. The edge lies between the two "
             "levels (levels are a factor 2 apart); 'single seeds': the point-rule edge on each seed alone, its "
             "range over the seeds (its spread is the edge's uncertainty from training); 'largest inside': the "
             "most compressed level inside by the point rule whatever lies below it (the winning ticket of "
             "summary.md), which differs from the edge where a curve leaves the band and comes back.", "",
             "| method | width | prunable weights | seeds | point rule | interval rule | point rule, single seeds | "
             "largest inside, point rule |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for c in sorted(curves, key=lambda c: (c["method"], c["width"])):
        val = c["val"]
        if val.empty:
            lines.append(f"| {c['method']} | {c['width']:g} | {c['prunable']:,.0f} | {c['seeds']} | no level | | | |")
            continue
        point = edge(val, c["val_bar"], val["diff"] > c["val_bar"])
        interval = edge(val, c["val_bar"], val["low"].fillna(-np.inf) > c["val_bar"])
        lines.append(f"| {c['method']} | {c['width']:g} | {c['prunable']:,.0f} | {c['seeds']} | {point} | {interval} | "
                     f"{seed_edges(val, c['seed_bars'])} | {largest_inside(val, val['diff'] > c['val_bar'])} |")
    lines += ["", "Test challenge F1, ticket - dense at each level (the wider 95 % interval, n seeds):", "",
              "| method | width | compression | surviving weights | ticket - dense (wider 95 % CI, seeds) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for c in sorted(curves, key=lambda c: (c["method"], c["width"])):
        for _, r in c["test"].iterrows():
            ci = "" if np.isnan(r["low"]) else f" ({r['low']:+.3f} to {r['high']:+.3f}, {r['which']})"
            lines.append(f"| {c['method']} | {c['width']:g} | {r['compression']:.1f}x | {r['remaining']:,.0f} | "
                         f"{r['diff']:+.3f}{ci}, n = {r['seeds']} |")
    return lines


def main(exps: list[Path], out: Path, tolerance: float, score: str = "whole") -> str:
    """Write widths.png/.svg and widths.md for ``exps`` with every record scored ``score`` (a
    key of plot_results.SCORES); returns widths.md's text."""
    # plot_results' readers take the scoring from its module global. Run as a script, its
    # main() sets that global in __main__, another module object than the one imported here:
    # set it here too, or --score windows would silently draw whole-record scores.
    pr.score = score
    curves = width_rows(exps, tolerance)
    if not curves:
        raise SystemExit(f"error: no pruned rounds in {', '.join(map(str, exps))}")
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out)
    exps = list(dict.fromkeys(c["exp"] for c in curves))  # those with a dense run
    head = ["# Tickets across widths", "", "Experiments: " + "; ".join(
        f"{e} (width {width_of(e, pr.load(e)):g}{', ' + pr.partial(e) if pr.partial(e) else ''})" for e in exps)
        + f". `python plot_results.py --widths {','.join(map(str, exps))}"
        + ("" if score == "whole" else f" --score {score}") + f" --out {out}`", "",
        "![ticket - dense across widths](widths.png)", ""]
    if score == "windows":
        head += [f"{pr.WINDOWS_BANNER} as without --score.", ""]
    for e in exps:
        if marked := pr.exploratory(e):
            head += [f"**Exploratory**: {e}'s {pr.seeds_text(marked['seeds'])} ({marked['why']}) "
                     "enter every figure over more seeds than its pre-registered ones.", ""]
    text = "\n".join(head + table_md(curves, tolerance)) + "\n"
    atomic_write_text(text, out / "widths.md")
    return text
