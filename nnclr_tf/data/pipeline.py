"""tf.data pipelines: two augmented views for pretraining, resized images for evaluation.

    ds = pretraining_dataset("embedded", batch_size=256, image_size=28)
    batch = next(iter(ds))  # {"view_1": [256, 28, 28, 1], "view_2": ..., "label": [256]}
    model.fit(ds, steps_per_epoch=dataset_info("embedded").num_examples // 256)

Under tf.distribute, pass the `input_context` that `strategy.distribute_datasets_from_function` gives:
each input pipeline then reads a disjoint part of the split and batches the per-replica batch size.
"""

import numpy as np
import tensorflow as tf

from nnclr_tf.data import folders, jpeg, sources, subsets
from nnclr_tf.preprocessing import resize_and_centre_crop  # noqa: F401 (also exported here)

EVAL_AUGMENTATIONS = (None, "crop_flip")
_CACHE_LIMIT_BYTES = 512 * 2**20  # Decoded uint8 images below this size stay in memory.
_ENDLESS = 2**62  # epochs: a stream that never ends in practice
_IMAGENET_SUBSETS = {0.01: "imagenet2012_subset/1pct", 0.1: "imagenet2012_subset/10pct"}
_HOLDOUT = folders.DEFAULT_HOLDOUT_FRACTION


