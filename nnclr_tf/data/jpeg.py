"""Decoding only the crops of a JPEG that training uses (`tf.image.decode_and_crop_jpeg`).

    from nnclr_tf.augment import view_augmenter
    view_1, view_2 = view_augmenter(1, image_size=32), view_augmenter(2, image_size=32)
    contents = tf.io.encode_jpeg(tf.fill([375, 500, 3], tf.constant(128, tf.uint8)))  # file bytes
    seed_1, seed_2 = tf.constant([0, 1]), tf.constant([0, 2])  # one per view and image
    choose = lambda shape: [view_1.crop_window(shape, seed_1), view_2.crop_window(shape, seed_2)]
    (crop_1, box_1), (crop_2, box_2) = decode_crops(contents, choose, union=True)
    views = view_1(crop_1, seed=seed_1, crop_box=box_1), view_2(crop_2, seed=seed_2, crop_box=box_2)
    # = view_1(whole image, seed=seed_1), view_2(whole image, seed=seed_2)

The windows are drawn from the image's size, read from the JPEG header, before any pixel is
decoded. Bytes that are not a JPEG (a PNG named .jpg) are decoded whole and cut to the same windows.
"""

import tensorflow as tf

from nnclr_tf.config import JPEG_DECODES  # noqa: F401  (the names; re-exported)

# pretraining_dataset(jpeg_decode=...): "full" decodes the whole image and crops it (the path of
# every other format), "crops" decodes each view's window on its own, "union" decodes once the
# smallest window holding both. benchmarks/input_pipeline.py measures them (BUILD.md): entropy
# decoding, which a window saves only below its bottom row, dominates, so for two views none of
# them costs measurably less CPU than "full", the default (data.jpeg_decode in the config).
# JPEG_DECODES, imported above from nnclr_tf.config, names them.


def _cut(image, window):
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])


def decode_crops(contents, choose, channels=3, union=True):
    """Decodes the windows `choose` picks from one encoded image.

    Args:
      contents: scalar string, the encoded image (JPEG; any tf.io.decode_image format works).
      choose: function of the image's [height, width] (int32) returning a list of (window [4]
        int32 (top, left, height, width), extra); `extra` is handed back untouched.
      channels: channels to decode (1 or 3).
      union: decode the smallest window holding all windows once and cut them from it; else
        decode each window on its own (each costs its rows' entropy decoding again).

    Returns:
      A list of (crop [height, width, channels] uint8, extra), one per window.
    """
    is_jpeg = tf.io.is_jpeg(contents)

    def decode_whole():
        return tf.io.decode_image(contents, channels=channels, expand_animations=False,
                                  dtype=tf.uint8)

    # The windows are drawn outside tf.cond: in a tf.data function a cond runs both branches'
    # ops (the untaken one as dead tensors), which doubled the CPU cost of drawing them.
    shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(contents)[:2],
                    lambda: tf.shape(decode_whole())[:2])  # not a JPEG: decoded twice (rare)
    picks = choose(shape)
    windows = [window for window, _ in picks]
    if union and len(windows) > 1:
        top_left = tf.reduce_min(tf.stack([w[:2] for w in windows]), axis=0)
        bottom_right = tf.reduce_max(tf.stack([w[:2] + w[2:] for w in windows]), axis=0)
        decoded = [tf.concat([top_left, bottom_right - top_left], 0)]
        cuts = [tf.concat([w[:2] - top_left, w[2:]], 0) for w in windows]
    else:
        decoded, cuts = windows, [None] * len(windows)
    images = [tf.cond(is_jpeg,
                      lambda w=w: tf.image.decode_and_crop_jpeg(contents, w, channels=channels),
                      lambda w=w: _cut(decode_whole(), w)) for w in decoded]
    crops = [_cut(images[0], cut) for cut in cuts] if union and len(windows) > 1 else images
    pairs = [(crop, extra) for crop, (_, extra) in zip(crops, picks)]
    for crop, _ in pairs:
        crop.set_shape([None, None, channels])
    return list(pairs)
