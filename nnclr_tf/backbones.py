"""Encoders f(.): ResNet-18/34 (basic blocks) and ResNet-50 v1.5 (bottleneck blocks).

Every backbone is a Functional `keras.Model` built from Keras core layers and this package's
`BatchNormalization` (Keras' layer with a fused fast path, registered as serializable), so it saves
to `.keras` and loads back with `safe_mode=True` once `nnclr_tf` is imported. It maps images
`[batch, H, W, C]` (float, C in {1, 3}) to global-average-pooled features `[batch, features]`:

    encoder = build_backbone("resnet18", (32, 32, 3), cifar_stem=True)
    features = encoder(images)            # [batch, 512]
    z = projection_head(features)         # see heads.py

ResNet-50 is v1.5, as in the paper-era TensorFlow recipes (tensorflow/models, SimCLR, BYOL) and
torchvision: the stride of a downsampling bottleneck sits on its 3x3 convolution, no convolution
has a bias (a batch norm follows each), and the last batch norm of each block may start at gamma 0.
`keras.applications.ResNet50` is v1 (stride on the first 1x1 convolution, convolution biases).
"""

import keras

from nnclr_tf.batch_norm import BatchNormalization
from nnclr_tf.config import BACKBONES  # the names; their architectures are below

# name -> (block, blocks per stage). A bottleneck block widens its output to 4x its channels.
_ARCHITECTURES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                  "resnet50": ("bottleneck", (3, 4, 6, 3))}
_BOTTLENECK_EXPANSION = 4
_BASE_CHANNELS = 64
_MIN_CHANNELS = 8
# SimCLR / torchvision batch-norm settings: the moving statistics follow the data quickly, which
# matters for short runs whose kNN / linear evaluation uses inference-mode statistics.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _check_name(name):
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone name={name!r}; expected one of {BACKBONES}.")


def _stem_stride(cifar_stem):
    # The ImageNet stem halves twice (7x7 stride-2 conv, 3x3 stride-2 max-pool); the CIFAR stem keeps
    # the resolution so that 32x32 images still leave a 4x4 map at the last stage.
    return 1 if cifar_stem else 4


def min_image_size(name, cifar_stem=False):
    """Smallest H (= W) for which the last stage still sees at least one whole input pixel.

    This is the network's total stride: 8 with the CIFAR stem, 32 with the ImageNet stem.
    """
    _check_name(name)
    return _stem_stride(cifar_stem) * 2 ** (len(_ARCHITECTURES[name][1]) - 1)


def scaled_channels(channels, width_multiplier):
    """`channels * width_multiplier` rounded to an integer, at least 8."""
    return max(_MIN_CHANNELS, int(round(channels * width_multiplier)))


def _check_input_shape(input_shape, min_size, what):
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape={tuple(input_shape)} must be (height, width, channels); "
            "pass one image's shape without the batch dimension."
        )
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise ValueError(
            f"input_shape={tuple(input_shape)} has {channels} channels; the backbones take 1 "
            "(grayscale) or 3 (RGB) channels, so convert the images first."
        )
    for size in (height, width):
        if size is not None and size < min_size:
            raise ValueError(
                f"input_shape={tuple(input_shape)} is too small for {what}, which needs images of at "
                f"least {min_size}x{min_size}; resize the images or use cifar_stem=True."
            )


def _batch_norm(x, synchronized, name, zero_gamma=False):
    return BatchNormalization(
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        gamma_initializer="zeros" if zero_gamma else "ones",
        synchronized=synchronized,
        name=name,
    )(x)


def _conv(x, filters, kernel_size, strides, name):
    if strides > 1 and kernel_size > 1:
        # Symmetric padding (as in the paper's reference networks) instead of TF's "same", which
        # pads only bottom/right for stride 2.
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,  # a batch norm follows every convolution
        kernel_initializer="he_normal",
        name=name,
    )(x)


def _shortcut(x, outputs, strides, synchronized_bn, name):
    """The identity, or a strided 1x1 projection + BN where the block changes size or channels."""
    if strides == 1 and x.shape[-1] == outputs:
        return x
    shortcut = _conv(x, outputs, 1, strides, name=f"{name}_shortcut_conv")
    return _batch_norm(shortcut, synchronized_bn, name=f"{name}_shortcut_bn")