def _sharding(input_context, batch_size):
    """(shard or None, per-pipeline batch size) for an optional tf.distribute.InputContext."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if input_context is None:
        return None, batch_size
    per_replica = input_context.get_per_replica_batch_size(batch_size)
    if input_context.num_input_pipelines > 1:
        return (input_context.num_input_pipelines, input_context.input_pipeline_id), per_replica
    return None, per_replica


def _check_enough(info, count, batch_size, per_pipeline_batch, shard, batch_flag="--batch_size"):
    """batch_flag: how a user sets this batch size (pretraining: --batch_size)."""
    if count == 0:
        raise ValueError(f"Dataset {info.name!r} split {info.split!r} has no images; check "
                         "--dataset, its split (--set data.eval_split=...) and label fraction.")
    if count < batch_size:
        raise ValueError(f"Dataset {info.name!r} split {info.split!r} has {count} images, fewer "
                         f"than one global batch of {batch_size}; lower {batch_flag} or add images.")
    if shard is not None and count // shard[0] < per_pipeline_batch:
        raise ValueError(f"Each of the {shard[0]} input pipelines gets about {count // shard[0]} of "
                         f"the {count} images, fewer than its batch of {per_pipeline_batch}; lower "
                         f"{batch_flag}.")


def _view_augmenters(image_size, augment, channels, crop_scale, seed):
    # Imported here so that the data package does not need the augmentation module to load.
    from nnclr_tf import augment as augment_lib  # pylint: disable=import-outside-toplevel
    return tuple(augment_lib.view_augmenter(view, image_size, preset=augment, channels=channels,
                                            crop_scale=tuple(crop_scale), seed=seed)
                 for view in (1, 2))


def _fits_in_memory(info, count):
    height, width, channels = info.image_shape
    return bool(height and width and count * height * width * channels <= _CACHE_LIMIT_BYTES)


def _maybe_cache(ds, info, count):
    return ds.cache() if _fits_in_memory(info, count) else ds


def pretraining_dataset(dataset="embedded", split="train", data_dir=None, batch_size=256,
                        image_size=32, augment="byol", crop_scale=(0.08, 1.0), with_labels=True,
                        input_context=None, shuffle_buffer=10_000, seed=0, download=False,
                        channels=None, initial_step=0, holdout_fraction=_HOLDOUT,
                        jpeg_decode="full"):
    """Endless, shuffled batches of two augmented views of each image.

    Returns a tf.data.Dataset of {"view_1": [B, S, S, C] float32 in [0, 1], "view_2": same,
    "label": [B] int32 (only with with_labels=True and a labelled split)}, B = the per-replica
    batch size under an input_context (batch_size is global), else batch_size; S = image_size.
    channels: 1 or 3, default the dataset's own (1 for Fashion-MNIST, 3 for folders).

    The stream is a function of (seed, step) alone, drawn with stateless random ops: data epoch e
    is the split shuffled by a seed folded from (seed, e), and the views of step t's batch come
    from a seed folded from (seed, t). So `initial_step=t` yields exactly batches t, t+1, ... of
    `initial_step=0` (a resumed run sees the data an uninterrupted one would), and gets there
    without augmenting what it skips: whole epochs cost nothing, the rest of one is read only.
    holdout_fraction: what an image folder without test/ holds out of "train" (folders.scan_folder).

    jpeg_decode: for images of varying size stored as JPEG (TFDS datasets such as imagenet2012,
    folders of .jpg/.jpeg files), "union" or "crops" decode only the views' crop windows
    (tf.image.decode_and_crop_jpeg), drawn from the size in the JPEG header: "union" once for the
    window holding both, "crops" once per view. The views are those of "full" (same draws, same
    sampled points; equal to 1e-5). "full" decodes whole images: with two views per image it
    costs no more CPU than either (BUILD.md, "ImageNet on 8 GPUs or a TPU pod").
    """
    if not isinstance(initial_step, (int, np.integer)) or initial_step < 0:
        raise ValueError(f"initial_step must be an integer >= 0, got {initial_step!r}.")
    if jpeg_decode not in jpeg.JPEG_DECODES:
        raise ValueError(f"jpeg_decode must be one of {jpeg.JPEG_DECODES}, got {jpeg_decode!r}.")
    source = sources.resolve(dataset, split, data_dir, download, channels, holdout_fraction)
    info = source.info
    shard, local_batch = _sharding(input_context, batch_size)
    _check_enough(info, info.num_examples, batch_size, local_batch, shard)
    channels = info.image_shape[-1]
    augment_1, augment_2 = _view_augmenters(image_size, augment, channels, crop_scale, seed)
    keep_labels = with_labels and info.has_labels
    # One stateless key per input pipeline, so that pipelines draw different views.
    key = tf.constant([seed, shard[1] if shard else 0], tf.int64)

    count = _pipeline_count(source, info, shard)
    first_epoch, offset = divmod(int(initial_step) * local_batch, count)
    in_memory = _fits_in_memory(info, count)
    ds = _shuffled_epochs(source, shard, in_memory, key, shuffle_buffer, seed, first_epoch)
    ds = ds.skip(offset)  # within one epoch: cached images, else still encoded; never augmented
    varying_size = not (info.image_shape[0] and info.image_shape[1])
    if (not in_memory and varying_size and source.decode_crops is not None
            and jpeg_decode != "full"):
        return _views_of_jpeg_crops(ds, source, (augment_1, augment_2), key, keep_labels,
                                    local_batch, initial_step, jpeg_decode == "union", shard)
    if not in_memory:
        ds = source.decode(ds)

    def two_views(index, images, labels):
        # [H, W, C] or [B, H, W, C]: the augmenters draw every random choice per image either way.
        images = tf.image.convert_image_dtype(images, tf.float32)
        index_key = tf.random.fold_in(key, index)
        views = {"view_1": augment_1(images, seed=tf.random.fold_in(index_key, 1)),
                 "view_2": augment_2(images, seed=tf.random.fold_in(index_key, 2))}
        if keep_labels:
            views["label"] = labels
        return views

    if info.image_shape[0] and info.image_shape[1]:
        # Same-size images: augmenting whole batches is several times faster than one by one.
        # Batch t of the stream is augmented with seeds from t.
        ds = ds.batch(local_batch, drop_remainder=True)
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(initial_step), ds)
    else:
        # One by one: element i of the stream (batch i // B) is augmented with seeds from i.
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(initial_step * local_batch), ds)
    ds = ds.map(lambda index, example: two_views(index, *example),
                num_parallel_calls=tf.data.AUTOTUNE)
    if not (info.image_shape[0] and info.image_shape[1]):
        ds = ds.batch(local_batch, drop_remainder=True)
    return ds.with_options(_options(shard)).prefetch(tf.data.AUTOTUNE)


def _views_of_jpeg_crops(ds, source, augmenters, key, keep_labels, local_batch, initial_step,
                         union, shard):
    """pretraining_dataset's views of still-encoded JPEG examples, decoding only their crops.

    Element i (counted as the whole-image path counts, one by one) draws each view's window with
    the seed that view's augmenter is then called with, so the views are the whole-image path's.
    """
    def seeds(index):
        index_key = tf.random.fold_in(key, index)
        return [tf.random.fold_in(index_key, view) for view in (1, 2)]

    def choose(index, shape):
        return [augmenter.crop_window(shape, seed=seed)
                for augmenter, seed in zip(augmenters, seeds(index))]

    def two_views(index, crops, labels):
        views = {f"view_{view}": augmenter(tf.image.convert_image_dtype(crop, tf.float32),
                                           seed=seed, crop_box=box)
                 for view, augmenter, seed, (crop, box)
                 in zip((1, 2), augmenters, seeds(index), crops)}
        if keep_labels:
            views["label"] = labels
        return views

    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(initial_step * local_batch), ds)
    ds = ds.map(lambda index, example: (index, *example))
    ds = source.decode_crops(ds, choose, union)
    ds = ds.map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.with_options(_options(shard)).prefetch(tf.data.AUTOTUNE)


def _pipeline_count(source, info, shard):
    """Examples one input pipeline reads per epoch."""
    if shard is None:
        return info.num_examples
    known = int(source.read(shard=shard).cardinality())  # TFDS knows it without reading
    # Folders: every count-th file from the pipeline's index (as the folder source shards).
    return known if known > 0 else len(range(shard[1], info.num_examples, shard[0]))


def _shuffled_epochs(source, shard, in_memory, key, shuffle_buffer, seed, first_epoch):
    """(image, label) examples, epoch after epoch from `first_epoch`, never ending; the images
    are decoded when `in_memory` (cached after the first read), else still encoded.

    Epoch e's order depends on (key, e) only, never on how many epochs this process has read
    before, so a stream that starts at epoch e matches one that got there.
    """
    cached = source.read(shard=shard, shuffle_seed=seed).cache() if in_memory else None

    @tf.autograph.experimental.do_not_convert
    def epoch(index):
        # Traced in its own graph: this sets that graph's seed only, so that the shuffles below
        # depend on the epoch seed alone, not on the global seed (and a global seed of 0 does not
        # trip tf.data's check on tensor seeds).
        tf.random.set_seed(1)
        epoch_seed = tf.random.stateless_uniform(  # a full-range int64 from (key, epoch)
            [], tf.random.fold_in(key, index), minval=None, maxval=None, dtype=tf.int64)
        # Uncached data is read again each epoch, its files in an order from the epoch's seed.
        examples = cached if in_memory else source.read(shard=shard, shuffle_seed=epoch_seed,
                                                        encoded=True)
        if shuffle_buffer > 1:
            examples = examples.shuffle(shuffle_buffer, seed=epoch_seed,
                                        reshuffle_each_iteration=False)
        return examples

    return tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(epoch)


def _options(shard):
    options = tf.data.Options()
    if shard is not None:  # Already split per input pipeline: no second sharding by tf.distribute.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def random_crop_flip(image, image_size, scale=(0.08, 1.0)):
    """Random resized crop (area fraction `scale`, aspect 3/4..4/3) and left-right flip, [H, W, C]."""
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), area_range=scale,
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    return tf.clip_by_value(tf.image.random_flip_left_right(image), 0.0, 1.0)


def _evaluation_source(dataset, split, data_dir, label_fraction, seed, download, channels,
                       holdout_fraction):
    """(source, subset indices or None); ImageNet's official 1 % / 10 % subsets when they apply."""
    subset_name = _IMAGENET_SUBSETS.get(label_fraction)
    if label_fraction is not None and dataset == "imagenet2012" and split == "train" and subset_name:
        return sources.resolve(subset_name, split, data_dir, download, channels), None
    source = sources.resolve(dataset, split, data_dir, download, channels, holdout_fraction)
    if label_fraction is None:
        return source, None
    subsets.subset_size(label_fraction, source.info.num_examples)  # Fail before reading labels.
    return source, subsets.balanced_subset(source.labels(), label_fraction, seed)


