"""What `collection.embed` reads: a folder, image files, uint8 arrays of mixed sizes, a
tf.data.Dataset or a TFDS split, each as ids (stable across runs, so a rerun can skip them),
labels, and a tf.data.Dataset of (id, uint8 image [H, W, C], label) for any subset of positions.

    items = items_of("~/photos", split=None, data_dir=None)
    items.ids[:2], items.skipped        # ["cats/1.jpg", ...], [("cats/bad.jpg", "truncated JPEG ...")]
    ds = items.dataset(np.arange(10))   # the first ten, decoded
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from nnclr_tf.data import folders


@dataclasses.dataclass
class Items:
    """What to embed: `ids` [N] str in order, `labels` [N] int32, and `dataset(keep)`, a
    tf.data.Dataset of (id, uint8 image [H, W, C], label) for the positions `keep`."""
    ids: list
    labels: np.ndarray
    dataset: object
    info: dict
    skipped: list


def _folder_items(root, paths=None):
    root = os.path.expanduser(root)
    if paths is None:
        scan = folders.scan_folder(root, split="all")
        paths, labels, skipped = list(scan.paths), scan.labels, list(scan.skipped)
        class_names = list(scan.class_names)
    else:  # a list of files: checked the same way, unlabelled
        skipped, kept = [], []
        for p in paths:
            try:
                reason = folders._check_file(p)
            except OSError as error:
                reason = f"unreadable ({error.strerror or error})"
            (kept.append(p) if reason is None else skipped.append((p, reason)))
        paths, labels, class_names = kept, np.full([len(kept)], -1, np.int32), []
    ids = [os.path.relpath(p, root) if root else p for p in paths]
    skipped = [(os.path.relpath(p, root) if root else p, r) for p, r in skipped]
    files = np.asarray(paths, dtype=object).astype(str) if paths else np.zeros([0], str)

    def dataset(keep):
        ds = tf.data.Dataset.from_tensor_slices(
            (np.asarray(ids, dtype=object)[keep].astype(str), files[keep], labels[keep]))
        return ds.map(lambda i, p, y: (i, folders.decode_image(tf.io.read_file(p)), y),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    info = {"source": f"folder:{root}" if root else "files", "root": root or None,
            "class_names": class_names}
    return Items(ids, np.asarray(labels, np.int32), dataset, info, skipped)


def _array_items(images, labels=None):
    images = list(images)
    labels = np.full([len(images)], -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    ids = [str(i) for i in range(len(images))]
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(f"Image {i} has dtype {image.dtype} and shape {image.shape}; expected "
                             "uint8 [height, width, 1 or 3] (any height and width).")

    def dataset(keep):
        def generate():
            for position in keep:
                yield ids[position], np.asarray(images[position]), labels[position]
        return tf.data.Dataset.from_generator(generate, output_signature=(
            tf.TensorSpec([], tf.string), tf.TensorSpec([None, None, None], tf.uint8),
            tf.TensorSpec([], tf.int32)))

    return Items(ids, labels, dataset, {"source": "arrays", "class_names": []}, [])


def _tfds_items(name, split, data_dir):
    from nnclr_tf.data import sources
    source = sources.resolve(name, split, data_dir=data_dir)
    count = source.info.num_examples
    ids = [f"{split}/{i}" for i in range(count)]
    labels = source.labels()

    def dataset(keep):
        ds = source.read(indices=keep) if len(keep) < count else source.read()
        names = tf.data.Dataset.from_tensor_slices(np.asarray(ids, dtype=object)[keep].astype(str))
        return tf.data.Dataset.zip(names, ds).map(lambda i, pair: (i, pair[0], pair[1]))

    info = {"source": f"tfds:{name}/{split}", "data_dir": data_dir,
            "class_names": list(source.info.class_names)}
    return Items(ids, labels, dataset, info, [])


def _dataset_items(ds):
    """A tf.data.Dataset of images or (image, label) or {"image", "label"}: read once, in order."""
    images, labels = [], []
    for element in ds.as_numpy_iterator():
        if isinstance(element, dict):
            element = (element["image"], element.get("label", -1))
        image, label = element if isinstance(element, tuple) else (element, -1)
        images.append(image)
        labels.append(int(label))
    return _array_items(images, labels)


def items_of(source, split, data_dir):
    if isinstance(source, tf.data.Dataset):
        return _dataset_items(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if os.path.isdir(path):
            return _folder_items(path)
        if os.path.sep in path or os.path.exists(path):
            raise ValueError(f"Image folder {os.fspath(source)!r} does not exist; pass an existing "
                             "folder (or a TFDS name with --split).")
        return _tfds_items(path, split, data_dir)
    source = list(source)
    if source and all(isinstance(s, (str, os.PathLike)) for s in source):
        return _folder_items("", [os.fspath(s) for s in source])
    return _array_items(source)
