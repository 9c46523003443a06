"""Export the trained encoder for inference anywhere TensorFlow runs.

Two formats:

- A SavedModel of the encoder (plus, optionally, the projection head) whose
  `serving_default` signature takes raw uint8 images of any size and applies
  the evaluation preprocessing itself, so serving needs no Python from here:

      export_encoder(model.encoder, "export/1", image_size=32, channels=3)
      encoder = load_encoder("export/1")
      out = encoder(images_uint8)   # {"features": [N, D], "embeddings": [N, E]}
      encoder.info["precision"]     # "float32": export.json inside the export says how it was made

  It computes in float32 by default, whatever mixed-precision policy the model
  was trained under (16-bit serving moves the embeddings by ~1e-2).

  The same SavedModel loads in TF Serving, `tf.saved_model.load` or
  `keras.layers.TFSMLayer(path, call_endpoint="serving_default")`.
- A `.keras` archive of a whole Keras model (`save_full_model`,
  `load_full_model`), loaded in safe mode by default.
"""

import importlib
import importlib.util
import json
import os
import uuid

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf import preprocessing

SERVING_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "embed_float"
INFO_FILE = "export.json"  # inside the SavedModel folder, so it travels with it
PRECISIONS = ("float32", "as_trained")
_SUPPORTED_CHANNELS = (1, 3)


