"""PNG pictures: training curves and nearest-neighbour grids (the paper's figure style).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing
needs a display and the caller's matplotlib backend is left alone.

    history = read_csv_log("runs/x/log.csv")          # or model.fit(...).history
    plot_training_curves(history, "runs/x/curves.png")
    idx = nearest_neighbour_images(model.encoder, queries, support, k=8)
    plot_neighbour_grid(queries, support[idx], "runs/x/neighbours.png",
                        query_labels=q_labels, neighbour_labels=s_labels[idx])
"""

import csv
import math
import os

import keras
import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Plotted first, in this order; any other numeric column follows.
KNOWN_METRICS = ("loss", "contrastive_acc", "nn_acc", "z_std", "probe_loss", "probe_acc",
                 "knn_top1")
GRID_CELL_INCHES = 1.2
GRID_DPI = 100
_WRONG_COLOUR = "#e00000"
_QUERY_COLOUR = "#000000"


def read_csv_log(path):
    """Reads a `keras.callbacks.CSVLogger` file into {column: [float, ...]}."""
    path = os.fspath(path)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"No training log at {path!r}: the file does not exist.")
    with tf.io.gfile.GFile(path, "r") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"Training log {path!r} has no rows; train at least one epoch first.")
    history = {}
    for column in rows[0]:
        try:
            history[column] = [float(row[column]) for row in rows]
        except (TypeError, ValueError):
            continue  # Non-numeric columns (none by default) are not plottable.
    return history


def _save(fig, path):
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    FigureCanvasAgg(fig)
    with tf.io.gfile.GFile(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=GRID_DPI)
    return path


