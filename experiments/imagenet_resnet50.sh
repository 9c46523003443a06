#!/usr/bin/env bash
# The paper's ImageNet ResNet-50 results (PAPER.md): pretraining, linear evaluation, 1 % / 10 %
# fine-tuning and the transfer suite. Needs ImageNet prepared for TFDS (manual download of the
# ILSVRC2012 tars into DATA_DIR/downloads/manual, then `tfds build imagenet2012 --data_dir=DATA_DIR`)
# and, for the paper's batch of 4096, a TPU v3-128 or equivalent (strategy auto picks the TPU).
# Expected: linear top-1 75.6 / top-5 92.4; 1 %: 56.5 / 80.7; 10 %: 69.8 / 89.3.
set -euo pipefail
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
MODEL_DIR=${MODEL_DIR:-runs/imagenet_resnet50}
common=(--preset=imagenet_resnet50 --data_dir="$DATA_DIR" --model_dir="$MODEL_DIR")

nnclr pretrain "${common[@]}" "$@"
nnclr linear_eval "${common[@]}" --set eval.linear_epochs=90 --set eval.linear_learning_rate=0.1
nnclr finetune "${common[@]}" --set eval.label_fraction=0.01 --set eval.finetune_epochs=60
nnclr finetune "${common[@]}" --set eval.label_fraction=0.1 --set eval.finetune_epochs=30
nnclr transfer "${common[@]}" --image_size=224 \
  --set eval.transfer_datasets=food101,cifar10,cifar100,sun397,cars196,dtd,oxford_iiit_pet,oxford_flowers102,caltech101,voc/2007
