"""Where images come from: dataset names resolved to TFDS builders or image folders, checked up front.

Every source yields (image [H, W, C] uint8, label int32 scalar, -1 when unlabelled) in a fixed order,
so subsets and shards are reproducible. Nothing is downloaded unless `download=True`: a TFDS dataset
that is not prepared raises `DatasetNotPreparedError` at once (a plain `tfds.load` offline retries
DNS for minutes). The shipped Fashion-MNIST builder prepares itself from local files.
"""

import dataclasses
import difflib
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nnclr_tf.data import folders, jpeg, subsets, tfds_builder

ALIASES = {"embedded": f"{tfds_builder.BUILDER_NAME}/embedded",
           "fashion_mnist_full": f"{tfds_builder.BUILDER_NAME}/full"}


class DatasetNotPreparedError(ValueError):
    """A TFDS dataset is not prepared in the data directory and downloading was not requested."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one split of a dataset, known without decoding its images.

    image_shape: (height, width, channels) as delivered; height and width are None when they vary.
    skipped_files: (path, reason) of files an image folder holds that are not readable images.
    description: what this split is, in a sentence a report can show (image folders: where the
      held-out split comes from, why there are no labels); "" when there is nothing to add.
    """
    name: str
    num_examples: int
    num_classes: int
    image_shape: tuple
    class_names: tuple
    split: str = "train"
    has_labels: bool = True
    source: str = ""
    skipped_files: tuple = ()
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved dataset split: its info and how to read it.

    read(shard=None, indices=None, shuffle_seed=None) -> tf.data.Dataset of (uint8 image, int32 label):
    `indices` keeps those positions of the deterministic order, `shard=(count, index)` then keeps
    one of `count` disjoint parts, `shuffle_seed` (no indices) shuffles the order of files read.
    read(..., encoded=True) yields (encoded image, label) instead, and decode(dataset) turns such a
    dataset into (uint8 image, label): examples can be shuffled and skipped before decoding.
    labels() -> [N] int32 labels of all examples, in that order.
    decode_crops(dataset, choose, union): for sources that store JPEG (else None), turns a dataset of
    (index, encoded image, label) into (index, ((crop uint8, extra), ...), label), decoding only the
    windows that choose(index, [height, width]) -> [(window, extra), ...] picks (jpeg.decode_crops).
    """
    info: DatasetInfo
    read: object
    labels: object
    decode: object = None
    decode_crops: object = None


def _crops_decoder(contents_of, decode_channels, channels):
    """Source.decode_crops for images whose bytes contents_of(encoded) gives."""
    def decode_crops(ds, choose, union=True):
        def crops(index, encoded, label):
            pairs = jpeg.decode_crops(contents_of(encoded), lambda shape: choose(index, shape),
                                      decode_channels, union)
            return index, tuple((to_channels(crop, channels), extra) for crop, extra in pairs), label
        return ds.map(crops, num_parallel_calls=tf.data.AUTOTUNE)
    return decode_crops


def to_channels(image, channels):
    """[H, W, c] uint8 -> [H, W, channels] uint8 (RGB <-> grayscale, alpha dropped)."""
    have = image.shape[-1]
    if have in (2, 4):
        image = image[..., :have - 1]
        have -= 1
    if have == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.image.rgb_to_grayscale(image)


def is_folder(name):
    """Paths that start like paths are folders; an existing folder that is no TFDS name is too."""
    expanded = os.path.expanduser(name)
    if name.startswith((os.sep, ".", "~")):
        return True
    base = name.split("/")[0].split(":")[0]
    return os.path.isdir(expanded) and base not in tfds.list_builders(with_community_datasets=False)


def _checked_builder(name, data_dir, download):
    """tfds builder for `name`, prepared; the clear error when it cannot be without downloading."""
    base = name.split("/")[0].split(":")[0]
    known = tfds.list_builders(with_community_datasets=False)
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `tfds.list_builders()`."
        raise ValueError(f"Unknown dataset {name!r}: it is neither a TFDS name, an alias "
                         f"({', '.join(ALIASES)}) nor an existing folder; {hint}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, KeyError, AssertionError) as error:
        raise ValueError(f"Cannot load TFDS dataset {name!r}: {error}") from error
    if base == tfds_builder.BUILDER_NAME:
        if builder.builder_config.name == "full" and not builder.is_prepared():
            tfds_builder.debian_files()  # The apt-get hint, before TFDS starts.
        builder.download_and_prepare()  # Local files only; a no-op once prepared.
    elif not builder.is_prepared():
        if download:
            builder.download_and_prepare()
        else:
            raise DatasetNotPreparedError(_not_prepared_message(name, builder, data_dir))
    return builder


def _not_prepared_message(name, builder, data_dir):
    root = os.fspath(builder.data_dir_root)
    searched = root if data_dir else ", ".join(
        os.fspath(d) for d in tfds.core.utils.file_utils.list_data_dirs())
    how = (f"put the files it needs in {root}/downloads/manual (see its manual download "
           f"instructions), then run `tfds build {name} --data_dir={root}`"
           if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else
           f"run `tfds build {name} --data_dir={root}` on a machine with internet access and "
           f"copy the folder {name.split('/')[0]}/ into {root}, or pass --download (in Python: "
           "download=True)")
    elsewhere = ""
    if data_dir:
        default = tfds.builder(name)
        if default.is_prepared():
            elsewhere = f" A prepared copy exists under {default.data_dir_root}: pass that data_dir."
    if os.path.isdir(name):  # a folder that happens to have a TFDS name
        elsewhere += f" To use the folder {name!r} here instead, pass --dataset=./{name}."
    return (f"TFDS dataset {name!r} is not prepared in data_dir {searched} and nothing is "
            f"downloaded unless asked: {how}.{elsewhere}")


def _split_has_labels(features, split):
    return "label" in features and "unlabel" not in str(split)


def _tfds_source(dataset, name, split, data_dir, download, channels):
    builder = _checked_builder(name, data_dir, download)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (it has "
                         f"{', '.join(features)}); pick an image classification dataset.")
    try:
        num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r} (it has "
            f"{', '.join(builder.info.splits)}); choose one with --set data.eval_split=... "
            "(or data.train_split, data.eval_train_split).") from error
    has_labels = _split_has_labels(features, split)
    label_feature = features["label"] if "label" in features else None
    class_names = tuple(label_feature.names) if label_feature is not None else ()
    height, width, native = features["image"].shape
    channels = channels or native or 3
    info = DatasetInfo(name=dataset, num_examples=num_examples, num_classes=len(class_names),
                       image_shape=(height, width, channels), class_names=class_names,
                       split=split, has_labels=has_labels, source=f"tfds:{builder.info.full_name}")

    def to_pair(example, encoded=False):
        label = tf.cast(example["label"], tf.int32) if has_labels else tf.constant(-1, tf.int32)
        return (example["image"] if encoded else to_channels(example["image"], channels)), label

    def read(shard=None, indices=None, shuffle_seed=None, encoded=False):
        config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
        part = split
        if shard is not None and indices is None:
            part = tfds.even_splits(split, shard[0])[shard[1]]
        ds = builder.as_dataset(split=part, read_config=config,
                                shuffle_files=shuffle_seed is not None and indices is None,
                                decoders={"image": tfds.decode.SkipDecoding()} if encoded else None)
        if indices is not None:
            ds = subsets.keep_indices(ds, indices, num_examples)
            if shard is not None:
                ds = ds.shard(shard[0], shard[1])
        return ds.map(lambda example: to_pair(example, encoded),
                      num_parallel_calls=tf.data.AUTOTUNE)

    def decode(ds):
        image_feature = features["image"]
        return ds.map(lambda image, label: (
            to_channels(image_feature.decode_example(image), channels), label),
            num_parallel_calls=tf.data.AUTOTUNE)

    def labels():
        if not has_labels:
            return np.full([num_examples], -1, np.int32)
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.map(lambda ex: tf.cast(ex["label"], tf.int32)).batch(8192)
        return np.concatenate([batch.numpy() for batch in ds] or [np.zeros([0], np.int32)])

    stored_as_jpeg = (getattr(features["image"], "encoding_format", None) == "jpeg"
                      and tf.as_dtype(features["image"].dtype) == tf.uint8)
    decode_crops = (_crops_decoder(tf.identity, native or channels, channels) if stored_as_jpeg
                    else None)
    return Source(info=info, read=read, labels=labels, decode=decode, decode_crops=decode_crops)


def _folder_source(dataset, split, channels, holdout_fraction):
    scan = folders.scan_folder(dataset, split, holdout_fraction)
    channels = channels or 3
    info = DatasetInfo(name=dataset, num_examples=len(scan.paths),
                       num_classes=len(scan.class_names), image_shape=(None, None, channels),
                       class_names=scan.class_names, split=split, has_labels=scan.has_labels,
                       source=f"folder:{scan.root}", skipped_files=scan.skipped,
                       description=scan.description)

    def read(shard=None, indices=None, shuffle_seed=None, encoded=False):
        del shuffle_seed  # Files are shuffled as examples, later in the pipeline.
        positions = np.arange(len(scan.paths)) if indices is None else np.asarray(indices)
        if shard is not None:
            positions = positions[shard[1]::shard[0]]
        if encoded:  # (path, label): reading and decoding wait for decode()
            paths = np.asarray(scan.paths, dtype=object)[positions].astype(str)
            return tf.data.Dataset.from_tensor_slices((paths, scan.labels[positions]))
        ds = folders.folder_dataset(scan, positions)
        return ds.map(lambda image, label: (to_channels(image, channels), label),
                      num_parallel_calls=tf.data.AUTOTUNE)

    def decode(ds):
        ds = ds.map(lambda path, label: (
            to_channels(folders.decode_image(tf.io.read_file(path)), channels), label),
            num_parallel_calls=tf.data.AUTOTUNE)
        return ds.ignore_errors(log_warning=True)  # as folder_dataset: a bad file is left out

    decode_crops = None
    if all(p.lower().endswith((".jpg", ".jpeg")) for p in scan.paths):
        crops_of_file = _crops_decoder(tf.io.read_file, 3, channels)

        def decode_crops(ds, choose, union=True):
            # As decode(): a file that fails to decode is left out.
            return crops_of_file(ds, choose, union).ignore_errors(log_warning=True)
    return Source(info=info, read=read, labels=lambda: scan.labels.copy(), decode=decode,
                  decode_crops=decode_crops)


def resolve(dataset, split="train", data_dir=None, download=False, channels=None,
            holdout_fraction=folders.DEFAULT_HOLDOUT_FRACTION):
    """Source for a dataset name ("embedded", "fashion_mnist_full", a TFDS name, or a folder).

    holdout_fraction: the part of each class an image folder without a test/ sub-folder holds out
    as its "test" split (see folders.scan_folder); TFDS datasets have their own splits.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3 (or None for the dataset's own), got {channels}.")
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty name or folder path, got {dataset!r}.")
    if dataset in ALIASES or dataset.split("/")[0] == tfds_builder.BUILDER_NAME:
        return _tfds_source(dataset, ALIASES.get(dataset, dataset), split, data_dir, False, channels)
    if is_folder(dataset):
        return _folder_source(dataset, split, channels, holdout_fraction)
    return _tfds_source(dataset, dataset, split, data_dir, download, channels)
