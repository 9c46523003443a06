"""What `NNCLR` accepts, checked before any step runs: the encoder and the training batches.

Each mistake a Keras user commonly makes (a feature map instead of features, a labelled image
dataset instead of two views, an un-batched dataset, one-hot labels) gets one sentence naming
what was passed and what is expected, instead of an error from deep inside TensorFlow.
"""

import collections.abc
import warnings

import keras
import numpy as np

# Inputs in [0, 255] are what a Rescaling of scale 1/255 or 1/127.5 expects.
_PIXEL_SCALE = 0.05
_FIX_FEATURES = ("end the encoder with keras.layers.GlobalAveragePooling2D() (or Flatten()) so "
                 "it returns [batch, features]")


def _shape_text(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def encoder_features_shape(encoder, input_shape):
    """The encoder's output shape for images `input_shape`; one sentence unless [batch, D].

    A Functional encoder says it; any other (subclassed) encoder is called once on a zero image,
    which also builds it.
    """
    name, input_shape = encoder.name, tuple(input_shape)
    try:
        if getattr(encoder, "inputs", None):
            features = tuple(encoder.compute_output_shape(input_shape))
        else:
            if len(input_shape) != 4 or None in input_shape[1:]:
                raise ValueError("the image shape must be (None, H, W, C) with H, W, C known")
            probe = encoder(np.zeros((1,) + input_shape[1:], np.float32), training=False)
            features = (None,) + tuple(probe.shape[1:])
    except Exception as error:  # pylint: disable=broad-except  (any failure means: no shape)
        raise ValueError(
            f"The encoder {name!r} cannot say its output shape for images "
            f"{_shape_text(input_shape)} ({type(error).__name__}: {error}); wrap it in a "
            "Functional model: inputs = keras.Input((H, W, C)); "
            "encoder = keras.Model(inputs, encoder(inputs)).") from None
    if len(features) != 2:
        raise ValueError(f"The encoder {name!r} returns features of shape {_shape_text(features)}"
                         f", but NNCLR needs [batch, features]; {_FIX_FEATURES}.")
    if features[-1] is None:
        raise ValueError(f"The encoder {name!r} returns features of shape {_shape_text(features)}"
                         " with an unknown feature size; give it a fixed input shape "
                         "(keras.Input((H, W, C))) and " + _FIX_FEATURES + ".")
    return features


def _expects_0_255(layer):
    """Whether `layer` is input preprocessing for pixels in [0, 255]."""
    if isinstance(layer, keras.layers.Rescaling):
        return 0 < float(np.max(np.abs(layer.scale))) < _PIXEL_SCALE
    if isinstance(layer, keras.layers.Normalization) and layer.input_mean is not None:
        return float(np.max(np.abs(layer.input_mean))) > 2  # ImageNet means times 255
    return False


def warn_if_rescaling(encoder):
    """Warns when the encoder rescales its input from [0, 255] (keras.applications' Rescaling)."""
    for layer in encoder._flatten_layers(include_self=False):  # pylint: disable=protected-access
        if _expects_0_255(layer):
            warnings.warn(
                f"The encoder {encoder.name!r} contains the layer {layer.name!r}, which expects "
                "pixels in [0, 255], but NNCLR's views are floats in [0, 1]; build it without its "
                "preprocessing (keras.applications: include_preprocessing=False) or remove that "
                "layer.", stacklevel=3)
            return


def _rank(x):
    return getattr(getattr(x, "shape", None), "rank", None)


def _describe(x):
    shape = getattr(x, "shape", None)
    if shape is None:
        return type(x).__name__
    return f"{x.dtype.name} {_shape_text(shape.as_list())}"


def _is_pair(x):
    return isinstance(x, (list, tuple)) and len(x) == 2


def unpack_views(data):
    """Training batch -> (view_1, view_2, labels or None); one sentence for a wrong batch.

    Accepted: {"view_1", "view_2"[, "label"]}; (view_1, view_2[, label]); Keras' (x, y) with x
    a pair of views, ((view_1, view_2), labels) or fit([view_1, view_2], labels); and fit(x=dict,
    y=labels). Views [batch, H, W, C] float of one size, labels [batch] integer class ids.
    """
    # Keras packs array inputs as (x, y, sample_weight) with None for the missing parts.
    while isinstance(data, (list, tuple)) and data and data[-1] is None:
        data = data[:-1]
    if isinstance(data, (list, tuple)) and len(data) == 1:
        data = data[0]
    if _is_pair(data) and isinstance(data[0], collections.abc.Mapping):  # fit(x=views, y=labels)
        data = dict(data[0], label=data[1])
    if isinstance(data, (list, tuple)) and len(data) == 3 and _is_pair(data[0]):
        raise ValueError("The training batch is ((view_1, view_2), labels, sample_weight), but "
                         "NNCLR's loss is self-supervised and takes no sample weights; drop them.")
    if _is_pair(data) and _is_pair(data[0]):  # ((view_1, view_2), labels): Keras' (x, y)
        data = (*data[0], data[1])
    if isinstance(data, collections.abc.Mapping):
        if "view_1" not in data or "view_2" not in data:
            raise ValueError(f"The training batch has keys {sorted(data)}, expected 'view_1', "
                             "'view_2' and optionally 'label'; build it with "
                             "nnclr_tf.data.pretraining_dataset or map images through "
                             "nnclr_tf.view_augmenter.")
        views = data["view_1"], data["view_2"], data.get("label")
    elif isinstance(data, (list, tuple)) and len(data) in (2, 3):
        views = data[0], data[1], data[2] if len(data) == 3 else None
    else:
        raise ValueError(f"The training batch is a {type(data).__name__}, expected a dict "
                         "{'view_1', 'view_2'[, 'label']} or a tuple ((view_1, view_2), label).")
    check_views(*views)
    return views


def check_views(view_1, view_2, labels):
    """One sentence for batches that are not two same-size views [batch, H, W, C] and [batch]."""
    if _rank(view_1) == 4 and _rank(view_2) in (0, 1, 2):
        raise ValueError(
            f"The training batch is (images {_describe(view_1)}, labels {_describe(view_2)}), a "
            "labelled image dataset, but NNCLR trains on two augmented views of each image; map it "
            "first with nnclr_tf.map_views(ds, nnclr_tf.view_augmenter(1, image_size), "
            "nnclr_tf.view_augmenter(2, image_size)), or use nnclr_tf.pretraining_dataset.")
    for name, view in (("view_1", view_1), ("view_2", view_2)):
        rank = _rank(view)
        if rank == 3:
            raise ValueError(f"{name} has shape {_shape_text(view.shape.as_list())}, one image "
                             "without a batch axis: batch the dataset (ds.batch(batch_size)) "
                             "before model.fit.")
        if rank is not None and rank != 4:
            raise ValueError(f"{name} has shape {_shape_text(view.shape.as_list())}, expected "
                             "[batch, H, W, C] images.")
    if (_rank(view_1) == 4 and _rank(view_2) == 4
            and not view_1.shape[1:].is_compatible_with(view_2.shape[1:])):
        raise ValueError(f"The views differ in size: view_1 {_describe(view_1)}, view_2 "
                         f"{_describe(view_2)}; augment both to the same image_size.")
    if labels is not None and _rank(labels) is not None:
        shape = labels.shape.as_list()
        if len(shape) == 2 and shape[-1] not in (None, 1):
            raise ValueError(f"The labels have shape {_shape_text(shape)}, one-hot; NNCLR's probe "
                             "takes integer class ids [batch]: pass tf.argmax(labels, axis=-1).")
        if len(shape) > 2 or (len(shape) == 2 and shape[-1] is None):
            raise ValueError(f"The labels have shape {_shape_text(shape)}; expected integer class "
                             "ids [batch].")
