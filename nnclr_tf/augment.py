"""BYOL-style view pipelines (the paper's augmentations) as Keras layers.

    import tensorflow as tf
    images = tf.random.uniform([8, 32, 32, 3])                 # floats in [0, 1]
    view_1 = view_augmenter(1, image_size=32, preset="byol")   # blur p 1.0, solarize p 0.0
    view_2 = view_augmenter(2, image_size=32, preset="byol")   # blur p 0.1, solarize p 0.2
    batch = {"view_1": view_1(images), "view_2": view_2(images)}  # choices drawn per image
    # A dataset of images (or (images, labels)) -> ((view_1, view_2)[, labels]) for model.fit,
    # reproducible under any parallelism:
    ds = map_views(tf.data.Dataset.from_tensor_slices(images).batch(4), view_1, view_2, seed=0)

Every layer takes float images in [0, 1] (`ViewAugmenter`: uint8, or floats in its `value_range`),
[H, W, C] or [batch, H, W, C], and draws its randomness per image from its own
`tf.random.Generator`, seeded from the constructor's `seed` or else from Python's `random` (so
`keras.utils.set_random_seed` fixes it, as it fixes Keras' own layers). Not from Keras core's
`SeedGenerator`: it reads and then advances its state in two ops, so parallel `tf.data.map` calls
reuse seeds (14 % of 20,000 draws here), whereas the generator's read-and-skip is atomic. With
`training=False` the layers leave pixels unchanged and `RandomResizedCrop` resizes the whole image.

Reproducible views: pass `seed=` to the call (a [2] int tensor, e.g. `tf.random.fold_in([seed,
0], step)`); the per-image choices then come from stateless ops, so the output is a function of
the images and that seed alone, whatever order parallel `map` calls run in. `map_views` does this
per dataset element, as the pretraining pipeline does per step (a resumed run sees the views an
uninterrupted one would): `view_1(images, seed=tf.constant([7, 42]))`. A layer's own generator
(constructor `seed=` or `set_random_seed`) repeats only when calls come in the same order: eager
calls, or `map` without `num_parallel_calls`; under `num_parallel_calls` the calls take its draws
in whatever order they run.
"""

import math
import random

import keras
import tensorflow as tf

# Per-view probabilities of each random stage; a stage with probability 0 is left out. "byol" is
# the paper's (BYOL's) asymmetric set, "cifar" drops blur (the usual setting at 32x32), "crops" is
# the paper's crops-only ablation. Crops are always applied.
VIEW_PRESETS = {
    "byol": {
        1: {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2, "blur": 1.0, "solarize": 0.0},
        2: {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2, "blur": 0.1, "solarize": 0.2}},
    "cifar": {
        1: {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2, "blur": 0.0, "solarize": 0.0},
        2: {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2, "blur": 0.0, "solarize": 0.2}},
    "crops": {1: {"flip": 0.5}, 2: {"flip": 0.5}},
}
# BYOL's colour jitter at strength 1: brightness offset, contrast and saturation factors 1 +- the
# value, hue offset (fraction of the colour circle).
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
_LUMA = (0.2989, 0.587, 0.114)  # tf.image.rgb_to_grayscale weights


def _check(ok, message):
    if not ok:
        raise ValueError(message)


def _stitch(indices, parts, like):
    """Reassembles `tf.dynamic_partition` parts in batch order, keeping `like`'s static shape."""
    return tf.ensure_shape(tf.dynamic_stitch(indices, parts), like.shape)


def _generator(seed):
    # Python's RNG is seeded with the rest by keras.utils.set_random_seed, and from the OS
    # otherwise: an unseeded layer is then reproducible exactly when Keras' own layers are.
    return tf.random.Generator.from_seed(random.getrandbits(62) if seed is None else seed)


