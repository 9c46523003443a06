#!/usr/bin/env bash
# The paper's claim at CPU scale: NNCLR needs less from augmentation than SimCLR-style positives
# (the paper, ImageNet: crops only costs NNCLR 2.1 % relative top-1, far less than SimCLR).
# On the full Fashion-MNIST with the fmnist_cpu preset's budget:
#   2 x 2 x 3: method (NNCLR positive=nn, SimCLR-style positive=self)
#            x augmentation (byol = the full BYOL set, crops = random crops and flips only)
#            x seeds 0, 1, 2;
#   then the support-set size curve (1,024 / 8,192 / 32,768; NNCLR, byol, seed 0).
# Each run pretrains alone (timed, no report), then its encoder is scored with the report's
# protocol (kNN k=20 and the linear probe on all 60,000 training / 10,000 test features) into
# RUN/scores.json. A run that has its scores is not run again, so the script can be stopped and
# started again. experiments/ablation_table.py then prints the table (mean and spread over seeds,
# each method's relative drop from byol to crops per seed, whether NNCLR's drop is smaller by more
# than the seed spread, the support-set curve) and writes RUNS/ablation.md.
#   experiments/augmentation_ablation.sh                         # everything, ~6 h on 2 CPU cores
#   SEEDS="0" QUEUES="" experiments/augmentation_ablation.sh     # one seed, no queue curve
#   experiments/augmentation_ablation.sh --set optim.epochs=1    # extra flags go to every run
# Two copies with different SEEDS (and QUEUES="" in all but one) may share RUNS: on 2 cores two
# runs side by side finished sooner than one after the other (BUILD.md). Never two on one folder.
set -euo pipefail
RUNS=${RUNS:-runs/ablation}
SEEDS=${SEEDS:-0 1 2}
QUEUES=${QUEUES-1024 32768}  # 8,192 is the preset's, measured in the 2 x 2 table
PYTHON=${PYTHON:-python}
nnclr() { "$PYTHON" -m nnclr_tf "$@"; }

pretrain() {  # pretrain DIR FLAGS...
  local dir=$1; shift
  [ -f "$dir/scores.json" ] && return 0
  local start=$SECONDS
  nnclr pretrain --preset=fmnist_cpu --model_dir="$dir" --set run.report=false \
    --set run.export=false "$@"
  echo "$((SECONDS - start))" > "$dir/pretrain_wall_seconds.txt"
  "$PYTHON" - "$dir" <<'EOF'
import json, os, sys

import keras

import nnclr_tf
from nnclr_tf import config, report

run = sys.argv[1]
with open(os.path.join(run, "config.json")) as handle:
    cfg = config.from_dict(json.load(handle)["config"])
model = keras.models.load_model(os.path.join(run, "nnclr.keras"))
scores = report.encoder_scores(model.encoder, cfg, num_classes=10)
with open(os.path.join(run, "scores.json"), "w") as handle:
    json.dump(scores, handle, indent=2)
print(run, scores)
EOF
}

for seed in $SEEDS; do
  for positive in nn self; do
    for augment in byol crops; do
      pretrain "$RUNS/${positive}_${augment}_seed$seed" --set model.positive="$positive" \
        --set augment.preset="$augment" --set run.seed="$seed" "$@"
    done
  done
done
for queue in $QUEUES; do
  pretrain "$RUNS/queue$queue" --set model.queue_size="$queue" --set augment.preset=byol \
    --set run.seed=0 "$@"
done

"$PYTHON" "$(dirname "$0")/ablation_table.py" "$RUNS"
