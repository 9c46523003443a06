"""Builds the Fashion-MNIST subset shipped in `nnclr_tf/assets/` (the "embedded" dataset).

Source: Debian's `dataset-fashion-mnist` package (Zalando's Fashion-MNIST, MIT licence), whose
gzipped IDX files live in /usr/share/datasets/fashion-mnist:

    apt-get install dataset-fashion-mnist
    pip install -e .                                 # the script reuses the package's IDX reader
    python tools/make_embedded_dataset.py            # writes nnclr_tf/assets/fashion_mnist_subset.npz

Selection (deterministic, no random numbers): for each class 0..9, the first 1,000 examples of that
class in the order of `train-images-idx3-ubyte.gz` and the first 200 of `t10k-images-idx3-ubyte.gz`,
kept in file order. The result holds 10,000 train / 2,000 test 28x28 uint8 images, stored with
`np.savez_compressed` (arrays only, loadable with `allow_pickle=False`) together with the indices
into the original files, so any example can be traced back. Running the script twice gives
a byte-identical file.
"""

import argparse
import os

import numpy as np

from nnclr_tf.data.tfds_builder import DEBIAN_DIR, embedded_path, read_idx

TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
NUM_CLASSES = 10


def first_per_class(labels, per_class):
    """Indices (sorted, in file order) of the first `per_class` examples of each class."""
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(NUM_CLASSES)]
    for c, idx in enumerate(chosen):
        if len(idx) != per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, {per_class} are needed.")
    return np.sort(np.concatenate(chosen))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", default=DEBIAN_DIR)
    parser.add_argument("--output", default=embedded_path())
    args = parser.parse_args()

    arrays = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS),
                                     ("test", "t10k", TEST_PER_CLASS)):
        images = read_idx(os.path.join(args.source_dir, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(args.source_dir, f"{prefix}-labels-idx1-ubyte.gz"))
        indices = first_per_class(labels, per_class)
        arrays[f"{split}_images"] = images[indices]
        arrays[f"{split}_labels"] = labels[indices]
        arrays[f"{split}_source_indices"] = indices.astype(np.int32)
        print(f"{split}: {len(indices)} examples, per class "
              f"{np.bincount(labels[indices], minlength=NUM_CLASSES).tolist()}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
