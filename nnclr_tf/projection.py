"""Seeing an embedded collection: a 2-D map coloured by label, and a TensorBoard projector export.

    collection = load_collection("photos.emb")
    plot_map(collection, "map.png")                  # PCA of the features, one colour per class
    write_projector(collection, "projector/")        # then: tensorboard --logdir projector/

The projector export is TensorBoard's own format: a checkpoint holding the embedding variable,
metadata.tsv (id and label of each row), sprite.png (a thumbnail per row) and
projector_config.pbtxt tying them together.
"""

from __future__ import annotations

import os

import numpy as np

from nnclr_tf import runs

SPRITE_CELL = 32  # pixels per thumbnail; TensorBoard's sprite is at most 8192 px wide
DEFAULT_PROJECTOR_ROWS = 4096
TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"


def pca_2d(vectors):
    """[N, D] -> [N, 2]: the rows projected on their two principal axes (centred, via SVD)."""
    x = np.asarray(vectors, np.float64)
    x = x - x.mean(axis=0)
    _, _, axes = np.linalg.svd(x, full_matrices=False)
    return (x @ axes[:2].T).astype(np.float32)


def plot_map(collection, path, space="features"):
    """PNG scatter of the collection's PCA map, coloured by label (grey when unlabelled)."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    from nnclr_tf import pictures  # pylint: disable=import-outside-toplevel
    if len(collection) < 2:
        raise ValueError("A map needs at least two embedded images; embed more with nnclr embed.")
    points = pca_2d(collection.vectors(space))
    labels = np.asarray(collection.labels)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot(1, 1, 1)
    size = max(2.0, 30.0 / np.sqrt(len(points) / 100.0 + 1))
    unlabelled = labels < 0
    if unlabelled.any():
        ax.scatter(*points[unlabelled].T, s=size, c="#999999", label="no label", linewidths=0)
    names = collection.class_names
    for label in np.unique(labels[~unlabelled]):
        name = names[label] if label < len(names) else str(label)
        ax.scatter(*points[labels == label].T, s=size, label=name, linewidths=0,
                   color=_colour(int(label)))
    ax.set_xlabel("principal axis 1")
    ax.set_ylabel("principal axis 2")
    ax.set_title(f"{len(points)} images, {space} (PCA)")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return pictures._save(fig, path)


def _colour(label):
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
    return colormaps["tab20"](label % 20)


def _sprite(images, cell=SPRITE_CELL):
    """uint8 [rows*cell, cols*cell, 3]: each image shrunk into a cell, square grid, row-major."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    side = int(np.ceil(np.sqrt(len(images))))
    sheet = np.zeros([side * cell, side * cell, 3], np.uint8)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        thumb = Image.fromarray(image).convert("RGB").resize((cell, cell), Image.BILINEAR)
        row, col = divmod(i, side)
        sheet[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = np.asarray(thumb)
    return sheet


def write_projector(collection, log_dir, space="features", max_rows=DEFAULT_PROJECTOR_ROWS):
    """Writes a TensorBoard projector export of (up to `max_rows` evenly spaced) rows to `log_dir`.

    Returns the rows written ([M] indices into the collection).
    """
    import io  # pylint: disable=import-outside-toplevel

    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from tensorboard.plugins import projector  # pylint: disable=import-outside-toplevel

    from nnclr_tf import search  # pylint: disable=import-outside-toplevel
    rows = np.unique(np.linspace(0, len(collection) - 1, min(max_rows, len(collection))).astype(int))
    runs.makedirs(log_dir)
    embedding = tf.Variable(collection.vectors(space)[rows], name="embedding")
    tf.train.Checkpoint(embedding=embedding).save(os.path.join(log_dir, "embedding.ckpt"))
    names = collection.class_names
    lines = ["id\tlabel"]
    for r in rows:
        label = int(collection.labels[r])
        text = "" if label < 0 else names[label] if label < len(names) else str(label)
        lines.append(f"{collection.ids[r]}\t{text}".replace("\n", " "))
    runs.write_text(os.path.join(log_dir, "metadata.tsv"), "\n".join(lines) + "\n")
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = TENSOR_NAME
    entry.metadata_path = "metadata.tsv"
    images = search.collection_images(collection, rows)
    if images is not None:
        buffer = io.BytesIO()
        Image.fromarray(_sprite(images)).save(buffer, format="PNG")
        with tf.io.gfile.GFile(os.path.join(log_dir, "sprite.png"), "wb") as handle:
            handle.write(buffer.getvalue())
        entry.sprite.image_path = "sprite.png"
        entry.sprite.single_image_dim.extend([SPRITE_CELL, SPRITE_CELL])
    projector.visualize_embeddings(log_dir, config)
    return rows
