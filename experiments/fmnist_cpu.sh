#!/usr/bin/env bash
# The CPU-sized result: Fashion-MNIST (Debian's dataset-fashion-mnist, 60k/10k; falls back to nothing:
# install it with `apt-get install dataset-fashion-mnist`), ResNet-18 width 0.25, on 2 CPU cores.
# Runs NNCLR and the SimCLR-style baseline (positive=self) with the same budget and seed.
set -euo pipefail
nnclr pretrain --preset=fmnist_cpu --model_dir=runs/fmnist_nnclr "$@"
nnclr pretrain --preset=fmnist_cpu --model_dir=runs/fmnist_simclr --set model.positive=self "$@"
