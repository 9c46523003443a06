#!/usr/bin/env bash
# The CPU-sized result: Fashion-MNIST (the full 60k/10k from Debian's dataset-fashion-mnist:
# `apt-get install dataset-fashion-mnist`), the `fmnist_cpu` preset, on 2 CPU cores.
# NNCLR and the SimCLR-style baseline (positive=self) with the same preset, budget and seed, then
# raw pixels (native 28x28) through the same kNN / linear probe. Writes
# RUNS/fmnist_{nnclr,self}/report.{json,md}, RUNS/fmnist_raw_pixels.json and prints one table
# (RUNS defaults to runs/). A run that already has its report is not run again.
#   experiments/fmnist_cpu.sh                                    # the BUILD.md numbers
#   RUNS=runs/seed1 experiments/fmnist_cpu.sh --set run.seed=1   # extra flags go to both runs
set -euo pipefail
RUNS=${RUNS:-runs}
PYTHON=${PYTHON:-python}
nnclr() { "$PYTHON" -m nnclr_tf "$@"; }

for method in nnclr self; do
  dir="$RUNS/fmnist_$method"
  positive=$([ "$method" = nnclr ] && echo nn || echo self)
  [ -f "$dir/report.json" ] && continue
  start=$SECONDS
  # Pretraining alone (timed: the wall time of the command that finishes the run), then the same
  # command again: the finished run is not retrained, only evaluated (kNN + linear probe of the
  # trained and of a random-init encoder) and reported.
  nnclr pretrain --preset=fmnist_cpu --model_dir="$dir" --set model.positive="$positive" \
    --set run.report=false "$@"
  echo "$((SECONDS - start))" > "$dir/pretrain_wall_seconds.txt"
  nnclr pretrain --preset=fmnist_cpu --model_dir="$dir" --set model.positive="$positive" "$@"
done

"$PYTHON" - "$RUNS" <<'EOF'
import json, os, sys

from nnclr_tf import config, report

runs = sys.argv[1]
pixels = config.override(config.get_preset("fmnist_cpu"), {"data.image_size": 28})
raw = report.raw_pixel_scores(pixels, num_classes=10)
with open(os.path.join(runs, "fmnist_raw_pixels.json"), "w") as handle:
    json.dump(raw, handle, indent=2)
print("| encoder | kNN top-1 (k=20) | linear-probe top-1 | pretraining wall |")
print("| --- | --- | --- | --- |")
for method in ("nnclr", "self"):
    folder = os.path.join(runs, f"fmnist_{method}")
    with open(os.path.join(folder, "report.json")) as handle:
        scores = json.load(handle)
    with open(os.path.join(folder, "pretrain_wall_seconds.txt")) as handle:
        wall = int(handle.read())
    for name in ("trained", "random_init"):
        s = scores[name]
        print(f"| {method} {name.replace('_', ' ')} | {s['knn_top1']:.4f} | {s['linear_top1']:.4f} | "
              + (f"{wall // 60} min {wall % 60:02d} s, {scores['steps']} steps |"
                 if name == "trained" else "– |"))
print(f"| raw pixels (28x28) | {raw['knn_top1']:.4f} | {raw['linear_top1']:.4f} | – |")
EOF
