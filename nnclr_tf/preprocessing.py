"""Evaluation preprocessing: the one definition the data pipeline and the export both call.

    images = resize_and_centre_crop(images_float01, 224)  # [B, H, W, C] or [H, W, C]

A photo larger than the network input (ImageNet, an image folder) has its shorter side resized to
image_size / 0.875 (256 for 224, 73 for 64) and the centre image_size square kept: the standard
ImageNet evaluation crop, at any size. An image whose shorter side is at most image_size (CIFAR-10,
Fashion-MNIST, STL-10 at 96, Fashion-MNIST upsampled to 56) is resized whole, shorter side to
image_size, and its centre square kept: these datasets frame the object tightly and were pretrained
from their full frame, so a 12.5 % margin would cut the object; an image already image_size square
is passed through untouched.
"""

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875  # ImageNet's 224 / 256


def resize_and_centre_crop(images, image_size, crop_fraction=EVAL_CROP_FRACTION):
    """Float images in [0, 1], [H, W, C] or [batch, H, W, C] -> [..., image_size, image_size, C].

    Bilinear with antialiasing (so downscaling averages, as PIL's bilinear does); the result is
    clipped to [0, 1] against resampling overshoot.
    """
    images = tf.convert_to_tensor(images)  # NumPy arrays too
    if tuple(images.shape[-3:-1]) == (image_size, image_size):
        return images
    shape = tf.shape(images)
    rank = images.shape.rank
    height = tf.cast(shape[rank - 3], tf.float32)
    width = tf.cast(shape[rank - 2], tf.float32)
    shorter = tf.minimum(height, width)
    target = tf.where(shorter > image_size, image_size / crop_fraction, float(image_size))
    scale = tf.round(target) / shorter
    # max() keeps the shorter side at least image_size despite rounding.
    new_height = tf.maximum(image_size, tf.cast(tf.round(height * scale), tf.int32))
    new_width = tf.maximum(image_size, tf.cast(tf.round(width * scale), tf.int32))
    images = tf.image.resize(images, tf.stack([new_height, new_width]), method="bilinear",
                             antialias=True)
    top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
    images = images[..., top:top + image_size, left:left + image_size, :]
    images.set_shape(images.shape[:-3].concatenate([image_size, image_size, images.shape[-1]]))
    return tf.clip_by_value(images, 0.0, 1.0)
