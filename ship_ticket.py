"""Ship a real-data ticket: choose it on validation, re-make its weights from what git
carries, export it compactly and write its report, so that ``python predict.py RECORD``
classifies a real record without training.

Why a script: checkpoints are not in git, so the winning ticket of a grid has to be
re-made on the machine that ships it, and the choice must not be made by hand (or, worse,
by looking at test figures). The steps, each resumable:

  1. choose  the method and level by the interval rule (plot_results.interval_winner: the
             largest compression up to which the lower bound of the wider paired 95 % interval of
             validation F1(ticket) - F1(dense) stays above -tolerance x dense, over every
             seed of the grid, from the committed predictions.csv); across methods the
             largest such level. Then the seed: among those whose chain run_state.py
             carries (a ``state.npz`` of the method and of the dense run), the one with the
             highest validation challenge F1 at that level.
  2. retrain run_state.py restore writes the seed's init, dense weights and masks back as
             .pt files; the ticket is trained again as train.py's round did (weight_rewind
             and late_reset: one training of that round's mask; lr_rewind and finetune:
             every round up to it, each from the last). Training is not bit-identical
             across CPUs, so the new network is measured anew; its recorded figures are
             reported beside it.
  3. export  export_ticket.py writes the compact ticket (fp32: exact) and its bytes,
             FLOPs and latency at one thread.
  4. report  OUT/README.md: the choice and why, test challenge F1 and AF sensitivity / PPV
             with 95 % intervals over the test records (percentile bootstrap), bytes,
             FLOPs, latency with the host's CPU flags, the data fingerprint and the command.
  5. AF operating point  the exported ticket evaluated on the validation and test records
             of its data (checked against the fingerprint it records), its class
             probabilities in OUT/predictions.csv; the lowest threshold on P(AF) whose
             validation PPV reaches --af-ppv (operating_point.shipped_threshold) is stored in
             the ticket's metadata (its weights untouched), in report.json/.md and README.md,
             with the test AF sensitivity and PPV at it; predict.py flags AF with it.
             ``--operating-point`` does this step alone, for a ticket already shipped.

Example (the shipped ticket, results/ticket-cinc2017/; one training, 14 min on a busy core):
    python ship_ticket.py --exp results/cinc2017-cpu --out results/ticket-cinc2017
Only step 5, for the shipped ticket (seconds: an evaluation, no training):
    python ship_ticket.py --exp results/cinc2017-cpu --out results/ticket-cinc2017 --operating-point
Another level's network, for evaluation only (robustness.py):
    python ship_ticket.py --exp results/cinc2017-cpu --out results/robustness-cinc2017 --remake 3:weight_rewind:6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import batching
import export_ticket
import metrics
import operating_point
import plot_results as pr
import prune as pm
import run_folders as rf
import run_state
import train as tr
from build_datasets import DatasetError, load_dataset
from model import CLASSES

TICKET = "ticket-fp32.npz"
RETRAINED = "retrained"
"""OUT/retrained/seedS/<method>/round_NN: the re-made ticket's run folder (its text files are
kept; its model.pt, like every checkpoint, is not in git)."""


# --------------------------------------------------------------------------- 1. choose


def choose(exp: Path, tolerance: float) -> dict:
    """The ticket to ship (see the module docstring) and the figures the choice read."""
    table = pr.load(exp)
    methods = {}
    for m in [m for m in pr.methods_in(table) if m not in pr.BASELINES]:
        lv, d, bar = pr.interval_winner(exp, table, m, tolerance)
        if d is not None:  # the interval the rule reads: the wider of the bootstrap and the t interval
            low, high, kind = pr.wider(d)
            d = {"diff": d["diff"], "low": low, "high": high, "interval": kind, "seeds": d["seeds"]}
        methods[m] = {"level": lv, "bar": bar, "val_diff": d,
                      "compression": None if lv is None else pr.ratio_text(table, lv)}
    passed = {m: v for m, v in methods.items() if v["level"] is not None}
    if not passed:
        raise SystemExit(f"error: no method of {exp} has a level within {tolerance:.0%} of dense by the interval "
                         "rule: there is no ticket to ship")
    method = max(passed, key=lambda m: (passed[m]["level"], passed[m]["val_diff"]["diff"]))
    rows = pr.level_rows(table, method, passed[method]["level"])
    carried = [s for s in rows["seed"] if (exp / f"seed{s}" / method / run_state.STATE).is_file()
               and run_state.state_file(exp / f"seed{s}" / tr.DENSE).is_file()]
    if not carried:
        raise SystemExit(f"error: no seed of {method} at {rows['compression'].mean():.1f}x has its chain in a "
                         f"{run_state.STATE} (run_state.py save --masks): its weights cannot be re-made here")
    best = rows[rows["seed"].isin(carried)].sort_values(["val_challenge_f1", "seed"], ascending=[False, True]).iloc[0]
    return {"exp": str(exp), "tolerance": tolerance, "method": method, "seed": int(best["seed"]),
            "round": int(best["round"]), "compression": float(best["compression"]), "folder": best["folder"],
            "recorded": {k: float(best[k]) for k in ("val_challenge_f1", "test_challenge_f1")},
            "carried_seeds": {int(s): float(v) for s, v in zip(rows["seed"], rows["val_challenge_f1"], strict=True)
                              if s in carried},
            "methods": {m: {"level": v["level"], "compression": v["compression"], "bar": v["bar"],
                            "val_diff": v["val_diff"]}
                        for m, v in methods.items()}}


# --------------------------------------------------------------------------- 2. retrain


def retrain(choice: dict, out: Path) -> Path:
    """Re-make the chosen ticket's weights; returns its run folder (skips finished rounds)."""
    exp, seed, method, last = Path(choice["exp"]), choice["seed"], choice["method"], choice["round"]
    seed_dir = exp / f"seed{seed}"
    for folder in (seed_dir / tr.DENSE, seed_dir / method):
        for path in run_state.restore(folder):
            print(f"restored {path}")
    args = tr.dense_args(seed_dir)
    data = Path(args.data)
    flags = json.loads((seed_dir / method / rf.CONFIG).read_text())
    try:
        ds = load_dataset(data)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from e
    work = out / RETRAINED / f"seed{seed}" / method
    if rf.prepare_run(work, flags["flags"], data)["data_fingerprint"] != flags["data_fingerprint"]:
        raise SystemExit(f"error: {data} is not the data {seed_dir / method} was trained on "
                         f"(fingerprint {flags['data_fingerprint']}): rebuild it with build_datasets.py")
    ctx = tr.Context.make(ds, args)
    k = tr.parse_rewind(flags["flags"]["rewind_to"], ctx.steps_per_epoch)
    start_step = tr.replay_start(method, k)
    final_lr = ctx.cfg.lr * ctx.cfg.gamma ** len(ctx.cfg.milestones)
    lr_fn = ((lambda i: final_lr) if method == "finetune"  # as train.run_lottery
             else (lambda i: tr.lr_at(ctx.cfg, start_step + i, ctx.steps_per_epoch)))
    fixed_start = {"weight_rewind": seed_dir / tr.DENSE / tr.INIT,
                   "late_reset": seed_dir / tr.DENSE / tr.rewind_file(k)}.get(method)
    trained = seed_dir / tr.DENSE / tr.FINAL
    for r in ([last] if fixed_start else range(1, last + 1)):  # a rewinding method needs one round only
        run_dir = work / f"round_{r:02d}"  # the same name, so the same per-step seeds (train.retrain's salt)
        if not (run_dir / tr.METRICS).is_file():
            masks = ctx.load(seed_dir / method / f"round_{r:02d}" / tr.MASK)
            print(f"training {run_dir} ({pm.compression_ratio(masks):.1f}x) from {fixed_start or trained}",
                  flush=True)
            tr.retrain(ctx, run_dir, ctx.load(fixed_start or trained), masks, lr_fn,
                       ctx.total_steps - start_step, {"round": r, "remade_from": str(seed_dir / method)})
            rf.atomic_save(masks, run_dir / tr.MASK)
        trained = run_dir / tr.FINAL
    return work / f"round_{last:02d}"