class _ImageLayer(keras.layers.Layer):
    """Shared plumbing: rank-3 or rank-4 float32 input, a per-layer thread-safe random generator.

    Subclasses implement `_augment(images [batch, H, W, C]) -> [batch, H', W', C]`.
    """

    _random = True  # False for layers that draw nothing (no generator is made)

    def __init__(self, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # views stay float32 under a mixed-precision policy
        super().__init__(**kwargs)
        self.seed = seed
        # Made here, not in build: build may run inside a tf.data function, where variables cannot
        # be created. The generator state is not a model weight (it is not saved).
        self._rng = None
        if self._random:
            with tf.init_scope():
                self._rng = _generator(seed)

    def call(self, images, training=True, seed=None):
        """seed: optional [2] int tensor; draws stateless randomness from it instead of the
        layer's generator (see the module docstring)."""
        images = self._as_float(tf.convert_to_tensor(images))
        rank = images.shape.rank
        _check(rank in (3, 4), f"{self.name} got images of shape {images.shape}; expected "
               "[H, W, C] or [batch, H, W, C], so add or remove the batch axis.")
        batch = images if rank == 4 else images[tf.newaxis]
        # Set for the duration of this call only: _uniform and _child_seed derive from it.
        self._call_seed = None if seed is None else tf.cast(seed, tf.int64)
        self._draws = 0
        try:
            batch = self._augment(batch) if training else self._inference(batch)
        finally:
            self._call_seed = None
        return batch if rank == 4 else batch[0]

    def build(self, input_shape):
        pass  # no weights; sublayers build on their first call

    def _as_float(self, images):
        return tf.cast(images, tf.float32)

    def _inference(self, images):
        return images

    def _uniform(self, images, shape=(), minval=0.0, maxval=1.0):
        """[batch, *shape] uniform draws, one row per image."""
        # A static batch size where known keeps shapes static for tf.data's graph optimiser.
        batch = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
        if getattr(self, "_call_seed", None) is None:
            return self._rng.uniform([batch, *shape], minval, maxval)
        # Draw i of a seeded call: its own stateless stream, folded from the call's seed.
        self._draws += 1
        seed = tf.random.fold_in(tf.random.fold_in(self._call_seed, 0), self._draws)
        return tf.random.stateless_uniform([batch, *shape], seed, minval, maxval)

    def _child_seed(self, index):
        """The seed for the sublayer call `index` of this call: None unless the call is seeded."""
        if getattr(self, "_call_seed", None) is None:
            return None
        return tf.random.fold_in(tf.random.fold_in(self._call_seed, 1), index)

    def _call_child(self, layer, images, index, **kwargs):
        """Calls a sublayer, handing on a derived seed when it takes one (Keras core layers don't)."""
        seed = self._child_seed(index)
        if seed is None or not isinstance(layer, _ImageLayer):
            return layer(images, **kwargs)
        return layer(images, seed=seed, **kwargs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="nnclr_tf")
class RandomResizedCrop(_ImageLayer):
    """Inception-style crop: a box of area fraction in `scale`, aspect in `ratio`, resized.

    [batch, H, W, C] -> [batch, size, size, C]. Each image tries `attempts` (area, log-aspect) draws
    and keeps its first box that fits; if none fits it takes the centre crop with the aspect clamped
    to `ratio` (torchvision's and BYOL's fallback). Boxes are continuous, so a box's area fraction
    lies in `scale` and its width/height ratio in `ratio` exactly. All boxes go to one
    `tf.image.crop_and_resize` call. Keras core has no resized crop, and `RandomCrop` draws one
    offset per batch at a fixed size.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10, seed=None,
                 **kwargs):
        _check(int(size) == size and size >= 1, f"Crop size {size!r} is not a positive integer; "
               "pass the output side length in pixels.")
        _check(0 < scale[0] <= scale[1] <= 1, f"Crop scale {tuple(scale)} must satisfy "
               "0 < min <= max <= 1; pass area fractions such as (0.08, 1.0).")
        _check(0 < ratio[0] <= ratio[1], f"Crop ratio {tuple(ratio)} must satisfy 0 < min <= max; "
               "pass width/height bounds such as (0.75, 1.333).")
        super().__init__(seed=seed, **kwargs)
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.attempts = int(attempts)

    def sample_boxes(self, images):
        """[batch, 4] normalised boxes (y1, x1, y2, x2) for images [batch, H, W, C]."""
        return self._boxes(images, tf.shape(images)[1], tf.shape(images)[2])

    def crop_window(self, image_shape, seed=None):
        """One image's crop as the pixels to decode, for `tf.image.decode_and_crop_jpeg`.

        image_shape: [H, W] or [H, W, C] of the whole image; seed: as for `call`. Returns (window
        [4] int32 (top, left, height, width), box [4] float32): cropping `box` from image[window]
        (`call(window_pixels, crop_box=box)`) samples the very points that cropping the box drawn
        here from the whole image does, and a call with the same seed draws the same box. The
        window is that box's pixels plus one on each side (bilinear neighbours, float rounding).
        """
        shape = tf.cast(image_shape, tf.int32)
        self._call_seed = None if seed is None else tf.cast(seed, tf.int64)
        self._draws = 0
        try:  # drawn as call() draws for one image: a batch of one
            box = self._boxes(tf.zeros([1]), shape[0], shape[1])[0]
        finally:
            self._call_seed = None
        # crop_and_resize samples rows y1 * (H - 1) ... y2 * (H - 1) (columns alike).
        last = tf.cast(shape[:2] - 1, tf.float32)
        first_point, last_point = box[:2] * last, box[2:] * last
        start = tf.maximum(tf.floor(first_point) - 1.0, 0.0)
        end = tf.minimum(tf.math.ceil(last_point) + 1.0, last)
        span = tf.maximum(end - start, 1.0)  # window side - 1; a one-pixel side samples point 0
        inner = tf.concat([(first_point - start) / span, (last_point - start) / span], axis=0)
        window = tf.cast(tf.concat([start, end - start + 1.0], axis=0), tf.int32)
        return window, tf.where(tf.concat([end > start] * 2, axis=0), inner, 0.0)

    def _boxes(self, like, height, width):
        """[batch, 4] boxes for images of one size; like: any tensor whose first axis is the batch."""
        height = tf.cast(height, tf.float32)
        width = tf.cast(width, tf.float32)
        area = self._uniform(like, [self.attempts], *self.scale)
        log_ratio = self._uniform(like, [self.attempts], *map(math.log, self.ratio))
        # Widths and heights as fractions of the image side: w * W / (h * H) = exp(log_ratio).
        w = tf.sqrt(area * tf.exp(log_ratio) * height / width)
        h = tf.sqrt(area * tf.exp(-log_ratio) * width / height)
        fits = (w <= 1.0) & (h <= 1.0)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=1)
        w = tf.gather(w, first, batch_dims=1)
        h = tf.gather(h, first, batch_dims=1)
        found = tf.reduce_any(fits, axis=1)
        aspect = width / height
        fallback_w = tf.minimum(1.0, self.ratio[1] / aspect)
        fallback_h = tf.minimum(1.0, aspect / self.ratio[0])
        w = tf.where(found, w, fallback_w)
        h = tf.where(found, h, fallback_h)
        centre = tf.fill(tf.shape(w), 0.5)
        y = (1.0 - h) * tf.where(found, self._uniform(like), centre)
        x = (1.0 - w) * tf.where(found, self._uniform(like), centre)
        return tf.stack([y, x, y + h, x + w], axis=1)

    def _augment(self, images):
        return self._crop(images, self.sample_boxes(images))

    def crop(self, images, boxes):
        """Crops the given normalised boxes [batch, 4] (or [4]) of images [batch, H, W, C], resized."""
        return self._crop(images, tf.reshape(tf.cast(boxes, tf.float32), [-1, 4]))

    def _inference(self, images):
        return self._crop(images, tf.tile([[0.0, 0.0, 1.0, 1.0]], [tf.shape(images)[0], 1]))

    def _crop(self, images, boxes):
        indices = tf.range(tf.shape(images)[0])
        return tf.image.crop_and_resize(images, boxes, indices, [self.size, self.size])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-3], self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size, "scale": self.scale,
                "ratio": self.ratio, "attempts": self.attempts}


@keras.saving.register_keras_serializable(package="nnclr_tf")
class RandomApply(_ImageLayer):
    """Applies `layer` to each image with probability `probability`, independently per image.

    [batch, H, W, C] -> same. A per-image Bernoulli splits the batch (`tf.dynamic_partition`), the
    layer runs once on the chosen images and the batch is stitched back in order; a single image
    runs only the branch drawn (`tf.cond`). Keras core has no RandomApply; keras-cv's fails inside
    `tf.data.map` on single images.
    """

    def __init__(self, layer, probability, seed=None, **kwargs):
        _check(0.0 <= probability <= 1.0, f"Probability {probability!r} is outside [0, 1]; "
               "pass the chance of applying the layer to an image.")
        super().__init__(seed=seed, **kwargs)
        self.layer, self.probability = layer, float(probability)

    def _augment(self, images):
        if self.probability <= 0.0:
            return images
        if self.probability >= 1.0:
            return self._call_child(self.layer, images, 0)
        if images.shape[0] == 1:  # one image (tf.data.map): run only the branch drawn
            return tf.cond(self._uniform(images)[0] < self.probability,
                           lambda: self._call_child(self.layer, images, 0), lambda: images)
        chosen = tf.cast(self._uniform(images) < self.probability, tf.int32)
        # Only the chosen images go through the layer (cheaper than running all and selecting).
        index = tf.dynamic_partition(tf.range(tf.shape(images)[0]), chosen, 2)
        kept, applied = tf.dynamic_partition(images, chosen, 2)
        return _stitch(index, [kept, self._call_child(self.layer, applied, 0)], images)

    def get_config(self):
        return {**super().get_config(), "probability": self.probability,
                "layer": keras.saving.serialize_keras_object(self.layer)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="nnclr_tf")
class HorizontalFlip(_ImageLayer):
    """Mirrors every image left-right; wrap in `RandomApply` for a per-image coin. [batch, H, W, C].

    Used instead of `keras.layers.RandomFlip`, whose coin comes from Keras core's `SeedGenerator`
    and repeats across parallel `tf.data.map` calls.
    """

    _random = False

    def _augment(self, images):
        return tf.reverse(images, axis=[2])


@keras.saving.register_keras_serializable(package="nnclr_tf")
class Solarize(_ImageLayer):
    """Inverts pixels at or above `threshold`: x -> 1 - x (images in [0, 1]). [batch, H, W, C].

    `keras.layers.Solarization` cannot hold a fixed threshold: it draws the threshold uniformly from
    [threshold_factor[0], threshold_factor[1] * 255], the lower bound left unscaled.
    """

    _random = False

    def __init__(self, threshold=0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def _augment(self, images):
        return tf.where(images < self.threshold, images, 1.0 - images)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="nnclr_tf")
class GaussianBlur(_ImageLayer):
    """Isotropic Gaussian blur with sigma drawn uniformly in `sigma` per image. [batch, H, W, C].

    Separable, as sums of shifted copies weighted per image (any batch size, including the empty
    ones `RandomApply` may pass), with mirror padding (edge pixels repeated, so borders do not
    darken); `kernel_size` odd, at most 2 H + 1.
    `keras.layers.RandomGaussianBlur` draws one (sigma_x, sigma_y) pair per batch, anisotropic.
    """

    def __init__(self, kernel_size, sigma=(0.1, 2.0), seed=None, **kwargs):
        _check(int(kernel_size) == kernel_size and kernel_size >= 1 and kernel_size % 2 == 1,
               f"Blur kernel_size {kernel_size!r} is not an odd positive integer; pass e.g. 23.")
        _check(0 < sigma[0] <= sigma[1], f"Blur sigma {tuple(sigma)} must satisfy 0 < min <= max; "
               "pass a range such as (0.1, 2.0).")
        super().__init__(seed=seed, **kwargs)
        self.kernel_size, self.sigma = int(kernel_size), tuple(sigma)

    def _augment(self, images):
        radius = self.kernel_size // 2
        if radius == 0:
            return images
        sigma = self._uniform(images, [1], *self.sigma)  # [batch, 1]
        taps = tf.range(-radius, radius + 1, dtype=tf.float32)
        kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))
        kernel = (kernel / tf.reduce_sum(kernel, 1, keepdims=True))[:, :, None, None, None]
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        pad = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
        padded = tf.pad(images, pad, "SYMMETRIC")
        # Separable: a weighted sum of shifted copies down the rows, then across the columns.
        taps = range(self.kernel_size)
        rows = tf.add_n([kernel[:, k] * padded[:, k:k + height] for k in taps])
        return tf.add_n([kernel[:, k] * rows[:, :, k:k + width] for k in taps])

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "sigma": self.sigma}


@keras.saving.register_keras_serializable(package="nnclr_tf")
class ColorJitter(_ImageLayer):
    """BYOL colour jitter: brightness, contrast, saturation, hue in a random order per image.

    [batch, H, W, C] -> same, clipped to [0, 1] after each op. Brightness adds U(-b, b); contrast
    scales around the per-channel mean by U(1-c, 1+c); saturation blends with the luminance by
    U(1-s, 1+s); hue shifts by U(-h, h) of the colour circle. With C=1 only brightness and contrast
    apply. `keras.layers.RandomColorJitter` uses a fixed order, and its saturation factor is not a
    1 +- s factor (0.5 is identity, so saturation_factor=0.2 greys images out).
    """

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, seed=None,
                 **kwargs):
        _check(min(brightness, contrast, saturation, hue) >= 0 and hue <= 0.5,
               f"Colour jitter strengths {(brightness, contrast, saturation, hue)} must be >= 0 "
               "with hue <= 0.5; pass BYOL's (0.4, 0.4, 0.2, 0.1) times a strength.")
        super().__init__(seed=seed, **kwargs)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def _ops(self, channels):
        """(name, op(images, factor), low, high) per active op, in the docstring's order."""
        _check(channels in (1, 3), f"{self.name} got images with {channels} channels; expected "
               "a static 1 or 3 (use tf.ensure_shape on decoded images).")
        def brightness(x, f):
            return x + f

        def contrast(x, f):
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            return (x - mean) * f + mean

        def saturation(x, f):
            grey = tf.reduce_sum(x * _LUMA, axis=-1, keepdims=True)
            return grey + (x - grey) * f

        def hue(x, f):
            hsv = tf.image.rgb_to_hsv(x)
            return tf.image.hsv_to_rgb(tf.concat([(hsv[..., :1] + f) % 1.0, hsv[..., 1:]], -1))

        ops = [(brightness, self.brightness, -self.brightness, self.brightness),
               (contrast, self.contrast, max(0.0, 1 - self.contrast), 1 + self.contrast)]
        if channels == 3:
            s = self.saturation
            ops += [(saturation, s, max(0.0, 1 - s), 1 + s), (hue, self.hue, -self.hue, self.hue)]
        return [(op.__name__, op, low, high) for op, strength, low, high in ops if strength > 0]

    def active_ops(self, channels):
        """Names of the ops applied to images of `channels` channels, e.g. ["brightness", ...]."""
        return [name for name, *_ in self._ops(channels)]

    def sample(self, images):
        """Per-image factors (one [batch, 1, 1, 1] per active op) and op order [batch, ops].

        Op i is the i-th name of `active_ops(C)`; order[b] is image b's permutation of them.
        """
        ops = self._ops(images.shape[-1])
        factors = [self._uniform(images, [1, 1, 1], low, high) for _, _, low, high in ops]
        order = tf.argsort(self._uniform(images, [len(ops)]), axis=1)  # a permutation per image
        return factors, order

    def _augment(self, images):
        return self.apply(images, *self.sample(images))

    def apply(self, images, factors, order):
        """Applies the active ops with the given factors in each image's order. [batch, H, W, C]."""
        ops = [op for _, op, _, _ in self._ops(images.shape[-1])]
        n = len(ops)
        if images.shape[0] == 1:  # one image (tf.data.map): run only the op drawn at each step
            for step in range(n):
                branches = [lambda op=op, f=f: op(images, f) for op, f in zip(ops, factors)]
                images = tf.clip_by_value(tf.switch_case(order[0, step], branches), 0.0, 1.0)
            return images
        index = tf.range(tf.shape(images)[0])
        for step in range(n):
            # Each image goes through the op its permutation names at this step: one op per image.
            which = order[:, step]
            parts = tf.dynamic_partition(images, which, n)
            outs = [tf.clip_by_value(op(part, tf.dynamic_partition(factor, which, n)[i]), 0.0, 1.0)
                    for i, (op, part, factor) in enumerate(zip(ops, parts, factors))]
            images = _stitch(tf.dynamic_partition(index, which, n), outs, images)
        return images

    def get_config(self):
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast,
                "saturation": self.saturation, "hue": self.hue}


