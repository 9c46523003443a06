"""Throughput of `pretraining_dataset` (two augmented views per image), in images per second.

    python benchmarks/input_pipeline.py                       # embedded data, 28x28, batch 256
    python benchmarks/input_pipeline.py --dataset cifar10 --image_size 32 --presets byol,crops
    python benchmarks/input_pipeline.py --synthetic_jpegs 256 --image_size 224 --batch_size 64 \
        --presets crops,byol --jpeg_decodes full,union,crops --steps 8 --warmup 2

Each row times `--steps` batches after `--warmup` batches (the first fills the shuffle buffer and
traces the augmenters), in images per second and in CPU milliseconds per image (all threads; robust
to other load on the machine). One image counts once although it yields two views.

--synthetic_jpegs N writes N JPEGs of ImageNet's typical size (500x375 and 375x500, quality 90,
smooth colour with noise: about 100 kB each, as ImageNet's average file) to a temporary folder,
reads it as the dataset, and compares `jpeg_decode` settings: "full" decodes each image whole and
crops it, "union" decodes once the window holding both views' crops, "crops" decodes each view's
crop on its own (tf.image.decode_and_crop_jpeg). Nothing is downloaded.
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from nnclr_tf.data import pretraining_dataset


def measure(dataset, data_dir, batch_size, image_size, preset, steps, warmup, channels=None,
            jpeg_decode="union", shuffle_buffer=10_000, single_thread=False):
    ds = pretraining_dataset(dataset, data_dir=data_dir, batch_size=batch_size,
                             image_size=image_size, augment=preset, channels=channels,
                             jpeg_decode=jpeg_decode, shuffle_buffer=shuffle_buffer)
    if single_thread:  # the work itself, without parallel calls' and autotuning's overhead
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        options.autotune.enabled = False
        ds = ds.with_options(options)
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch = next(iterator)
    batch["view_1"].numpy()  # Make sure the last batch is complete.
    images = steps * batch_size
    # CPU time of all of this process's threads: what the pipeline costs, however busy the
    # machine is (prefetching beyond the last batch adds a little).
    return images / (time.perf_counter() - start), (time.process_time() - cpu_start) / images


def write_synthetic_jpegs(folder, count, seed=0):
    """`count` JPEGs in two class folders; returns their mean size in bytes."""
    rng = np.random.default_rng(seed)
    sizes = []
    for index in range(count):
        height, width = (375, 500) if (index // 2) % 2 else (500, 375)  # both in each class
        pixels = np.cumsum(np.cumsum(rng.normal(size=(height, width, 3)), 0), 1)
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 220
        pixels = np.clip(pixels + rng.normal(0, 14, pixels.shape), 0, 255).astype(np.uint8)
        encoded = tf.io.encode_jpeg(pixels, quality=90).numpy()
        os.makedirs(os.path.join(folder, "ab"[index % 2]), exist_ok=True)
        with open(os.path.join(folder, "ab"[index % 2], f"{index:05d}.jpg"), "wb") as f:
            f.write(encoded)
        sizes.append(len(encoded))
    return float(np.mean(sizes))


def decode_costs(folder, image_size, count=200):
    """CPU ms per image of decoding alone, one thread, for the windows of two views. The rows
    with windows include drawing them (the first row), which the whole-image path also does,
    inside the augmenter."""
    from nnclr_tf.augment import view_augmenter  # pylint: disable=import-outside-toplevel
    from nnclr_tf.data import jpeg  # pylint: disable=import-outside-toplevel
    views = [view_augmenter(view, image_size, preset="crops") for view in (1, 2)]
    paths = sorted(tf.io.gfile.glob(os.path.join(folder, "*", "*.jpg")))[:count]
    files = tf.stack([tf.io.read_file(path) for path in paths])

    def choose(index, count):
        return lambda shape: [view.crop_window(shape, seed=tf.stack([index, tf.constant(v, tf.int64)]))
                              for v, view in enumerate(views[:count])]

    def last_pixels(crops):  # a pixel of each crop, so that no decode is optimised away
        return tf.stack([crop[-1, -1] for crop, _ in crops])

    def windows_only(i, c):
        windows = choose(i, 2)(tf.image.extract_jpeg_shape(c)[:2])
        return tf.cast(tf.stack([w for w, _ in windows]), tf.uint8)  # as pixels, for one dtype

    ways = {
        "two windows drawn, none decoded": windows_only,
        "whole image": lambda i, c: tf.io.decode_jpeg(c, channels=3)[-1, -1][tf.newaxis],
        "one crop's window": lambda i, c: last_pixels(jpeg.decode_crops(c, choose(i, 1))),
        "union of two windows": lambda i, c: last_pixels(jpeg.decode_crops(c, choose(i, 2))),
        "two windows apart": lambda i, c: last_pixels(
            jpeg.decode_crops(c, choose(i, 2), union=False)),
    }
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    rows = []
    for name, decode in ways.items():
        ds = tf.data.Dataset.from_tensor_slices(files).enumerate().map(decode)
        ds = ds.with_options(options)
        for _ in ds.take(8):  # trace
            pass
        start = time.process_time()
        for _ in ds:
            pass
        rows.append((name, 1000 * (time.process_time() - start) / len(paths)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="embedded")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--presets", default="byol,crops")
    parser.add_argument("--jpeg_decodes", default="union",
                        help="comma-separated jpeg_decode settings: full, union, crops")
    parser.add_argument("--synthetic_jpegs", type=int, default=0,
                        help="write this many ImageNet-sized JPEGs to a temporary folder and use it")
    parser.add_argument("--shuffle_buffer", type=int, default=10_000)
    parser.add_argument("--single_thread", action="store_true",
                        help="one thread for tf.data and TensorFlow ops: CPU cost without overhead")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.single_thread:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    dataset, folder = args.dataset, None
    if args.synthetic_jpegs:
        folder = tempfile.mkdtemp(prefix="nnclr_jpegs_")
        mean_bytes = write_synthetic_jpegs(folder, args.synthetic_jpegs)
        dataset = folder
        print(f"{args.synthetic_jpegs} synthetic JPEGs, 500x375 / 375x500, mean "
              f"{mean_bytes / 1000:.0f} kB, in {folder}\n")
    try:
        if folder:
            print("| decoding one image (one thread) | CPU ms per image |\n| --- | --- |")
            for name, ms in decode_costs(folder, args.image_size):
                print(f"| {name} | {ms:.2f} |", flush=True)
            print()
        print("| dataset | image size | batch | preset | jpeg_decode | images/s | CPU ms per image |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        name = "synthetic JPEGs" if folder else args.dataset
        for preset in args.presets.split(","):
            for jpeg_decode in args.jpeg_decodes.split(","):
                rate, cpu = measure(dataset, args.data_dir, args.batch_size, args.image_size,
                                    preset, args.steps, args.warmup, jpeg_decode=jpeg_decode,
                                    shuffle_buffer=args.shuffle_buffer,
                                    single_thread=args.single_thread)
                print(f"| {name} | {args.image_size} | {args.batch_size} | {preset} | "
                      f"{jpeg_decode} | {rate:,.0f} | {1000 * cpu:.1f} |", flush=True)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