# --------------------------------------------------------------------------- 4. report


def af_interval(labels: np.ndarray, preds: np.ndarray, replicates: int = 1000, seed: int = 0
                ) -> dict[str, tuple[float, float, float]]:
    """AF sensitivity and PPV with 95 % percentile-bootstrap intervals over the records."""
    af = CLASSES.index("A")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(labels), (replicates, len(labels)))
    hit = (labels == af) & (preds == af)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = hit[picks].sum(1) / (labels[picks] == af).sum(1)
        ppv = hit[picks].sum(1) / (preds[picks] == af).sum(1)
    out = {}
    for name, point, boot in (("sensitivity", hit.sum() / (labels == af).sum(), sens),
                              ("ppv", hit.sum() / max((preds == af).sum(), 1), ppv)):
        low, high = np.nanpercentile(boot, [2.5, 97.5])
        out[name] = (float(point), float(low), float(high))
    return out


def test_figures(run_dir: Path) -> dict:
    """Challenge F1 (validation and test) and test AF sensitivity / PPV of a run, with 95 %
    intervals over the records, from its predictions.csv."""
    preds = pd.read_csv(run_dir / tr.PREDICTIONS, keep_default_na=False)
    figures = {}
    for split in ("val", "test"):
        part = preds[preds["split"] == split].sort_values("record")
        labels = part["label"].map(CLASSES.index).to_numpy()
        predicted = part["predicted"].map(CLASSES.index).to_numpy()
        point = float(metrics.class_f1(metrics.confusion(labels, predicted))[:3].mean())
        figures[f"{split}_challenge_f1"] = (point, *pr.bootstrap(labels, [predicted]))
        figures[f"{split}_records"] = len(part)
        if split == "test":
            figures.update({f"test_af_{k}": v for k, v in af_interval(labels, predicted).items()})
    return figures


