"""Benchmark: attribution drift on the leaf data -- false alarms on clean traffic, detection of the watch's shifts.

Usage: python benchmarks/attribution_drift.py [--window 100] [--windows 400] [--trials 40] [--alpha 0.01]
(needs ../shared/data: the Kaggle leaf training set and the UCI 100-plant files)

The model is the leaf search's usual winner (300 trees), trained on the pipeline's split (seed 42). Its
baseline is what the watch fits: approximate attributions over the version's holdout, the threshold the
policy's 0.9 lowered to the alpha quantile of clean windows (kfloop.drift.attribution). Clean rows: the
Kaggle holdout plus the UCI leaves the model was not trained on (benchmarks/watch.py's pool), each window
drawn from them at random and sent the way a client sends it (V1, V2 FP32, V2 FP64, one tensor per
feature: JSON round trip, the watch's InputSchema). Shifts: benchmarks/watch.py's four. First, whether
approximate attributions rank features like exact ones (Spearman of the mean |attribution| over the
holdout; target >= 0.9). Targets: false alarms / windows <= alpha in every encoding over >= 200 windows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import train  # noqa: E402
from watch import SHARED, as_received, shifts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.01)
    args = parser.parse_args()
    from scipy.stats import spearmanr

    from kfloop.data import load_dataset
    from kfloop.drift import calibration
    from kfloop.drift.attribution import AttributionBaseline, ndcg
    from kfloop.explain import ForestExplainer
    from kfloop.serving.protocol import ENCODINGS
    from kfloop.training import Prepared

    console = Console(width=200)
    kaggle = load_dataset(str(SHARED / "kaggle_leaf_train.csv"))
    _, clean, labels = calibration.clean_streams(kaggle, load_dataset(str(SHARED)))
    names = tuple(kaggle.feature_names)
    with tempfile.TemporaryDirectory(prefix="kfloop-bench-attribution-") as tmp:
        work = Path(tmp)
        version_dir, _ = train(str(SHARED / "kaggle_leaf_train.csv"), work / "registry", work)
        holdout = Prepared.load(str(work / "prepared.npz")).holdout_features
        explainer = ForestExplainer.load(version_dir, "1")

        started = time.perf_counter()
        exact = explainer.importance(holdout, "exact").mean(axis=0)
        exact_seconds = time.perf_counter() - started
        approximate = explainer.importance(holdout, "approximate").mean(axis=0)
        rho = spearmanr(exact, approximate).statistic
        top = set(np.argsort(-exact)[:20]) & set(np.argsort(-approximate)[:20])
        console.print(f"approximate vs exact feature ranking over {len(holdout)} holdout rows: Spearman {rho:.3f} "
                      f"(target >= 0.9); {len(top)} of the exact top 20 in the approximate top 20; "
                      f"exact took {exact_seconds:.1f} s")

        baseline = AttributionBaseline(explainer, holdout, window=args.window, threshold=0.9, alpha=args.alpha)
        console.print(f"baseline: {len(holdout)} holdout rows; threshold {baseline.threshold:.3f} (policy 0.9, clean "
                      f"windows' {args.alpha:g} quantile {baseline.clean_quantile:.3f}); clean pool {len(clean)} rows, "
                      f"window {args.window}, {args.windows} windows per encoding, {args.trials} per shift")
        table = Table(title="attribution drift on leaf data (nDCG@20 of the window's ranking), rows as clients send them")
        for column in ("encoding", "case", "false alarms / windows", "detection rate", "median nDCG", "rows/s tested"):
            table.add_column(column, justify="right")
        rng = np.random.default_rng(0)
        for encoding in ENCODINGS:
            encode = as_received(encoding, names)
            started = time.perf_counter()
            per_row = baseline.importance_per_row(encode(clean))
            speed = len(clean) / (time.perf_counter() - started)
            scores = [ndcg(baseline.shares, per_row[rng.choice(len(per_row), args.window, replace=False)].mean(axis=0))
                      for _ in range(args.windows)]
            alarms = sum(score < baseline.threshold for score in scores)
            verdict = "" if alarms / args.windows <= args.alpha else " [red](over alpha)"
            table.add_row(encoding, "clean", f"{alarms / args.windows:.3f} ({alarms}/{args.windows}){verdict}", "-",
                          f"{np.median(scores):.3f}", f"{speed:.0f}")
            for name, shift in shifts(clean, labels, np.random.default_rng(1)).items():
                found = []
                for trial in range(args.trials):
                    window = encode(shift(clean[rng.choice(len(clean), args.window, replace=False)], np.random.default_rng(trial)))
                    found.append(baseline.test(window).ndcg)
                detected = sum(score < baseline.threshold for score in found) / args.trials
                table.add_row(encoding, name, "-", f"{detected:.2f}", f"{np.median(found):.3f}", "-")
        console.print(table)
        console.print(f"target: false alarms / windows <= {args.alpha:g} on clean traffic in every encoding")


if __name__ == "__main__":
    main()
