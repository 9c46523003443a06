"""Throughput of `pretraining_dataset` (two augmented views per image), in images per second.

    python benchmarks/input_pipeline.py                       # embedded data, 28x28, batch 256
    python benchmarks/input_pipeline.py --dataset cifar10 --image_size 32 --presets byol,crops

Each row times `--steps` batches after `--warmup` batches (the first fills the shuffle buffer and
traces the augmenters). One image counts once although it yields two views.
"""

import argparse
import time

from nnclr_tf.data import pretraining_dataset


def measure(dataset, data_dir, batch_size, image_size, preset, steps, warmup, channels=None):
    ds = pretraining_dataset(dataset, data_dir=data_dir, batch_size=batch_size,
                             image_size=image_size, augment=preset, channels=channels)
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
    batch["view_1"].numpy()  # Make sure the last batch is complete.
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="embedded")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--presets", default="byol,crops")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    print("| dataset | image size | batch | preset | images/s |")
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets.split(","):
        rate = measure(args.dataset, args.data_dir, args.batch_size, args.image_size, preset,
                       args.steps, args.warmup)
        print(f"| {args.dataset} | {args.image_size} | {args.batch_size} | {preset} | {rate:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