def preprocess_for_eval(images, image_size, channels=None):
    """Evaluation preprocessing shared by the data pipeline and the export.

    uint8 -> float32 in [0, 1]; `preprocessing.resize_and_centre_crop` (the
    function the evaluation pipeline maps: shorter side to image_size / 0.875 and
    the centre square for photos larger than image_size, the whole frame for
    smaller ones); optionally convert grayscale <-> RGB so the result has
    `channels` channels.

    Args:
      images: uint8 `[batch, height, width, C]` or one `[height, width, C]` image
        (or float in [0, 1]), any size.
      image_size: output side length.
      channels: 1 or 3 to convert, or None to keep the input's channels.

    Returns:
      float32 `[batch, image_size, image_size, channels]` in [0, 1] (no batch axis
      for a single image, so it can be mapped over an unbatched tf.data.Dataset).
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        return preprocess_for_eval(images[None], image_size, channels)[0]
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    else:
        images = tf.cast(images, tf.float32)
    images = preprocessing.resize_and_centre_crop(images, image_size)
    if channels is not None:
        images = _convert_channels(images, channels)
    # Resizing can overshoot by float round-off; the encoder was trained on [0, 1].
    return tf.clip_by_value(images, 0.0, 1.0)


def _convert_channels(images, channels):
    """[batch, H, W, 1 or 3] -> [batch, H, W, channels]; grayscale is tiled, RGB averaged."""
    static = images.shape[-1]
    if static is not None:  # Known when traced by tf.data: no run-time branch needed.
        if static not in _SUPPORTED_CHANNELS:
            raise ValueError(f"Images must have 1 or 3 channels, got {static}.")
        if static == channels:
            return images
        return tf.tile(images, [1, 1, 1, 3]) if channels == 3 else tf.image.rgb_to_grayscale(images)
    found = tf.shape(images)[-1]
    check = tf.debugging.Assert(
        tf.logical_or(tf.equal(found, 1), tf.equal(found, 3)),
        ["Images must have 1 (grayscale) or 3 (RGB) channels; got", found],
    )
    with tf.control_dependencies([check]):
        if channels == 3:
            converted = tf.cond(
                tf.equal(found, 1),
                lambda: tf.tile(images, [1, 1, 1, 3]),
                lambda: tf.identity(images),
            )
        else:
            converted = tf.cond(
                tf.equal(found, 3),
                lambda: tf.image.rgb_to_grayscale(images),
                lambda: tf.identity(images),
            )
    return tf.ensure_shape(converted, [None, None, None, channels])


def _check_export_args(encoder, image_size, channels):
    if not isinstance(encoder, keras.Model):
        raise ValueError(
            f"encoder must be a keras.Model, got {type(encoder).__name__}; pass the "
            "backbone (e.g. model.encoder)."
        )
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer.")
    if channels not in _SUPPORTED_CHANNELS:
        raise ValueError(f"channels={channels!r} must be 1 (grayscale) or 3 (RGB).")
    inputs = getattr(encoder, "inputs", None)
    if inputs:
        expected = (image_size, image_size, channels)
        for got, want in zip(tuple(inputs[0].shape)[1:], expected):
            if got is not None and got != want:
                raise ValueError(
                    f"The encoder's input shape {tuple(inputs[0].shape)[1:]} does not match "
                    f"image_size={image_size}, channels={channels}; pass the values it was "
                    "built with."
                )


def _is_nonempty(path):
    return tf.io.gfile.exists(path) and (
        not tf.io.gfile.isdir(path) or bool(tf.io.gfile.listdir(path))
    )


def _copy_tree(source, target):
    for folder, _, files in tf.io.gfile.walk(source):
        into = target + folder[len(source):]
        tf.io.gfile.makedirs(into)
        for name in files:
            tf.io.gfile.copy(f"{folder}/{name}", f"{into}/{name}", overwrite=True)


def _replace(tmp_path, path):
    """Moves `tmp_path` to `path`, keeping the old `path` until the move succeeded."""
    if "://" in path:
        # Object stores have no folders to rename (gs:// renames file by file, ram:// loses the
        # files): the new files are copied in; the caller deletes `tmp_path`.
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        _copy_tree(tmp_path, path)
        return
    backup = None
    if tf.io.gfile.exists(path):
        if tf.io.gfile.isdir(path) and not tf.io.gfile.listdir(path):
            tf.io.gfile.rmtree(path)
        else:
            backup = f"{path}.old-{uuid.uuid4().hex[:8]}"
            tf.io.gfile.rename(path, backup)
    try:
        tf.io.gfile.rename(tmp_path, path)
    except Exception:
        if backup is not None:
            tf.io.gfile.rename(backup, path)
        raise
    if backup is not None:
        if tf.io.gfile.isdir(backup):
            tf.io.gfile.rmtree(backup)
        else:
            tf.io.gfile.remove(backup)


def _float32_policies(serialized):
    """The serialized Keras object with every dtype policy that is not float32 set to float32."""
    if isinstance(serialized, dict):
        if serialized.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            return {**serialized, "config": {**serialized["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in serialized.items()}
    if isinstance(serialized, list):
        return [_float32_policies(value) for value in serialized]
    if isinstance(serialized, str) and serialized.startswith("mixed_"):
        return "float32"
    return serialized


def float32_copy(layer):
    """`layer` (a built Keras layer or model) computing in float32, with the same weights.

    Under a mixed policy the variables are float32 but the computation runs in 16 bits. The copy
    is rebuilt from the layer's config with every policy set to float32, then given its weights.
    Returns `layer` itself when its config holds no other policy.
    """
    serialized = keras.saving.serialize_keras_object(layer)
    rewritten = _float32_policies(serialized)
    if rewritten == serialized:
        return layer
    previous = keras.config.dtype_policy()
    # Sublayers that a layer creates in its __init__ take the global policy, not its own.
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.saving.deserialize_keras_object(rewritten)
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(layer.get_weights())
    return copy


def export_encoder(encoder, path, image_size, channels, projection_head=None, overwrite=False,
                   precision="float32", info=None):
    """Writes a SavedModel serving `encoder` on raw images.

    Signatures:
      `serving_default(images)`: uint8 `[N, H, W, C]`, any H, W, C in {1, 3}.
      `embed_float(images)`: float32 `[N, image_size, image_size, channels]` in [0, 1],
        already preprocessed.
    Both return {"features": float32 [N, D],
                 "embeddings": float32 [N, E], L2-normalised}, where the embeddings
    are `projection_head(features)` when a head is given, else the features.

    The export is written beside `path` and renamed into place, so a crash never
    leaves a half-written export at `path`. `path`/export.json records how it was
    made: precision (the encoder's policy), image size, channels, output sizes, `info`.

    Args:
      encoder: keras.Model, images `[batch, S, S, channels]` in [0, 1] -> `[batch, D]`.
      path: output directory; must not exist or be empty unless `overwrite`.
      image_size: the side length S the encoder was trained / evaluated with.
      channels: the encoder's channel count (1 or 3).
      projection_head: optional Keras layer `[batch, D] -> [batch, E]`.
      overwrite: replace an existing export at `path`.
      precision: "float32" (serve in float32 whatever policy the model was trained
        under) or "as_trained" (keep its policy, e.g. mixed_bfloat16).
      info: optional dict of JSON values added to export.json (e.g. the run it came from).

    Returns:
      `path`.
    """
    path = os.fspath(path)
    _check_export_args(encoder, image_size, channels)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}.")
    if not overwrite and _is_nonempty(path):
        raise ValueError(
            f"Export path {path!r} already exists and is not empty; choose a new path "
            "or pass overwrite=True."
        )

    # One eager call builds an unbuilt head and fails early on a mismatched encoder.
    probe = encoder(tf.zeros([1, image_size, image_size, channels]), training=False)
    if projection_head is not None:
        embeddings_dim = projection_head(tf.cast(probe, tf.float32), training=False).shape[-1]
    else:
        embeddings_dim = probe.shape[-1]
    if precision == "float32":
        encoder = float32_copy(encoder)
        projection_head = None if projection_head is None else float32_copy(projection_head)
    export_info = {
        **(info or {}),
        "precision": encoder.dtype_policy.name,
        "image_size": int(image_size), "channels": int(channels),
        "features_dim": int(probe.shape[-1]), "embeddings_dim": int(embeddings_dim),
        "projection_head": projection_head is not None,
        "signatures": {
            SERVING_SIGNATURE: "uint8 images [N, H, W, 1 or 3], any H and W",
            FLOAT_SIGNATURE: f"float32 images [N, {image_size}, {image_size}, {channels}] in [0, 1]",
        },
    }

    def embed(images):
        features = tf.cast(encoder(images, training=False), tf.float32)
        if projection_head is None:
            embeddings = features
        else:
            embeddings = tf.cast(projection_head(features, training=False), tf.float32)
        return {"features": features, "embeddings": tf.math.l2_normalize(embeddings, axis=-1)}

    def serve_uint8(images):
        return embed(preprocess_for_eval(images, image_size, channels))

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    if projection_head is not None:
        archive.track(projection_head)
    archive.add_endpoint(
        name=SERVING_SIGNATURE,
        fn=serve_uint8,
        input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8, name="images")],
    )
    archive.add_endpoint(
        name=FLOAT_SIGNATURE,
        fn=embed,
        input_signature=[
            tf.TensorSpec([None, image_size, image_size, channels], tf.float32, name="images")
        ],
    )

    parent = os.path.dirname(os.path.abspath(path)) if "://" not in path else None
    if parent:
        tf.io.gfile.makedirs(parent)
    # Beside `path`, under a name that does not start with its name (ram:// matches prefixes).
    head, name = os.path.split(path.rstrip("/"))
    tmp_path = os.path.join(head, f"tmp-{uuid.uuid4().hex[:8]}-{name}")
    try:
        archive.write_out(tmp_path, verbose=False)
        with tf.io.gfile.GFile(f"{tmp_path}/{INFO_FILE}", "w") as handle:
            handle.write(json.dumps(export_info, indent=2, sort_keys=True))
        _replace(tmp_path, path)
    finally:
        if tf.io.gfile.exists(tmp_path):
            tf.io.gfile.rmtree(tmp_path)
    return path


def check_images(images, name="images"):
    """Raises ValueError unless `images` is uint8 `[N, H, W, 1 or 3]`."""
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    shape = tuple(images.shape) if hasattr(images, "shape") else np.shape(images)
    if tf.as_dtype(dtype) != tf.uint8:
        raise ValueError(
            f"{name} must be uint8 pixels in [0, 255], got dtype {tf.as_dtype(dtype).name}; "
            "cast with (x * 255).round().astype('uint8') or use embed_float."
        )
    if len(shape) != 4 or shape[-1] not in _SUPPORTED_CHANNELS:
        raise ValueError(
            f"{name} must have shape [N, height, width, 1 or 3], got {shape}; add a batch "
            "axis with images[None] or a channel axis with images[..., None]."
        )


class ExportedEncoder:
    """A loaded encoder export, callable on uint8 images with eager input checks.

    `encoder(images)` -> {"features": [N, D], "embeddings": [N, E]} (tf.Tensors);
    `encoder.predict(images, batch_size)` -> the same as NumPy, in batches;
    `encoder.embed_float(images)` for float32 `[N, S, S, C]` inputs in [0, 1].
    `image_size` and `channels` are read back from the `embed_float` signature;
    `info` is the export's export.json ({} for an export written without one).
    """

    def __init__(self, loaded, info=None):
        self.loaded = loaded
        self.info = dict(info or {})
        self.signatures = loaded.signatures
        self._serve = loaded.signatures[SERVING_SIGNATURE]
        self._embed_float = loaded.signatures[FLOAT_SIGNATURE]
        spec = self._embed_float.structured_input_signature[1]["images"]
        self.image_size = int(spec.shape[1])
        self.channels = int(spec.shape[3])

    def __call__(self, images):
        check_images(images)
        return self._serve(images=tf.convert_to_tensor(images))

    def embed_float(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        expected = (self.image_size, self.image_size, self.channels)
        if images.shape.rank != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"embed_float expects float32 images of shape [N, {expected[0]}, "
                f"{expected[1]}, {expected[2]}], got {tuple(images.shape)}; use the uint8 "
                "signature to resize any image size."
            )
        return self._embed_float(images=images)

    def predict(self, images, batch_size=256):
        check_images(images)
        outputs = [self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return {key: np.concatenate([o[key].numpy() for o in outputs]) for key in outputs[0]}


def load_encoder(path):
    """Loads an `export_encoder` SavedModel as an `ExportedEncoder`."""
    path = os.fspath(path)
    if not tf.io.gfile.isdir(path):
        raise ValueError(f"No encoder export at {path!r}: the directory does not exist.")
    info_file = f"{path.rstrip('/')}/{INFO_FILE}"
    try:
        loaded = tf.saved_model.load(path)
        info = None
        if tf.io.gfile.exists(info_file):
            with tf.io.gfile.GFile(info_file) as handle:
                info = json.load(handle)
        return ExportedEncoder(loaded, info)
    except Exception as error:  # TF raises many types for a damaged SavedModel.
        raise ValueError(
            f"{path!r} is not a readable encoder SavedModel (missing or corrupted files, "
            f"or not written by export_encoder): {type(error).__name__}: {error}"
        ) from error


def save_full_model(model, path, overwrite=True):
    """Saves a whole Keras model (e.g. NNCLR, with its support set) to `path` (.keras)."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"Model path {path!r} must end with '.keras'.")
    if not overwrite and tf.io.gfile.exists(path):
        raise ValueError(f"{path!r} already exists; choose a new path or pass overwrite=True.")
    parent = os.path.dirname(os.path.abspath(path)) if "://" not in path else None
    if parent:
        tf.io.gfile.makedirs(parent)
    tmp_path = f"{path[: -len('.keras')]}.tmp-{uuid.uuid4().hex[:8]}.keras"
    try:
        model.save(tmp_path)
        tf.io.gfile.rename(tmp_path, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp_path):
            tf.io.gfile.remove(tmp_path)
    return path


def load_full_model(path, safe_mode=True, custom_objects=None, compile=True):
    """Loads a `.keras` model; safe mode refuses archives that carry Python code."""
    path = os.fspath(path)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"No saved model at {path!r}: the file does not exist.")
    # Registers the package's serializable classes (NNCLR, heads, support set).
    if importlib.util.find_spec("nnclr_tf.model") is not None:
        importlib.import_module("nnclr_tf.model")
    try:
        return keras.saving.load_model(
            path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
        )
    except Exception as error:  # zipfile, h5py, JSON and Keras errors all mean "unreadable".
        raise ValueError(
            f"Could not load the Keras model at {path!r} (corrupted file, unknown class, or "
            f"refused by safe_mode={safe_mode}): {type(error).__name__}: {error}"
        ) from error
