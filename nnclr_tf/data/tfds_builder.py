"""The `nnclr_fashion_mnist` TFDS builder: Fashion-MNIST from files on this machine, never the network.

Two builder configs, both 28x28x1 uint8 images with the 10 Fashion-MNIST labels:
- "embedded": the class-balanced subset shipped in `nnclr_tf/assets/fashion_mnist_subset.npz`
  (10,000 train = 1,000 per class, 2,000 test = 200 per class; see assets/LICENSE and
  tools/make_embedded_dataset.py). Prepares in a few seconds.
- "full": the 60,000 / 10,000 examples of Debian's `dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist). TFDS's own `fashion_mnist` downloads from the internet and its
  checksums do not match Debian's re-compressed files, so this reads the IDX files directly.

Importing this module registers the builder with TFDS:

    import nnclr_tf.data  # or nnclr_tf.data.tfds_builder
    builder = tfds.builder("nnclr_fashion_mnist/embedded", data_dir=...)
    builder.download_and_prepare()  # offline
    ds = builder.as_dataset(split="train")  # {"image": [28, 28, 1] uint8, "label": int64}
"""

import gzip
import importlib.resources
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

BUILDER_NAME = "nnclr_fashion_mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
EMBEDDED_FILE = "fashion_mnist_subset.npz"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
_DEBIAN_PREFIX = {"train": "train", "test": "t10k"}
# What preparing a config means, for the one line said instead of TFDS's "Downloading ... Unknown size".
_PREPARING = {"embedded": "the embedded Fashion-MNIST subset (10,000 train / 2,000 test images)",
              "full": "Debian's Fashion-MNIST (60,000 train / 10,000 test images)"}
log = logging.getLogger("nnclr_tf")


def read_idx(path):
    """Reads a (gzipped) unsigned-byte IDX file into a NumPy array of its header's shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r}).")
    rank = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data[4:4 + 4 * rank], dtype=">i4"))
    array = np.frombuffer(data[4 + 4 * rank:], dtype=np.uint8)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values but its header says {shape}.")
    return array.reshape(shape)


def embedded_path():
    """Path of the shipped Fashion-MNIST subset (.npz of uint8 arrays)."""
    return os.fspath(importlib.resources.files("nnclr_tf") / "assets" / EMBEDDED_FILE)


def debian_files(source_dir=DEBIAN_DIR):
    """{split: (images path, labels path)} of Debian's Fashion-MNIST; ValueError if any is missing."""
    files = {split: tuple(os.path.join(source_dir, f"{prefix}-{kind}-idx{rank}-ubyte.gz")
                          for kind, rank in (("images", 3), ("labels", 1)))
             for split, prefix in _DEBIAN_PREFIX.items()}
    missing = [p for pair in files.values() for p in pair if not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"The full Fashion-MNIST needs Debian's files in {source_dir}, but {missing[0]} is "
            "missing; install them with `apt-get install dataset-fashion-mnist` or use the "
            "dataset 'embedded'.")
    return files


def load_split_arrays(config_name, split):
    """(images [N, 28, 28] uint8, labels [N] uint8) of one split of one config, from local files."""
    if config_name == "embedded":
        with np.load(embedded_path(), allow_pickle=False) as arrays:
            return arrays[f"{split}_images"], arrays[f"{split}_labels"]
    images_path, labels_path = debian_files()[split]
    return read_idx(images_path), read_idx(labels_path)


class NnclrFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Zalando, MIT licence) from files already on this machine."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Embedded 10k/2k subset and Debian's full 60k/10k."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="embedded",
            description="Class-balanced subset shipped with nnclr_tf: 1,000 train and 200 test "
                        "images per class."),
        tfds.core.BuilderConfig(
            name="full",
            description="All 60,000 train / 10,000 test images, read from Debian's "
                        "dataset-fashion-mnist package."),
    ]
    DEFAULT_CONFIG_NAME = "embedded"

    def _info(self):
        return self.dataset_info_from_configs(
            description="Fashion-MNIST: 28x28 grayscale images of 10 kinds of clothing "
                        "(Xiao, Rasul and Vollgraf, 2017).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            license="MIT",
            citation="@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset for "
                     "Benchmarking Machine Learning Algorithms}, author={Xiao, Han and Rasul, "
                     "Kashif and Vollgraf, Roland}, journal={arXiv:1708.07747}, year={2017}}",
        )

    def _log_download_bytes(self):
        # TFDS prints "Downloading and preparing dataset Unknown size ..." here; nothing is downloaded.
        log.info("Preparing %s in %s (once; later runs read it from there).",
                 _PREPARING[self.builder_config.name], self.data_dir)

    def _log_download_done(self):
        pass  # The line above said it all.

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local: nothing is downloaded.
        if self.builder_config.name == "full":
            debian_files()  # Fail with the install hint before any work.
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        images, labels = load_split_arrays(self.builder_config.name, split)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[:, :, None], "label": int(label)}
