#!/usr/bin/env bash
# ResNet-18 at 96x96 on STL-10: pretrain on the 100k `unlabelled` split, evaluate on train/test.
set -euo pipefail
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
MODEL_DIR=${MODEL_DIR:-runs/stl10_resnet18}
common=(--preset=stl10_resnet18 --data_dir="$DATA_DIR" --model_dir="$MODEL_DIR")
nnclr pretrain "${common[@]}" "$@"
nnclr knn "${common[@]}"
nnclr linear_eval "${common[@]}"