def cpu_flags() -> str:
    """The host's CPU features that decide CPU speed here (as the brief's lscpu line)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown (no lscpu)"
    found = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))
    model = re.search(r"Model name:\s*(.+)", text)
    return f"{', '.join(found) or 'none of avx2/avx512_bf16/amx_bf16'} ({model.group(1).strip() if model else '?'})"


def report(choice: dict, run_dir: Path, out: Path, export: dict, command: str) -> str:
    fig = test_figures(run_dir)
    config = json.loads((run_dir.parent / rf.CONFIG).read_text())
    flags = config["flags"]
    c, b = export["counts"], export["bytes"]
    ci = lambda v: f"{v[0]:.3f} ({v[1]:.3f} to {v[2]:.3f})"  # noqa: E731
    ticket = out / TICKET
    m = choice["methods"][choice["method"]]["val_diff"]
    lines = [
        "# The shipped CinC 2017 ticket", "",
        f"`{TICKET}` ({ticket.stat().st_size:,} bytes): the network `python predict.py RECORD` uses when "
        "no `--ticket` is given. Made " f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC by", "",
        f"    {command}", "",
        "## Which ticket, and why", "",
        f"- Grid: `{choice['exp']}` (width {flags['width']:g}, {flags['epochs']} epochs, "
        f"{flags['prune_fraction']:.0%} per round). The interval rule on **validation** "
        f"(tolerance {choice['tolerance']:.0%} of dense; the wider of the paired 95 % bootstrap over records "
        "and seeds and the t interval over seeds, from the committed predictions.csv; "
        "plot_results.interval_winner), per method:",
        *[f"  - {meth}: " + ("no level" if v["level"] is None else
                              f"{v['compression']} (val F1 - dense {v['val_diff']['diff']:+.3f}, "
                              f"{v['val_diff']['low']:+.3f} to {v['val_diff']['high']:+.3f}, "
                              f"{v['val_diff']['interval']} interval, {v['val_diff']['seeds']} seeds)")
          + f"; bar {v['bar']:+.4f}"
          for meth, v in choice["methods"].items()],
        f"- The largest level over the methods: **{choice['method']} at {choice['compression']:.1f}x** "
        f"(round {choice['round']}; val F1 - dense {m['diff']:+.3f}, {m['low']:+.3f} to {m['high']:+.3f}).",
        "- Seed: only seeds whose chain `run_state.py` carries in git (`state.npz`) can be re-made without "
        "re-running the chain: " + ", ".join(f"seed {s} (val F1 {v:.4f})" for s, v in
                                             choice["carried_seeds"].items())
        + f"; the highest validation F1 wins: **seed {choice['seed']}** (`{choice['folder']}`).",
        "- Test figures played no part in the choice.", "",
        "## The re-made network", "",
        f"Retrained here from the seed's initial weights (re-created from the seed, checked against the digest "
        f"in state.npz) and the round's mask, with the grid's flags: `{run_dir}` (its text files are in git). "
        "Training is seeded step by step but not bit-identical across CPUs, so this is a new draw of the same "
        "ticket and is measured anew; the recorded run scored validation "
        f"{choice['recorded']['val_challenge_f1']:.4f} and test {choice['recorded']['test_challenge_f1']:.4f}.", "",
        "| figure | value (95 % interval over records) |", "| --- | ---: |",
        f"| validation challenge F1 ({fig['val_records']} records) | {ci(fig['val_challenge_f1'])} |",
        f"| **test challenge F1** ({fig['test_records']} records) | {ci(fig['test_challenge_f1'])} |",
        f"| test AF sensitivity | {ci(fig['test_af_sensitivity'])} |",
        f"| test AF PPV | {ci(fig['test_af_ppv'])} |",
        f"| weights of convs + linear (dense) | {c['nonzero_weights']:,} ({c['prunable_weights']:,}) |",
        f"| parameters incl. biases and BatchNorm (dense) | {c['with_biases_and_bn']:,} ({c['parameters']:,}) |",
        f"| bytes of {TICKET} (dense fp32 checkpoint) | {b['ticket_fp32']:,} ({b['dense_fp32']:,}) |",
        f"| FLOPs per 30-s record (dense) | {export['flops']['sparse']:,} ({export['flops']['dense']:,}) |",
        *[f"| latency per 30-s record, 1 thread, {k} | {v['1']:.1f} ms |" for k, v in export["latency_ms"].items()],
        f"| the exported file loads back bit-exact | {'yes' if export.get('fp32_roundtrip_exact') else 'NO'} |", "",
        f"Latency: batch 1, fp32, median (export_ticket.py), on {cpu_flags()}, {platform.machine()}, torch "
        f"{torch.__version__}, {export['load_average'][2]} cores shared with other work (1-minute load average "
        f"{export['load_average'][0]:.1f} before, {export['load_average'][1]:.1f} after): read the latencies as "
        "upper bounds and their ratios as rough. Intervals: 95 % percentile "
        "bootstrap over the records of one network (1,000 replicates); they do not cover the spread between "
        "seeds (see results/cinc2017-cpu/plots/summary.md for that).", "",
        f"Data: `{config['flags']['data']}`, fingerprint `{config['data_fingerprint']}` (records.csv and samples, "
        "run_folders.prepare_run); the CinC 2017 training set at 200 Hz, split as build_datasets.py makes it. "
        f"Code version {export['code_version']}. export_ticket.py's own report: report.md.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- 5. AF operating point

OP_HEADING = "## AF operating point"


def ticket_predictions(ticket: Path, data: Path) -> pd.DataFrame:
    """Each validation and test record's class and class probabilities from the ticket file
    itself (fp32, batch and aggregation as its run evaluated), as train.py's predictions.csv;
    refused unless ``data`` is the data set the ticket records it was made with."""
    model, meta = export_ticket.load_ticket(ticket)
    export_ticket.check_ticket_data(meta, data, ticket)
    flags = json.loads((Path(meta["source"]).parent / rf.CONFIG).read_text())["flags"]
    ds = load_dataset(data)
    batcher = batching.Batcher(ds, batching.Normalizer(**meta["normalizer"]), model.cfg.stride, torch.device("cpu"))
    cfg = tr.TrainConfig(eval_batch_size=flags["eval_batch_size"], aggregate=flags["aggregate"])
    frames = []
    for split in ("val", "test"):
        idx = ds.indices(split)
        out = tr.evaluate(model, batcher, ds, split, cfg, bf16=False)
        frames.append(pd.DataFrame({"record": ds.names[idx], "split": split,
                                    "label": [CLASSES[i] for i in ds.labels[idx]],
                                    "predicted": [CLASSES[i] for i in out["predicted"]],
                                    **dict(zip(tr.PROBABILITY_COLUMNS, out["probabilities"].T, strict=True))}))
    return pd.concat(frames, ignore_index=True)


def operating_point_section(op: dict, agreement: float, records: int, command: str, sizes: tuple[int, int]) -> str:
    """README.md's section on the AF operating point; ``sizes``: the ticket's bytes before
    and after its metadata grew."""
    lines = [OP_HEADING, "",
             f"Made {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command}`: `{TICKET}` evaluated on the validation and "
             f"test records of its data set (refused on any other: the fingerprint it records), its class "
             f"probabilities in `predictions.csv`; its classes repeat those the retrained run recorded on "
             f"{agreement:.1%} of the {records} records. The threshold is stored in the ticket's metadata "
             f"(`af_operating_point`; its weights are unchanged: the file is now {sizes[1]:,} bytes, "
             f"{sizes[1] - sizes[0]:+,} for the metadata) and `predict.py` reports, beside the argmax class, "
             "whether a record is flagged AF at it.",
             *export_ticket.operating_point_lines(op), "",
             "The test figures at the argmax class are in the table above; those here are at the threshold. The "
             "threshold was chosen on validation only; test records played no part in it. Intervals: 95 % "
             "percentile bootstrap over the test records of this one network (1,000 replicates, "
             "operating_point.operating_point); they do not cover the spread between seeds.", ""]
    return "\n".join(lines)


def put_section(text: str, section: str) -> str:
    """``text`` with its AF operating point section replaced by ``section`` (or appended)."""
    head = text.split(OP_HEADING, 1)[0].rstrip("\n")
    return head + "\n\n" + section


def ship_operating_point(out: Path, ppv: float, command: str) -> dict:
    """Step 5 (module docstring): returns the operating point stored in the ticket."""
    ticket = out / TICKET
    before = ticket.stat().st_size
    meta = export_ticket.load_ticket(ticket)[1]
    run_dir = Path(meta["source"])
    if "data_fingerprint" not in meta:  # a ticket shipped before tickets recorded their data
        export_ticket.restamp(ticket, export_ticket.made_with(run_dir))
        meta = export_ticket.load_ticket(ticket)[1]
    data = Path(json.loads((run_dir.parent / rf.CONFIG).read_text())["flags"]["data"])
    try:
        table = ticket_predictions(ticket, data)
    except (export_ticket.TicketError, DatasetError) as e:
        raise SystemExit(f"error: {e}") from None
    rf.atomic_write_text(table.to_csv(index=False), out / tr.PREDICTIONS)
    recorded = pd.read_csv(run_dir / tr.PREDICTIONS, keep_default_na=False).set_index("record")["predicted"]
    agreement = float((table.set_index("record")["predicted"] == recorded.reindex(table["record"])).mean())
    op = operating_point.shipped_threshold(out, "ppv", ppv)
    export_ticket.restamp(ticket, {"af_operating_point": op})
    made = {k: meta[k] for k in ("data_fingerprint", "split") if k in meta}
    report_json = {**json.loads((out / "report.json").read_text()), **made, "af_operating_point": op}
    report_json["bytes"].update(ticket_fp32=ticket.stat().st_size,
                                ticket_fp32_xz=export_ticket.xz_size(ticket.read_bytes()))
    rf.atomic_write_text(json.dumps(report_json, indent=2) + "\n", out / "report.json")
    rf.atomic_write_text(export_ticket.report_markdown(report_json), out / "report.md")
    readme = out / "README.md"
    section = operating_point_section(op, agreement, len(table), command, (before, ticket.stat().st_size))
    rf.atomic_write_text(put_section(readme.read_text() if readme.is_file() else "", section), readme)
    print(section)
    return op


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", type=Path, required=True, help="experiment folder of run_experiments.py")
    p.add_argument("--out", type=Path, required=True, help="folder for the ticket, its report and retrained run")
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed relative loss of validation F1")
    p.add_argument("--choose-only", action="store_true", help="print the choice and stop")
    p.add_argument("--remake", metavar="SEED:METHOD:ROUND",
                   help="only re-make this round's network into OUT/retrained (no choice, no export): "
                   "another level for evaluation, e.g. 3:weight_rewind:6")
    p.add_argument("--latency-seconds", type=float, default=2.0, help="time spent measuring each latency")
    p.add_argument("--af-ppv", type=float, default=0.9,
                   help="the AF operating point: the lowest threshold on P(AF) whose validation PPV reaches this")
    p.add_argument("--operating-point", action="store_true",
                   help="only step 5: evaluate OUT's ticket, store its AF threshold in it and in its reports")
    args = p.parse_args(argv)
    if not 0 < args.af_ppv <= 1:
        p.error(f"--af-ppv must be in (0, 1], got {args.af_ppv}")
    command = "python " + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
    if args.operating_point:
        if not (args.out / TICKET).is_file():
            p.error(f"--operating-point: no {TICKET} in {args.out}: ship a ticket there first")
        ship_operating_point(args.out, args.af_ppv, command)
        return
    if not (args.exp / "results.csv").is_file():
        p.error(f"--exp {args.exp}: no results.csv there (a run_experiments.py folder is expected)")
    if not 0 < args.tolerance < 1:
        p.error(f"--tolerance must be between 0 and 1, got {args.tolerance}")
    if args.remake:
        m = re.match(r"^(\d+):(\w+):(\d+)$", args.remake)
        if not m or not (args.exp / f"seed{m[1]}" / m[2] / run_state.STATE).is_file():
            p.error(f"--remake {args.remake!r}: expected SEED:METHOD:ROUND of a chain with a {run_state.STATE} "
                    f"in {args.exp}")
        print(retrain({"exp": str(args.exp), "seed": int(m[1]), "method": m[2], "round": int(m[3])}, args.out))
        return
    choice = choose(args.exp, args.tolerance)
    print(json.dumps(choice, indent=2))
    if args.choose_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rf.atomic_write_text(json.dumps(choice, indent=2) + "\n", args.out / "choice.json")
    run_dir = retrain(choice, args.out)
    load = os.getloadavg()[0]  # latency is measured on whatever else the machine is running
    export = export_ticket.main(["--run", str(run_dir), "--out", str(args.out), "--dtypes", "fp32", "--threads", "1",
                                 "--latency-seconds", str(args.latency_seconds)])
    export["load_average"] = [load, os.getloadavg()[0], os.cpu_count()]
    rf.atomic_write_text(report(choice, run_dir, args.out, export, command), args.out / "README.md")
    print((args.out / "README.md").read_text())
    ship_operating_point(args.out, args.af_ppv, command)


if __name__ == "__main__":
    main()
