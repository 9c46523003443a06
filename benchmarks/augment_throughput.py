"""Throughput of the two-view augmentation pipeline in tf.data (images/s, both views per image).

    python benchmarks/augment_throughput.py [--images 4096]

Two ways of mapping: per image (`map` on [H, W, C], then `batch`, as most input pipelines do) and
per batch (`batch`, then `map` on [B, H, W, C], vectorised). Random pixels; CPU only; each
cell is the best of 3 rounds of --images images.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nnclr_tf.augment import view_augmenter  # noqa: E402

BATCH = 256
ROUNDS = 3


def two_views(preset, size, channels):
    view_1 = view_augmenter(1, size, preset=preset, channels=channels, seed=1)
    view_2 = view_augmenter(2, size, preset=preset, channels=channels, seed=1)
    return lambda x: (view_1(x), view_2(x))


def images_per_second(preset, size, channels, per_image, count):
    pixels = np.random.default_rng(0).random((1024, size, size, channels), dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices(pixels).repeat()
    views = two_views(preset, size, channels)
    if per_image:
        ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
    else:
        ds = ds.batch(BATCH).map(views, num_parallel_calls=tf.data.AUTOTUNE)
    it = iter(ds.prefetch(tf.data.AUTOTUNE))
    for _ in range(3):  # tracing and warm-up
        next(it)
    steps = max(1, count // BATCH)
    best = float("inf")
    for _ in range(ROUNDS):  # best of a few rounds: the machine may be shared
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        best = min(best, time.perf_counter() - start)
    return steps * BATCH / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="images timed per cell")
    args = parser.parse_args()
    print(f"CPU cores visible: {os.cpu_count()}, batch {BATCH}, TF {tf.__version__}; "
          "images/s, two views per image")
    print("| preset | image | map per image (img/s) | map per batch (img/s) |")
    print("| --- | --- | ---: | ---: |")
    for preset in ("byol", "cifar"):
        for size, channels in ((28, 1), (32, 3)):
            rates = [images_per_second(preset, size, channels, per_image, args.images)
                     for per_image in (True, False)]
            print(f"| {preset} | {size}x{size}x{channels} | {rates[0]:,.0f} | {rates[1]:,.0f} |")


if __name__ == "__main__":
    main()
