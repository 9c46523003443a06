"""Seeing a collection: the PCA map and the TensorBoard projector export (read back by its plugin)."""

import os

import numpy as np
from google.protobuf import text_format
from PIL import Image

from nnclr_tf import collection, projection


def _collection(rng, n=10, dim=6):
    features = rng.normal(size=(n, dim)).astype(np.float32)
    return collection.Collection(
        ids=np.asarray([f"{i}.png" for i in range(n)]), labels=np.arange(n, dtype=np.int32) % 3,
        features=features, embeddings=collection.normalise(features), skipped=[],
        info={"class_names": ["a", "b", "c"], "root": None, "source": "arrays"})


def test_pca_matches_numpy_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    points = projection.pca_2d(x)
    centred = x - x.mean(0)
    _, vectors = np.linalg.eigh(np.cov(centred.T))
    reference = centred @ vectors[:, ::-1][:, :2]
    # Axes are defined up to sign.
    np.testing.assert_allclose(np.abs(points), np.abs(reference), rtol=1e-4, atol=1e-4)


def test_map_png(tmp_path):
    path = projection.plot_map(_collection(np.random.default_rng(1)), str(tmp_path / "map.png"))
    assert Image.open(path).size[0] > 300


def test_projector_export_loads_in_tensorboards_plugin(tmp_path):
    from tensorboard.plugins.projector import projector_config_pb2, projector_plugin
    import tensorflow as tf
    rng = np.random.default_rng(2)
    embedded = _collection(rng)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in embedded.ids:
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / name)
    embedded.info.update(root=str(folder), source=f"folder:{folder}")
    log_dir = str(tmp_path / "projector")
    rows = projection.write_projector(embedded, log_dir, max_rows=7)
    assert len(rows) == 7
    config = projector_config_pb2.ProjectorConfig()
    text_format.Parse(open(os.path.join(log_dir, "projector_config.pbtxt")).read(), config)
    entry = config.embeddings[0]
    # The plugin's own lookups: its checkpoint finder and reader, as TensorBoard uses them.
    reader = tf.train.load_checkpoint(projector_plugin._find_latest_checkpoint(log_dir))
    tensor = reader.get_tensor(entry.tensor_name)
    np.testing.assert_allclose(tensor, embedded.vectors()[rows], atol=1e-6)
    metadata = open(os.path.join(log_dir, entry.metadata_path)).read().splitlines()
    assert metadata[0] == "id\tlabel" and len(metadata) == 1 + len(rows)
    assert metadata[1:3] == [f"{embedded.ids[rows[0]]}\ta", f"{embedded.ids[rows[1]]}\t" +
                             "abc"[embedded.labels[rows[1]]]]
    sprite = Image.open(os.path.join(log_dir, entry.sprite.image_path))
    side = int(np.ceil(np.sqrt(len(rows)))) * projection.SPRITE_CELL
    assert sprite.size == (side, side)
    assert list(entry.sprite.single_image_dim) == [projection.SPRITE_CELL] * 2