def evaluation_dataset(dataset, split, data_dir=None, batch_size=256, image_size=32,
                       label_fraction=None, seed=0, augment=None, input_context=None,
                       repeat=False, shuffle=False, download=False, channels=None,
                       shuffle_buffer=10_000, holdout_fraction=_HOLDOUT):
    """Batches of (images [B, S, S, C] float32 in [0, 1], labels [B] int32; -1 when unlabelled).

    Images are resized (shorter side to S, centre square) or, with augment="crop_flip", randomly
    cropped and flipped (for training a linear classifier). label_fraction keeps a seeded,
    class-balanced subset of exactly round(fraction * N) examples (ImageNet: the official TFDS
    `imagenet2012_subset` for 0.01 / 0.1), and at least one example per class. The last batch is
    partial unless repeat=True; without repeat the dataset's cardinality (batches) is known, so
    Keras' fit and learning-rate schedules can count its steps. holdout_fraction: the part of each
    class an image folder without test/ holds out as "test" (the same in every call of a run).
    """
    if augment not in EVAL_AUGMENTATIONS:
        raise ValueError(f"Evaluation augment must be one of {EVAL_AUGMENTATIONS}, got {augment!r}.")
    source, indices = _evaluation_source(dataset, split, data_dir, label_fraction, seed, download,
                                         channels, holdout_fraction)
    info = source.info
    shard, local_batch = _sharding(input_context, batch_size)
    count = info.num_examples if indices is None else len(indices)
    if repeat:
        _check_enough(info, count, batch_size, local_batch, shard,
                      "--set eval.linear_batch_size=...")
    elif count == 0:
        _check_enough(info, count, 1, 1, None)

    ds = source.read(shard=shard, indices=indices, shuffle_seed=seed if shuffle else None)
    local_count = len(range(shard[1], count, shard[0])) if shard else count
    if ds.cardinality() < 0:
        # A filtered subset, or a folder whose undecodable files are skipped: give it its length.
        # A file that passed the scan but fails to decode (rare; logged) is then stood in for by
        # the first images again, so evaluation never stops on it nor runs short of its steps.
        ds = ds.repeat().take(local_count)
    ds = _maybe_cache(ds, info, local_count)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def prepare(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if augment == "crop_flip":
            return random_crop_flip(image, image_size), label
        return resize_and_centre_crop(image, image_size), label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=repeat)
    return ds.with_options(_options(shard)).prefetch(tf.data.AUTOTUNE)