def _basic_block(x, filters, strides, synchronized_bn, zero_init_residual, name):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut: [b, h, w, c] -> [b, h/s, w/s, filters]."""
    shortcut = _shortcut(x, filters, strides, synchronized_bn, name)
    y = _conv(x, filters, 3, strides, name=f"{name}_conv1")
    y = _batch_norm(y, synchronized_bn, name=f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, filters, 3, 1, name=f"{name}_conv2")
    # A zero gamma makes each block start as the identity, which steadies early training.
    y = _batch_norm(y, synchronized_bn, name=f"{name}_bn2", zero_gamma=zero_init_residual)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _bottleneck_block(x, filters, strides, synchronized_bn, zero_init_residual, name):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 to 4 x filters, with an identity or 1x1 projection
    shortcut: [b, h, w, c] -> [b, h/s, w/s, 4 * filters]."""
    outputs = _BOTTLENECK_EXPANSION * filters
    shortcut = _shortcut(x, outputs, strides, synchronized_bn, name)
    y = _conv(x, filters, 1, 1, name=f"{name}_conv1")
    y = _batch_norm(y, synchronized_bn, name=f"{name}_bn1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, filters, 3, strides, name=f"{name}_conv2")
    y = _batch_norm(y, synchronized_bn, name=f"{name}_bn2")
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    y = _conv(y, outputs, 1, 1, name=f"{name}_conv3")
    y = _batch_norm(y, synchronized_bn, name=f"{name}_bn3", zero_gamma=zero_init_residual)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


_BLOCKS = {"basic": _basic_block, "bottleneck": _bottleneck_block}


def resnet(
    input_shape=(32, 32, 3),
    stage_blocks=(2, 2, 2, 2),
    width_multiplier=1.0,
    cifar_stem=False,
    synchronized_bn=True,
    zero_init_residual=True,
    block="basic",
    name="resnet",
):
    """A ResNet: images [batch, H, W, C] -> features [batch, F].

    Stage i has `stage_blocks[i]` blocks of `scaled_channels(64 * 2**i, width_multiplier)` channels
    (a "bottleneck" block outputs 4x that); every stage after the first halves the resolution.
    F is the last stage's output: 512 * width for basic blocks, 2048 * width for bottlenecks (4
    stages). `zero_init_residual` starts the last batch norm of every block at gamma 0.
    Layers are named `stem_*` and `stage{i}_block{j}_{conv,bn}{k}` (`_shortcut_{conv,bn}`).
    """
    if block not in _BLOCKS:
        raise ValueError(f"block={block!r} is not one of {tuple(_BLOCKS)}.")
    if not width_multiplier > 0:
        raise ValueError(
            f"width_multiplier={width_multiplier} must be positive; use 1.0 for the standard width."
        )
    if not stage_blocks or any(int(n) < 1 for n in stage_blocks):
        raise ValueError(
            f"stage_blocks={tuple(stage_blocks)} must list at least one stage of at least one block."
        )
    min_size = _stem_stride(cifar_stem) * 2 ** (len(stage_blocks) - 1)
    _check_input_shape(input_shape, min_size, f"{name} (cifar_stem={cifar_stem})")

    images = keras.Input(shape=tuple(input_shape), name="images")
    stem_channels = scaled_channels(_BASE_CHANNELS, width_multiplier)
    if cifar_stem:
        x = _conv(images, stem_channels, 3, 1, name="stem_conv")
    else:
        x = _conv(images, stem_channels, 7, 2, name="stem_conv")
    x = _batch_norm(x, synchronized_bn, name="stem_bn")
    x = keras.layers.ReLU(name="stem_relu")(x)
    if not cifar_stem:
        # Zero padding is safe before the max-pool because its inputs are >= 0 after the ReLU.
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)

    make_block = _BLOCKS[block]
    for stage, num_blocks in enumerate(stage_blocks):
        filters = scaled_channels(_BASE_CHANNELS * 2**stage, width_multiplier)
        for index in range(int(num_blocks)):
            strides = 2 if stage > 0 and index == 0 else 1
            x = make_block(
                x,
                filters,
                strides,
                synchronized_bn,
                zero_init_residual,
                name=f"stage{stage + 1}_block{index + 1}",
            )
    # Pool in float32 so that features leave a mixed-precision encoder in full precision.
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool", dtype="float32")(x)
    return keras.Model(images, features, name=name)


def build_backbone(
    name,
    input_shape=(32, 32, 3),
    width_multiplier=1.0,
    cifar_stem=False,
    synchronized_bn=True,
    zero_init_residual=True,
):
    """Encoder by name: images [batch, H, W, C] in [0, 1] -> features [batch, features].

    Feature sizes at width 1: 512 (ResNet-18/34), 2048 (ResNet-50 v1.5); read them from
    `model.output_shape[-1]`. Every backbone takes the CIFAR stem and a width multiplier.
    `synchronized_bn` (the default, as in the paper) computes batch-norm statistics over the global
    batch under tf.distribute; on one device it computes the same statistics. `zero_init_residual`
    starts the last batch norm of each residual block at gamma 0 (each block starts as the identity).
    """
    _check_name(name)
    block, stage_blocks = _ARCHITECTURES[name]
    return resnet(
        tuple(input_shape),
        stage_blocks=stage_blocks,
        width_multiplier=width_multiplier,
        cifar_stem=cifar_stem,
        synchronized_bn=synchronized_bn,
        zero_init_residual=zero_init_residual,
        block=block,
        name=name,
    )
