"""Datasets for NNCLR: TFDS names, image folders and the shipped Fashion-MNIST subset.

    from nnclr_tf import data
    info = data.dataset_info("embedded")                  # 10,000 train images, 10 classes
    train = data.pretraining_dataset("embedded", batch_size=256, image_size=28)
    test = data.evaluation_dataset("embedded", "test", image_size=28)

Dataset names: "embedded" (TFDS `nnclr_fashion_mnist/embedded`, shipped, offline),
"fashion_mnist_full" (`nnclr_fashion_mnist/full`, Debian's dataset-fashion-mnist), any prepared TFDS
name ("cifar10", "stl10", "imagenet2012", ...), or a folder of class sub-folders (without a test/
sub-folder, a fixed `holdout_fraction` of each class is its "test" split, the rest "train").
Importing this package registers the `nnclr_fashion_mnist` TFDS builder.
"""

from nnclr_tf.data.folders import FolderScan, scan_folder
from nnclr_tf.data.pipeline import (dataset_info, evaluation_dataset, load_arrays,
                                    pretraining_dataset, resize_and_centre_crop)
from nnclr_tf.data.sources import ALIASES, DatasetInfo, DatasetNotPreparedError
from nnclr_tf.data.subsets import balanced_subset
from nnclr_tf.data.tfds_builder import CLASS_NAMES as FASHION_MNIST_CLASS_NAMES
from nnclr_tf.data.tfds_builder import NnclrFashionMnist

__all__ = [
    "ALIASES", "DatasetInfo", "DatasetNotPreparedError", "FASHION_MNIST_CLASS_NAMES",
    "FolderScan", "NnclrFashionMnist", "balanced_subset", "dataset_info", "evaluation_dataset",
    "load_arrays", "pretraining_dataset", "resize_and_centre_crop", "scan_folder",
]