def plot_training_curves(history, path, metrics=None):
    """One subplot per metric, x = epoch; `val_<metric>` shares its metric's subplot.

    Args:
      history: {metric: [value per epoch]} (`keras.callbacks.History.history`, or
        `read_csv_log`), or a `History` object. An "epoch" column sets the x values.
      path: PNG to write.
      metrics: names to plot; default all present, the paper's metrics first.
    """
    if isinstance(history, keras.callbacks.History):
        history = history.history
    history = {k: np.asarray(v, np.float64).reshape(-1) for k, v in dict(history).items()}
    names = [k for k in history if k not in ("epoch", "step") and not k.startswith("val_")
             and len(history[k])]
    names = [m for m in KNOWN_METRICS if m in names] + [m for m in names if m not in KNOWN_METRICS]
    if metrics is not None:
        missing = [m for m in metrics if m not in history]
        if missing:
            raise ValueError(f"Metrics {missing} are not in the history (has {sorted(history)}).")
        names = list(metrics)
    if not names:
        raise ValueError("history has no metric values to plot; train at least one epoch first.")

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, style in ((name, "-"), ("val_" + name, "--")):
            values = history.get(key)
            if values is None or not len(values):
                continue
            epochs = history.get("epoch")
            # CSVLogger and History count epochs from 0; people count from 1.
            x = epochs + 1 if epochs is not None and len(epochs) == len(values) else None
            x = np.arange(1, len(values) + 1) if x is None else x
            ax.plot(x, values, style, marker="." if len(values) < 30 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if "val_" + name in history:
            ax.legend(fontsize="small")
    return _save(fig, path)


def _as_display(images, name):
    """uint8 or float [0, 1] `[..., H, W]` / `[..., H, W, 1 or 3]` -> float `[..., H, W, 3]`."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError(
                f"{name} are floats in [{images.min():.3g}, {images.max():.3g}]; expected "
                "[0, 1] (or uint8); undo any normalisation first."
            )
        images = np.clip(images.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {images.dtype}.")
    if images.shape[-1] not in (1, 3):
        images = images[..., None]  # [..., H, W] grayscale without a channel axis.
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _label_text(label, class_names):
    if label is None or label < 0:
        return None
    if class_names is not None and label < len(class_names):
        return str(class_names[label])
    return str(int(label))


def _frame(ax, colour, width):
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(width)


def plot_neighbour_grid(
    query_images, neighbour_images, path, query_labels=None, neighbour_labels=None,
    class_names=None,
):
    """Rows = queries: the query (black box), then its k nearest neighbours.

    A neighbour whose label differs from its query's gets a red frame. The PNG is
    `(k + 1) * GRID_CELL_INCHES * GRID_DPI` pixels wide and `Q * ...` high.

    Args:
      query_images: `[Q, H, W(, C)]`, uint8 or float in [0, 1], C in {1, 3}.
      neighbour_images: `[Q, k, H, W(, C)]` (e.g. `support[indices]`).
      path: PNG to write.
      query_labels: optional int `[Q]`; neighbour_labels: optional int `[Q, k]`.
      class_names: optional names indexed by label, shown as titles.
    """
    queries = _as_display(query_images, "query_images")
    neighbours = _as_display(neighbour_images, "neighbour_images")
    if queries.ndim != 4 or neighbours.ndim != 5 or neighbours.shape[0] != queries.shape[0]:
        raise ValueError(
            f"Expected query_images [Q, H, W, C] and neighbour_images [Q, k, H, W, C], got "
            f"{np.shape(query_images)} and {np.shape(neighbour_images)}."
        )
    num_queries, k = neighbours.shape[:2]
    q_labels = None if query_labels is None else np.asarray(query_labels).reshape(num_queries)
    n_labels = None
    if neighbour_labels is not None:
        n_labels = np.asarray(neighbour_labels).reshape(num_queries, k)

    fig = Figure(figsize=(GRID_CELL_INCHES * (k + 1), GRID_CELL_INCHES * num_queries))
    titled = q_labels is not None or n_labels is not None
    # Leave a band above each image for its label; frames need a small margin.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95 if titled else 0.99,
                        wspace=0.08, hspace=0.3 if titled else 0.08)
    for row in range(num_queries):
        query_label = None if q_labels is None else int(q_labels[row])
        for col in range(k + 1):
            ax = fig.add_subplot(num_queries, k + 1, row * (k + 1) + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.imshow(queries[row], interpolation="nearest")
                _frame(ax, _QUERY_COLOUR, 3.0)
                label = query_label
            else:
                ax.imshow(neighbours[row, col - 1], interpolation="nearest")
                label = None if n_labels is None else int(n_labels[row, col - 1])
                wrong = query_label is not None and label is not None and label != query_label
                _frame(ax, _WRONG_COLOUR if wrong else None, 3.0)
            text = _label_text(label, class_names)
            if text is not None:
                ax.set_title(text, fontsize=7, pad=2)
    return _save(fig, path)


def _embed(encoder_or_embed_fn, images, projection_head, batch_size):
    """Embeds `[N, H, W, C]` images in batches -> L2-normalised float32 `[N, E]`."""
    is_keras = isinstance(encoder_or_embed_fn, keras.Model)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if is_keras:
            # Keras encoders take float [0, 1]; callables (e.g. load_encoder) get the input as is.
            if batch.dtype == np.uint8:
                batch = batch.astype(np.float32) / 255.0
            out = encoder_or_embed_fn(batch, training=False)
        else:
            out = encoder_or_embed_fn(batch)
        if isinstance(out, dict):
            out = out["embeddings"] if projection_head is None else out["features"]
        if projection_head is not None:
            out = projection_head(tf.cast(out, tf.float32), training=False)
        chunks.append(np.asarray(tf.cast(out, tf.float32)))
    embeddings = np.concatenate(chunks).reshape(len(images), -1)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def nearest_neighbour_images(
    encoder_or_embed_fn, query_images, support_images, k=8, projection_head=None,
    batch_size=256,
):
    """Indices `[Q, k]` of the support images most cosine-similar to each query.

    Args:
      encoder_or_embed_fn: a keras.Model on float [0, 1] images (uint8 is scaled),
        or any callable on a batch returning `[batch, E]` or a dict with
        "embeddings" (such as `export.load_encoder(path)`).
      query_images: `[Q, H, W, C]`; support_images: `[S, H, W, C]`.
      k: neighbours per query, at most S.
      projection_head: optional layer applied to the features before normalising.
      batch_size: images per encoder call.

    Returns:
      int64 `[Q, k]`, most similar first. A query that is also in the support set
      finds itself first.
    """
    query_images = np.asarray(query_images)
    support_images = np.asarray(support_images)
    if not 1 <= k <= len(support_images):
        raise ValueError(
            f"k={k} must be between 1 and the number of support images ({len(support_images)})."
        )
    queries = _embed(encoder_or_embed_fn, query_images, projection_head, batch_size)
    support = _embed(encoder_or_embed_fn, support_images, projection_head, batch_size)
    similarity = queries @ support.T
    # Stable sort: equal similarities keep the support order, so results are reproducible.
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k].astype(np.int64)
