"""How well predict.py's rate check separates true from wrong sampling rates, on a built
data set (default the CinC 2017 build at 200 Hz): the heart rate (predict.heart_rate) and the
QRS band's share of the power (predict.qrs_share) of every record at its true rate, and
the share of a random sample of records that the check refuses when their rate is given
k times too low (the record resampled from 200/k to 200 Hz, as predict.py does).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/rate_check.py --data data/cinc2017
"""

from __future__ import annotations

import argparse

import numpy as np

import predict
from build_datasets import FS, load_dataset, resample


def refused(y: np.ndarray) -> bool:
    return (predict.qrs_share(y, FS) < predict.MIN_QRS_SHARE
            or not predict.MIN_BPM <= predict.heart_rate(y, FS) <= predict.MAX_BPM)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/cinc2017")
    p.add_argument("--sample", type=int, default=300, help="records tried at each wrong rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ds = load_dataset(args.data)
    records = [ds.signals[i, :n] for i, n in enumerate(ds.lengths)]
    bpm = np.array([predict.heart_rate(x.astype(float), FS) for x in records])
    share = np.array([predict.qrs_share(x.astype(float), FS) for x in records])
    print(f"{len(records)} records at their true rate: heart rate {np.nanmin(bpm):.1f}-{np.nanmax(bpm):.1f} bpm "
          f"({int((~((bpm >= predict.MIN_BPM) & (bpm <= predict.MAX_BPM))).sum())} outside "
          f"{predict.MIN_BPM:g}-{predict.MAX_BPM:g}); QRS share min {share.min():.4f}, median {np.median(share):.2f}; "
          f"refused by the check: {sum(refused(x.astype(float)) for x in records)}")
    pick = np.random.default_rng(args.seed).choice(len(records), args.sample, replace=False)
    for k in (2, 3, 4, 5, 6):
        n = sum(refused(resample(records[i], FS / k, FS).astype(float)) for i in pick)
        print(f"rate given {k}x too low: refused {n}/{args.sample} ({100 * n / args.sample:.0f} %)")


if __name__ == "__main__":
    main()