@keras.saving.register_keras_serializable(package="nnclr_tf")
class ViewAugmenter(_ImageLayer):
    """One view's pipeline: crop, flip, jitter, grayscale, blur, solarize (BYOL order), then clip.

    [batch, H, W, C] or [H, W, C] -> [batch, size, size, C] (or [size, size, C]) float32 in
    [0, 1], size = image_size, whatever the input range. Input: uint8 (read as [0, 255]) or
    floats in `value_range` (default (0, 1); (0, 255) for float pixels), mapped to [0, 1] first.
    Other integer types, and floats outside `value_range` (beyond a 0.1 % rounding margin), are
    refused with one sentence: eagerly as a ValueError, in a graph (tf.data) by an assert that
    fails when the batch runs. Stages are named sublayers in `stages`; each random one is a
    `RandomApply` (`stage("blur").probability` is the view's blur rate). Grayscale is Keras core's
    `RandomGrayscale` at factor 1 (a per-image luminance conversion) behind `RandomApply`'s coin.
    """

    def __init__(self, view, image_size, preset="byol", channels=3, crop_scale=(0.08, 1.0),
                 color_strength=1.0, seed=None, value_range=(0, 1), **kwargs):
        _check(preset in VIEW_PRESETS, f"Unknown augmentation preset {preset!r}; expected one "
               f"of {sorted(VIEW_PRESETS)}.")
        _check(view in (1, 2), f"view={view!r} is not a view of the paper; expected 1 or 2.")
        _check(isinstance(image_size, int) and image_size >= 4, f"image_size={image_size!r} is "
               "not an integer >= 4; pass the side length of the square views in pixels.")
        _check(channels in (1, 3), f"channels={channels!r} is not supported; expected 1 "
               "(grayscale) or 3 (RGB).")
        _check(color_strength >= 0, f"color_strength={color_strength!r} is negative; pass >= 0.")
        _check(len(value_range) == 2 and float(value_range[0]) < float(value_range[1]),
               f"value_range={tuple(value_range)!r} is not a (low, high) pair with low < high; "
               "pass the range of the input pixels, e.g. (0, 1) or (0, 255).")
        super().__init__(seed=seed, **kwargs)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.view, self.image_size, self.preset, self.channels = view, image_size, preset, channels
        self.crop_scale, self.color_strength = tuple(crop_scale), float(color_strength)
        # Stage seeds depend on the view, so one seed for both views still gives independent views.
        first = None if seed is None else seed * 1000 + view * 100
        seeds = iter([None] * 16 if seed is None else range(first, first + 16))
        p = VIEW_PRESETS[preset][view]
        jitter = {k: v * self.color_strength for k, v in JITTER.items()}
        radius = max(1, int(0.1 * image_size) // 2)  # BYOL: 23 taps at 224, i.e. ~10 % of the side
        makers = {
            "flip": lambda: HorizontalFlip(),
            "color_jitter": lambda: ColorJitter(**jitter, seed=next(seeds)),
            "grayscale": lambda: keras.layers.RandomGrayscale(1.0, seed=next(seeds),
                                                              dtype="float32"),
            "blur": lambda: GaussianBlur(2 * radius + 1, (0.1, 2.0), seed=next(seeds)),
            "solarize": lambda: Solarize(0.5),
        }
        self.stages = [RandomResizedCrop(image_size, self.crop_scale, seed=next(seeds),
                                         name="crop")]
        for name in ("flip", "color_jitter", "grayscale", "blur", "solarize"):
            if p.get(name, 0.0) > 0 and not (channels == 1 and name == "grayscale"):
                stage = RandomApply(makers[name](), p[name], seed=next(seeds), name=name)
                self.stages.append(stage)

    def call(self, images, training=True, seed=None, crop_box=None):
        """crop_box: optional [4] (or [batch, 4]) normalised box that the crop stage cuts instead of
        drawing one: with images = the pixels of `crop_window(shape, seed)` and the box it returns,
        the view equals the view of the whole image under the same seed (a crop decoded alone)."""
        self._crop_box = crop_box
        try:
            return super().call(images, training=training, seed=seed)
        finally:
            self._crop_box = None

    def crop_window(self, image_shape, seed=None):
        """(window [4] int32 (top, left, height, width), box [4]) of the crop that a call with
        `seed` draws for an image of `image_shape` ([H, W(, C)]); see RandomResizedCrop.crop_window.
        Decode only the window (tf.image.decode_and_crop_jpeg) and pass the box as `crop_box`."""
        crop_seed = None
        if seed is not None:  # the seed `call` hands the crop stage (_child_seed(0))
            crop_seed = tf.random.fold_in(tf.random.fold_in(tf.cast(seed, tf.int64), 1), 0)
        return self.stages[0].crop_window(image_shape, seed=crop_seed)

    def stage(self, name):
        """The stage layer called `name` ("crop", "flip", ...), or None where the view omits it."""
        return next((s for s in self.stages if s.name == name), None)

    def _as_float(self, images):
        """uint8 or floats in value_range -> float32 in [0, 1] (see the class docstring)."""
        if images.dtype == tf.uint8:
            return tf.cast(images, tf.float32) / 255.0
        low, high = self.value_range
        _check(images.dtype.is_floating, f"{self.name} got {images.dtype.name} images; pass uint8 "
               f"(read as [0, 255]) or floats in value_range=({low:g}, {high:g}).")
        images = tf.cast(images, tf.float32)
        margin = 1e-3 * (high - low)  # rounding, e.g. of a resize in float16
        smallest, largest = tf.reduce_min(images), tf.reduce_max(images)
        advice = (f"outside value_range=({low:g}, {high:g}); pass the images' range as value_range"
                  " (e.g. (0, 255) for float pixels) or clip them to it")
        if tf.executing_eagerly():
            _check(float(smallest) >= low - margin and float(largest) <= high + margin,
                   f"{self.name} got pixel values in [{float(smallest):g}, {float(largest):g}], "
                   f"{advice}.")
        else:  # one min and max per call: 0.7 ms next to a view's 66 ms (256 images, 32 px)
            tf.debugging.Assert(
                tf.logical_and(smallest >= low - margin, largest <= high + margin),
                [f"{self.name} got pixel values from", smallest, "to", largest, advice])
        return (images - low) / (high - low)

    def _checked(self, images):
        if images.shape[-1] is None:  # e.g. decoded images: the channel count must be static
            return tf.ensure_shape(images, [None, None, None, self.channels])
        _check(images.shape[-1] == self.channels, f"Images have {images.shape[-1]} channels but "
               f"the augmenter was built with channels={self.channels}; pass the images' count.")
        return images

    def _augment(self, images):
        images = self._checked(images)
        for index, stage in enumerate(self.stages):
            if index == 0 and getattr(self, "_crop_box", None) is not None:
                images = stage.crop(images, self._crop_box)
                continue
            images = self._call_child(stage, images, index, training=True)
        return tf.clip_by_value(images, 0.0, 1.0)

    def _inference(self, images):
        images = self.stages[0](self._checked(images), training=False)
        return tf.clip_by_value(images, 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return self.stages[0].compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "view": self.view, "image_size": self.image_size,
                "preset": self.preset, "channels": self.channels, "crop_scale": self.crop_scale,
                "color_strength": self.color_strength, "value_range": self.value_range}


def view_augmenter(view, image_size, preset="byol", channels=3, crop_scale=(0.08, 1.0),
                   seed=None, color_strength=1.0, value_range=(0, 1)):
    """The paper's view-`view` augmentation as a layer (see `ViewAugmenter`, `VIEW_PRESETS`).

    color_strength scales all four colour-jitter ranges (SimCLR's colour strength); 1 = BYOL.
    value_range: the input pixels' range for float images (uint8 is always read as [0, 255]);
    the views come out in [0, 1]. Reproducible views: a seed per call (`map_views`), see the
    module docstring; `seed` here fixes the layer's generator, which repeats for calls in a
    fixed order only.
    """
    return ViewAugmenter(view, image_size, preset=preset, channels=channels,
                         crop_scale=crop_scale, color_strength=color_strength, seed=seed,
                         value_range=value_range)


def map_views(dataset, view_1, view_2, seed=0, num_parallel_calls=tf.data.AUTOTUNE):
    """Maps images to two views, reproducibly: element i is augmented with seeds from (seed, i).

    Args:
      dataset: a tf.data.Dataset of images [batch, H, W, C] (or [H, W, C]), or of (images,
        labels) pairs.
      view_1, view_2: the two views' layers (`view_augmenter(1, ...)`, `view_augmenter(2, ...)`).
      seed: int; the same seed gives the same views, however many parallel calls run.

    Returns:
      A dataset of (view_1, view_2), or ((view_1, view_2), labels) for labelled input: what
      `NNCLR.fit` takes.
    """
    labelled = isinstance(dataset.element_spec, tuple) and len(dataset.element_spec) == 2
    if not labelled and not isinstance(dataset.element_spec, tf.TensorSpec):
        raise ValueError(f"map_views got a dataset of {dataset.element_spec}; expected images "
                         "[batch, H, W, C] or (images, labels) pairs.")
    key = tf.constant([int(seed), 0], tf.int64)

    def views(index, element):
        images, labels = element if labelled else (element, None)
        element_key = tf.random.fold_in(key, index)
        pair = (view_1(images, seed=tf.random.fold_in(element_key, 1)),
                view_2(images, seed=tf.random.fold_in(element_key, 2)))
        return pair if labels is None else (pair, labels)

    return dataset.enumerate().map(views, num_parallel_calls=num_parallel_calls)
