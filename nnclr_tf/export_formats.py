"""The encoder in other runtimes: TensorFlow Lite (LiteRT) and ONNX, converted from its SavedModel.

    write_tflite("runs/demo/saved_model", "encoder.tflite")
    runner = tflite_runner("encoder.tflite")          # LiteRT's interpreter (or tf.lite's)
    out = runner(images_uint8)                        # {"features": [N, D], "embeddings": [N, E]}

The converted model takes uint8 images already at the encoder's size, [N, S, S, C] (S and C in
the SavedModel's export.json): the SavedModel's any-size resize uses an antialiased kernel that
TFLite's built-in operators do not have, so the caller resizes (as a phone app does with its
camera frames). Its outputs are those of the SavedModel's `embed_float` signature on `images / 255`.
The runners here refuse anything else in one sentence; LiteRT's own interpreter would run another
size (other features) and read one unbatched [S, S, C] image as S images.
"""

from __future__ import annotations

import os

import numpy as np

FORMATS = ("savedmodel", "tflite", "onnx")


def _uint8_function(saved_model_path):
    """(tf.function uint8 [None, S, S, C] -> outputs, the loaded SavedModel)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    loaded = tf.saved_model.load(saved_model_path)
    embed_float = loaded.signatures["embed_float"]
    spec = embed_float.structured_input_signature[1]["images"]

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.shape[1:]], tf.uint8, name="images")])
    def serve(images):
        return embed_float(images=tf.cast(images, tf.float32) / 255.0)

    return serve, loaded


def write_tflite(saved_model_path, path):
    """Converts the encoder SavedModel at `saved_model_path` to a .tflite file at `path`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from nnclr_tf import runs  # pylint: disable=import-outside-toplevel
    serve, loaded = _uint8_function(saved_model_path)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], loaded)
    content = converter.convert()
    parent = os.path.dirname(path)
    if parent:
        runs.makedirs(parent)
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "wb") as handle:
        handle.write(content)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path


def _interpreter_class():
    """LiteRT's Interpreter (PyPI ai-edge-litert), else TensorFlow's deprecated tf.lite one."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
        return Interpreter
    except ImportError:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        return tf.lite.Interpreter


def tflite_runner(path):
    """A function uint8 [N, S, S, C] -> {"features", "embeddings"} NumPy, run by the interpreter."""
    interpreter = _interpreter_class()(model_path=os.fspath(path))
    runner = interpreter.get_signature_runner()
    shape = runner.get_input_details()["images"]["shape_signature"][1:]

    def run(images):
        # The interpreter itself would run other sizes (different features) and take one
        # unbatched image as a batch of rows.
        return runner(images=_checked_images(images, shape, "TFLite"))

    return run


def write_onnx(saved_model_path, path, opset=17):
    """Converts the SavedModel to ONNX with tf2onnx (`pip install nnclr_tf[onnx]`)."""
    try:
        import tf2onnx  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ValueError("--format=onnx needs tf2onnx, which is not installed; run "
                         "`pip install nnclr_tf[onnx]`.") from error
    serve, _ = _uint8_function(saved_model_path)
    tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=opset,
                                  output_path=os.fspath(path))
    return path


def onnx_runner(path):
    """A function uint8 [N, S, S, C] -> {"features", "embeddings"} NumPy, run by onnxruntime."""
    try:
        import onnxruntime  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ValueError("Running the ONNX encoder needs onnxruntime, which is not installed; "
                         "run `pip install nnclr_tf[onnx]`.") from error
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    shape = session.get_inputs()[0].shape[1:]

    def run(images):
        return dict(zip(names, session.run(None, {"images": _checked_images(images, shape, "ONNX")})))

    return run


def _checked_images(images, shape, runtime):
    """`images` as a NumPy array after checking that it is uint8 [N, *shape], what the model takes."""
    images = np.asarray(images)
    expected = [int(d) for d in shape]
    if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape[1:]) != expected:
        raise ValueError(
            f"The {runtime} encoder takes uint8 images [N, {', '.join(map(str, expected))}] (pixels "
            f"0-255 at the encoder's size), got {images.dtype} {list(images.shape)}; resize them and "
            "pass uint8.")
    return images
