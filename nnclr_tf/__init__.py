"""NNCLR (Nearest-Neighbour Contrastive Learning of Visual Representations) for TensorFlow / Keras 3.

    import nnclr_tf
    encoder = nnclr_tf.build_backbone("resnet18", input_shape=(28, 28, 1), cifar_stem=True)
    model = nnclr_tf.NNCLR(encoder, queue_size=4096)
    steps = 2  # a real run: batch_size=512 on "cifar10", 10_000 steps, 500 of warm-up
    model.compile(optimizer=nnclr_tf.LARS(nnclr_tf.WarmupCosine(0.3, 16, steps, 1)))
    model.fit(nnclr_tf.pretraining_dataset("embedded", batch_size=16, image_size=28),
              steps_per_epoch=steps, epochs=1)

The pieces stand alone: `SupportSet` (the queue and its nearest-neighbour lookup), `losses`
(the NNCLR and SimCLR-style contrastive losses), the heads, the augmentations and the optimizer.
Every submodule is an attribute (`nnclr_tf.optim.LARS`, `nnclr_tf.backbones.build_backbone`).
TensorFlow is imported on first use of these names, so `nnclr_tf.config` stays light; once Keras
is loaded every class this package saves is registered, so `keras.models.load_model` reads a
`.keras` file after a bare `import nnclr_tf` (see `nnclr_tf.registration`).
"""

import importlib
import importlib.util

from nnclr_tf import registration

__version__ = "0.1.0"

_EXPORTS = {
    "NNCLR": "nnclr_tf.model",
    "SupportSet": "nnclr_tf.support_set",
    "ProjectionHead": "nnclr_tf.heads",
    "PredictionHead": "nnclr_tf.heads",
    "LinearProbe": "nnclr_tf.heads",
    "build_backbone": "nnclr_tf.backbones",
    "LARS": "nnclr_tf.optim",
    "WarmupCosine": "nnclr_tf.optim",
    "view_augmenter": "nnclr_tf.augment",
    "map_views": "nnclr_tf.augment",
    "pretraining_dataset": "nnclr_tf.data",
    "evaluation_dataset": "nnclr_tf.data",
    "export_encoder": "nnclr_tf.export",
    "load_encoder": "nnclr_tf.export",
    "embed": "nnclr_tf.collection",
    "get_preset": "nnclr_tf.config",
    "override": "nnclr_tf.config",
    "Config": "nnclr_tf.config",
    "pretrain": "nnclr_tf.train",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    # Submodules load on first access, in any order: nnclr_tf.optim, nnclr_tf.evaluation, ...
    if not name.startswith("_") and importlib.util.find_spec(f"nnclr_tf.{name}") is not None:
        return importlib.import_module(f"nnclr_tf.{name}")
    raise AttributeError(f"module 'nnclr_tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)

registration.install()
