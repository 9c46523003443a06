"""The table of experiments/augmentation_ablation.sh, from its run folders.

    python experiments/ablation_table.py RUNS      # prints the table, writes RUNS/ablation.md

RUNS holds `{nn,self}_{byol,crops}_seed{S}/` and `queue{N}/` folders, each with scores.json (kNN and
linear top-1 of `report.encoder_scores`) and pretrain_wall_seconds.txt (the pretraining wall time of
the run's last attempt: a run stopped and resumed counts only its last part); folders without
scores.json (runs not finished) are left out. It prints:
- mean and spread (half the range over seeds) of kNN and linear top-1 for each method and
  augmentation;
- each method's relative drop from byol to crops, 1 - crops / byol, per seed (the two runs of a seed
  pair up) and its mean and spread, and whether NNCLR's mean drop is smaller than positive=self's by
  more than the larger of the two spreads (the paper's claim at this scale);
- the support-set size curve (NNCLR, byol, seed 0; 8,192 is the preset's).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

METHODS = (("nn", "NNCLR"), ("self", "positive=self (SimCLR-style)"))
METRICS = (("knn_top1", "kNN"), ("linear_top1", "linear"))
PRESET_QUEUE = 8192


def read_runs(runs: str) -> dict:
    """{(positive, augment, seed): scores with "wall" (seconds)} of the finished 2 x 2 runs, and
    {("queue", size, 0): ...} of the support-set runs."""
    found = {}
    for folder in sorted(glob.glob(os.path.join(runs, "*"))):
        name = os.path.basename(folder)
        cell = re.fullmatch(r"(nn|self)_(byol|crops)_seed(\d+)", name)
        queue = re.fullmatch(r"queue(\d+)", name)
        if not (cell or queue) or not os.path.exists(os.path.join(folder, "scores.json")):
            continue
        with open(os.path.join(folder, "scores.json")) as handle:
            row = json.load(handle)
        wall = os.path.join(folder, "pretrain_wall_seconds.txt")
        if os.path.exists(wall):
            with open(wall) as handle:
                row["wall"] = int(handle.read())
        key = ((cell[1], cell[2], int(cell[3])) if cell else ("queue", int(queue[1]), 0))
        found[key] = row
    return found


def mean_spread(values) -> tuple[float, float]:
    """(mean, half the range): the spread over seeds that the table quotes."""
    values = list(values)
    return sum(values) / len(values), (max(values) - min(values)) / 2


def relative_drops(found: dict, positive: str, metric: str) -> dict:
    """{seed: 1 - crops / byol} for the seeds where both of the method's runs finished."""
    drops = {}
    for (p, augment, seed), row in found.items():
        other = found.get((positive, "crops", seed))
        if p == positive and augment == "byol" and other is not None:
            drops[seed] = 1 - other[metric] / row[metric]
    return dict(sorted(drops.items()))


def table(found: dict) -> str:
    lines = ["| method | augmentation | seeds | kNN top-1 | linear top-1 "
             "| pretraining wall, mean (last attempt) |", "| --- | --- | --- | --- | --- | --- |"]
    for positive, name in METHODS:
        for augment in ("byol", "crops"):
            rows = [row for (p, a, _), row in sorted(found.items())
                    if (p, a) == (positive, augment)]
            if not rows:
                continue
            cells = [f"{m:.4f} +- {s:.4f}" for m, s in
                     (mean_spread(row[key] for row in rows) for key, _ in METRICS)]
            walls = [row["wall"] for row in rows if "wall" in row]
            wall = f"{sum(walls) / len(walls) / 60:.1f} min" if walls else "-"
            lines.append(f"| {name} | {augment} | {len(rows)} | {cells[0]} | {cells[1]} | {wall} |")
    lines += ["", "Relative drop from byol to crops, 1 - crops / byol, per seed (mean +- half the "
              "range):", ""]
    for key, metric in METRICS:
        drops = {positive: relative_drops(found, positive, key) for positive, _ in METHODS}
        for positive, name in METHODS:
            if drops[positive]:
                per_seed = ", ".join(f"{100 * d:.2f}" for d in drops[positive].values())
                mean, spread = mean_spread(drops[positive].values())
                lines.append(f"- {metric}, {name}: {100 * mean:.2f} +- {100 * spread:.2f} % "
                             f"(seed{'s' * (len(drops[positive]) > 1)} "
                             f"{', '.join(map(str, drops[positive]))}: {per_seed} %)")
        if drops["nn"] and drops["self"]:
            (nn, nn_spread), (own, own_spread) = (mean_spread(drops[p].values())
                                                  for p in ("nn", "self"))
            spread = max(nn_spread, own_spread)
            if min(len(drops["nn"]), len(drops["self"])) < 2:
                lines.append(f"- {metric}: positive=self's drop minus NNCLR's: "
                             f"{100 * (own - nn):+.2f} points; one seed, no spread to compare with")
                continue
            verdict = ("smaller by more than" if own - nn > spread else
                       "not smaller by more than")
            lines.append(f"- {metric}: NNCLR's drop is {verdict} the seed spread "
                         f"({100 * (own - nn):+.2f} points of relative drop against "
                         f"{100 * spread:.2f})")
    queues = sorted((size, row) for (kind, size, _), row in found.items() if kind == "queue")
    if queues:
        if ("nn", "byol", 0) in found:
            queues = sorted(queues + [(PRESET_QUEUE, found["nn", "byol", 0])])
        lines += ["", "Support-set size (NNCLR, byol, seed 0):", "",
                  "| support set | kNN top-1 | linear top-1 |", "| --- | --- | --- |"]
        lines += [f"| {size:,} | {row['knn_top1']:.4f} | {row['linear_top1']:.4f} |"
                  for size, row in queues]
    return "\n".join(lines)


def main(runs: str) -> None:
    text = table(read_runs(runs))
    print(text)
    with open(os.path.join(runs, "ablation.md"), "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/ablation_table.py RUNS")
    main(sys.argv[1])