def dataset_info(dataset, split="train", data_dir=None, download=False, channels=None,
                 holdout_fraction=_HOLDOUT):
    """DatasetInfo(name, num_examples, num_classes, image_shape, class_names, description, ...) of
    one split, without decoding images (folders are scanned; the embedded set is prepared on first
    use)."""
    return sources.resolve(dataset, split, data_dir, download, channels, holdout_fraction).info


def load_arrays(dataset, split, data_dir=None, image_size=None, limit=None, download=False,
                channels=None, holdout_fraction=_HOLDOUT):
    """(images [N, H, W, C] uint8, labels [N] int32; -1 when unlabelled) of the first `limit`
    examples in the split's fixed order; image_size resizes (and centre-crops) to a square."""
    source = sources.resolve(dataset, split, data_dir, download, channels, holdout_fraction)
    height, width, _ = source.info.image_shape
    if image_size is None and not (height and width):
        raise ValueError(f"Images of {dataset!r} differ in size; pass image_size to load_arrays.")
    ds = source.read()
    if limit is not None:
        ds = ds.take(limit)
    if image_size is not None:
        def resize(image, label):
            image = resize_and_centre_crop(tf.image.convert_image_dtype(image, tf.float32),
                                           image_size)
            return tf.image.convert_image_dtype(image, tf.uint8, saturate=True), label
        ds = ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    for image_batch, label_batch in ds.batch(1024).prefetch(2):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    if not images:
        raise ValueError(f"Dataset {dataset!r} split {split!r} has no images to load.")
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)
