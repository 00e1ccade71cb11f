"""Benchmark: calibration and speed of the watch's alarms, both detector backends, on the leaf data.

Usage: python benchmarks/watch.py [--window 100] [--windows 200] [--trials 60]
(needs ../shared/data: the Kaggle leaf training set and the UCI 100-plant files)

Reference: the training split of the Kaggle set (as the pipeline makes it, seed 42).
Clean rows: the Kaggle holdout plus the UCI 100-plant leaves that are not in the Kaggle
training set (the Kaggle test leaves), mapped to the same 192 features.
Shifts tested (each on clean rows drawn the same way):
  * margin x1.25      -- all 64 margin features scaled by 1.25
  * texture noise     -- Gaussian noise (sigma 0.01) added to the 64 texture features
  * 10 species        -- rows of 10 random species only (a population shift)
  * shape shuffled    -- each of the 64 shape features shuffled across rows on its own
                         (marginals unchanged: only the outlier test can see it)
Reports the false-alarm rate per tested window (target <= alpha), detection rate (target
>= 0.95), median and maximum delay in rows from the first shifted row to the alarm
(target <= one window) and rows/s the detector tests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shifts(clean: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    from kfloop.drift import calibration

    species = rng.choice(np.unique(labels), 10, replace=False)
    return {
        "margin x1.25": calibration.scale_columns(slice(0, 64), 1.25),
        "texture noise": calibration.add_noise(slice(128, 192), 0.01),
        "10 species": calibration.replace_rows(clean[np.isin(labels, species)]),
        "shape shuffled": calibration.shuffle_columns(slice(64, 128)),
    }


def main() -> None:
    from kfloop.drift import calibration
    from kfloop.drift.detectors import DetectorConfig, make_detector

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--correction", default="fdr", choices=("bonferroni", "fdr"))
    args = parser.parse_args()
    stride = args.window // 4
    from kfloop.data import load_dataset

    reference, clean, labels = calibration.clean_streams(
        load_dataset(str(SHARED / "kaggle_leaf_train.csv")), load_dataset(str(SHARED))
    )
    console = Console(width=200)
    console.print(f"reference {len(reference)} rows, clean pool {len(clean)} rows, window {args.window}, "
                  f"stride {stride}, alpha {args.alpha}, correction {args.correction}")
    table = Table(title="watch calibration on leaf data")
    for column in ("backend", "case", "false alarms / windows", "detection rate", "median delay (rows)",
                   "max delay (rows)", "rows/s tested"):
        table.add_column(column, justify="right")
    for backend in ("scipy", "alibi"):
        detector = make_detector(backend, DetectorConfig(alpha=args.alpha, correction=args.correction)).fit(reference)
        start = time.perf_counter()
        rate, tested = calibration.false_alarm_rate(detector, clean, windows=args.windows, window=args.window, stride=stride)
        speed = tested * stride / (time.perf_counter() - start)
        table.add_row(backend, "clean", f"{rate:.3f} ({tested})", "-", "-", "-", f"{speed:.0f}")
        for name, shift in shifts(clean, labels, np.random.default_rng(1)).items():
            found = calibration.detection(detector, clean, shift, trials=args.trials, window=args.window, stride=stride)
            table.add_row(backend, name, "-", f"{found.rate:.2f}", f"{found.median_delay:.0f}", str(found.max_delay), "-")
    console.print(table)


if __name__ == "__main__":
    main()
