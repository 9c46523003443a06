"""Embedding a collection (nnclr_tf.collection), searching it and finding near-duplicates in it."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import nnclr_tf
from conftest import run_nnclr, tiny_encoder
from nnclr_tf import collection, duplicates, search
from nnclr_tf.data import load_arrays


@pytest.fixture(scope="module", name="exported")
def exported_fixture(tmp_path_factory):
    """A tiny random encoder with an 8-d projection head, exported (16 px, RGB)."""
    keras.mixed_precision.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("export") / "encoder")
    nnclr_tf.export_encoder(tiny_encoder((16, 16, 3)), path, image_size=16, channels=3,
                            projection_head=keras.layers.Dense(8))
    return path


def _mixed_folder(root, rng):
    """Nested folder: 7 RGB / grey images of different sizes, a truncated JPEG (caught by the
    scan) and a PNG that looks complete but holds no image (caught when decoding)."""
    sizes = [(20, 30), (9, 41), (64, 17), (16, 16), (33, 33), (50, 12), (13, 70)]
    for i, (h, w) in enumerate(sizes):
        folder = os.path.join(root, "cats" if i % 2 else "dogs", "deep" if i > 3 else "")
        os.makedirs(folder, exist_ok=True)
        shape = (h, w) if i == 3 else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            os.path.join(folder, f"{i}.jpg" if i % 3 == 0 else f"{i}.png"))
    with open(os.path.join(root, "cats", "truncated.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    with open(os.path.join(root, "dogs", "garbage.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x07" * 64 + b"IEND\xaeB`\x82")
    return sizes


def test_embed_folder_of_mixed_sizes_skips_and_reports_corrupt_files(exported, tmp_path):
    rng = np.random.default_rng(0)
    _mixed_folder(tmp_path / "photos", rng)
    result = collection.embed(exported, str(tmp_path / "photos"), output=str(tmp_path / "out"),
                              batch_size=3)
    assert len(result) == 7
    assert sorted(dict(result.skipped)) == ["cats/truncated.jpg", "dogs/garbage.png"]
    assert "decoded" in dict(result.skipped)["dogs/garbage.png"]
    assert set(result.labels.tolist()) == {0, 1}
    assert result.info["class_names"] == ["cats", "dogs"]
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    # Reference: each file alone through the export's own uint8 signature (which resizes).
    encoder = nnclr_tf.load_encoder(exported)
    for row, name in enumerate(result.ids):
        # TensorFlow's JPEG decoder, as PIL's rounds differently.
        image = tf.io.decode_image(open(tmp_path / "photos" / name, "rb").read(), channels=3).numpy()
        expected = encoder(image[None])
        np.testing.assert_allclose(result.features[row], expected["features"][0], atol=1e-4)
        np.testing.assert_allclose(result.embeddings[row], expected["embeddings"][0], atol=1e-4)
    reloaded = collection.load_collection(str(tmp_path / "out"))
    np.testing.assert_array_equal(reloaded.ids, result.ids)
    assert len(reloaded.skipped) == 2


def test_embed_arrays_of_mixed_sizes_and_a_dataset(exported):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(5, 40), (30, 30)]]
    from_list = collection.embed(exported, images)
    encoder = nnclr_tf.load_encoder(exported)
    for row, image in enumerate(images):
        np.testing.assert_allclose(from_list.features[row], encoder(image[None])["features"][0],
                                   atol=1e-4)
    ds = tf.data.Dataset.from_tensor_slices((np.stack([images[1]] * 3), [4, 5, 6]))
    from_ds = collection.embed(exported, ds)
    assert from_ds.labels.tolist() == [4, 5, 6]
    np.testing.assert_allclose(from_ds.features, np.repeat(from_list.features[1:], 3, 0), atol=1e-5)


class _Interrupted(Exception):
    pass


def test_rerun_after_an_interruption_embeds_only_the_rest(exported, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(11):
        Image.fromarray(rng.integers(0, 256, (12 + i, 20, 3), dtype=np.uint8)).save(
            images / f"{i:02d}.png")
    write_shard = collection._write_shard
    written = []

    def crash_on_third(path, **part):
        if len(written) == 2:
            raise _Interrupted()
        written.append(path)
        write_shard(path, **part)

    monkeypatch.setattr(collection, "_write_shard", crash_on_third)
    with pytest.raises(_Interrupted):
        collection.embed(exported, str(images), output=str(tmp_path / "out"), batch_size=2,
                         shard_size=4)
    assert collection.read_manifest(str(tmp_path / "out"))["count"] == 8
    monkeypatch.setattr(collection, "_write_shard", write_shard)

    encoder = nnclr_tf.load_encoder(exported)
    seen = []
    embed_float = encoder.embed_float
    encoder.embed_float = lambda batch: (seen.append(len(batch)), embed_float(batch))[1]
    resumed = collection.embed(encoder, str(images), output=str(tmp_path / "out"), batch_size=2,
                               shard_size=4)
    # One ramp image checks it is the same encoder; then only the 3 images never written.
    assert sum(seen) == 1 + 3
    fresh = collection.embed(exported, str(images))
    order = np.argsort(resumed.ids)
    np.testing.assert_array_equal(resumed.ids[order], fresh.ids)
    np.testing.assert_allclose(resumed.features[order], fresh.features, atol=1e-5)


def test_exact_search_matches_a_full_sort_across_chunks_and_shards():
    rng = np.random.default_rng(3)
    rows = collection.normalise(rng.normal(size=(1000, 16)))
    queries = collection.normalise(rng.normal(size=(7, 16)))
    expected = np.argsort(-(queries @ rows.T), axis=1)[:, :10]
    scores, indices = search.exact_search(queries, [rows[:300], rows[300:]], k=10, chunk_rows=64)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ rows.T, expected, 1), atol=1e-6)
    _, few = search.exact_search(queries, rows[:3], k=10)
    assert few.shape == (7, 3)


def test_test_split_queries_find_themselves_first(exported, embedded_data_dir, monkeypatch):
    """The default suite's quick form (a random encoder, in-process) of the slow journey below."""
    monkeypatch.setenv("TFDS_DATA_DIR", embedded_data_dir)
    embedded = collection.embed(exported, "embedded", split="test")
    images, labels = load_arrays("embedded", "test", limit=6, data_dir=embedded_data_dir)
    result = search.search(embedded, list(images), k=3)
    assert len(embedded) == embedded.info.get("count")
    for q in range(6):
        own = embedded.ids.tolist().index(f"test/{q}")
        assert embedded.labels[own] == labels[q]
        np.testing.assert_allclose(result.scores[q, 0], 1.0, atol=1e-5)
        # Exact copies of a test image elsewhere in the split tie at 1.0; the query must be among them.
        assert own in result.indices[q][result.scores[q] > 1 - 1e-5]


@pytest.fixture(scope="module", name="pretrained")
def pretrained_fixture(tmp_path_factory, embedded_data_dir):
    """A folder holding a `tiny` pretraining run (run/, exported) and the test split embedded with
    it (test.emb), made as a user types the commands."""
    root = tmp_path_factory.mktemp("pretrained")
    for args in (("pretrain", "--preset=tiny", "--model_dir=run", "--set=run.report=false"),
                 ("embed", "--encoder=run", "--dataset=embedded", "--split=test",
                  "--output=test.emb")):
        run_nnclr(*args, cwd=root, data_dir=embedded_data_dir, check=True)
    return root


@pytest.mark.slow  # pretrain, embed, search and knn: four subprocesses, about 2 minutes on 2 cores
def test_test_split_queries_find_themselves_and_their_neighbours_agree_like_knn(
        pretrained, embedded_data_dir):
    images, labels = load_arrays("embedded", "test", data_dir=embedded_data_dir)
    # Queries without a pixel-identical twin in the split (a twin ties with them at 1.0).
    _, first, counts = np.unique(images.reshape(len(images), -1), axis=0, return_index=True,
                                 return_counts=True)
    queries = np.sort(first[counts == 1])[:8]
    (pretrained / "queries").mkdir()
    for i in queries:
        Image.fromarray(images[i][..., 0]).save(pretrained / "queries" / f"{i}.png")
    done = run_nnclr("search", "--collection=test.emb", "--query=queries", "--k=3",
                     cwd=pretrained, data_dir=embedded_data_dir, check=True)
    first_hits = {fields[0]: fields[2:4] for fields in map(str.split, done.stdout.splitlines())
                  if len(fields) >= 4 and fields[1] == "1"}
    assert first_hits == {f"queries/{i}.png": ["1.0000", f"test/{i}"] for i in queries}
    # The table rounds to 4 decimals; the similarity itself to 1e-5.
    embedded = collection.load_collection(str(pretrained / "test.emb"))
    result = search.search(embedded, [str(pretrained / "queries" / f"{i}.png") for i in queries], k=1)
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
    assert embedded.ids[result.indices[:, 0]].tolist() == [f"test/{i}" for i in queries]

    # Every test image against the others, voting as kNN does: its k nearest (itself excluded),
    # each weighted by exp(cosine / temperature).
    truth = labels[[int(i.split("/")[1]) for i in embedded.ids]]
    np.testing.assert_array_equal(embedded.labels, truth)
    bank = len(embedded) - 1
    run_nnclr("knn", "--model_dir=run", f"--set=data.eval_train_split=train[:{bank}]",
              cwd=pretrained, data_dir=embedded_data_dir, check=True)
    with open(pretrained / "run" / "knn.json") as handle:
        knn = json.load(handle)
    assert (knn["num_bank"], knn["num_queries"], knn["test_split"]) == (bank, len(embedded), "test")
    k = knn["k"]
    every = search.search(embedded, embedded, k=k + 1)
    itself = every.indices == np.arange(len(embedded))[:, None]
    assert itself.any(axis=1).all()
    neighbours = every.indices[~itself].reshape(-1, k)
    weights = np.exp(every.scores[~itself].reshape(-1, k) / knn["temperature"])
    votes = np.zeros([len(embedded), int(truth.max()) + 1])
    np.add.at(votes, (np.arange(len(embedded))[:, None], truth[neighbours]), weights)
    agreement = np.mean(votes.argmax(axis=1) == truth)
    # `nnclr knn` is the same classifier on the same 2,000 queries with a bank of the same size from
    # the same distribution (the first 1,999 training images, against the 1,999 other test images
    # here); a larger bank scores higher, hence the matched size. So the two top-1s differ only by
    # which images form the bank: each is a proportion over n queries with standard error
    # sqrt(p (1 - p) / n) (0.011 at p = 0.64, n = 2,000), their difference at most sqrt(2) of that
    # (less, as they share the queries); 3 of those allow 0.046. Measured: 0.644 here, knn 0.634.
    # Rows of the wrong images or labels would agree at about chance, 0.1.
    p = knn["top1"]
    assert abs(agreement - p) <= 3 * np.sqrt(2 * p * (1 - p) / len(embedded))
    assert p > 0.3  # the encoder tells classes apart, so the comparison means something


def _planted_folder(root, data_dir, count=120, copies=12, seed=4):
    """Fashion-MNIST test images as PNGs, plus resized and re-encoded JPEG copies of some."""
    images, _ = load_arrays("embedded", "test", limit=count, data_dir=data_dir)
    rng = np.random.default_rng(seed)
    (root / "originals").mkdir(parents=True)
    (root / "copies").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(root / "originals" / f"{i:03d}.png")
    planted = rng.choice(count, copies, replace=False)
    for i in planted:
        side = int(round(28 * rng.uniform(0.6, 1.6)))
        Image.fromarray(images[i][..., 0]).resize((side, side), Image.BILINEAR).save(
            root / "copies" / f"{i:03d}.jpg", quality=int(rng.integers(60, 91)))
    return {(f"copies/{i:03d}.jpg", f"originals/{i:03d}.png") for i in planted}


def test_duplicates_finds_every_planted_copy_at_the_default_threshold(
        exported, tmp_path, embedded_data_dir):
    planted = _planted_folder(tmp_path / "photos", embedded_data_dir)
    embedded = collection.embed(exported, str(tmp_path / "photos"))
    threshold = duplicates.DEFAULT_THRESHOLD
    pairs = duplicates.duplicate_pairs(embedded.vectors(duplicates.DEFAULT_SPACE), threshold,
                                       chunk_rows=50)
    found = {tuple(sorted((embedded.ids[i], embedded.ids[j]))) for i, j, _ in pairs}
    assert planted <= found
    assert len(found - planted) <= 2
    v = embedded.vectors(duplicates.DEFAULT_SPACE)
    full = {(i, j) for i, j in zip(*np.nonzero(np.triu(v @ v.T >= threshold, 1)))}
    assert {(i, j) for i, j, _ in pairs} == full  # the chunked pass misses none
    groups = duplicates.group_pairs(pairs, len(embedded))
    files = duplicates.write_report(embedded, pairs, groups, str(tmp_path / "report"), threshold)
    removable = open(files["would_remove.txt"]).read().split()
    # The larger of each planted pair is kept: the removed file is the smaller one.
    for copy, original in planted:
        smaller = min((copy, original), key=lambda n: np.prod(Image.open(tmp_path / "photos" / n).size))
        assert str(tmp_path / "photos" / smaller) in removable
    assert all(os.path.exists(tmp_path / "photos" / c) for pair in planted for c in pair)
    assert open(files["review.html"]).read().count("<img src='data:image/png") >= 2 * len(planted)


def test_group_pairs_joins_chains():
    assert duplicates.group_pairs([(0, 1, 1.0), (1, 2, 0.99), (5, 4, 0.98)], 6) == [[0, 1, 2], [4, 5]]


def test_commands_as_a_user_types_them(exported, tmp_path):
    _mixed_folder(tmp_path / "photos", np.random.default_rng(5))
    os.symlink(exported, tmp_path / "encoder")
    done = run_nnclr("embed", "--encoder=encoder", "--input=photos", "--output=photos.emb",
                     cwd=tmp_path, check=True)
    assert "7 images embedded in photos.emb" in done.stdout
    assert "2 files skipped" in done.stdout
    done = run_nnclr("search", "--collection=photos.emb", "--query=photos/dogs/0.jpg", "--k=2",
                     cwd=tmp_path, check=True)
    first = [line for line in done.stdout.splitlines() if line.startswith("photos/dogs/0.jpg")][0]
    assert first.split()[1:4] == ["1", "1.0000", "dogs/0.jpg"]
    assert (tmp_path / "search.png").stat().st_size > 0
    done = run_nnclr("duplicates", "--collection=photos.emb", cwd=tmp_path, check=True)
    assert (tmp_path / "photos.emb_duplicates" / "review.html").exists()
    run_nnclr("map", "--collection=photos.emb", cwd=tmp_path, check=True)
    assert (tmp_path / "photos.emb_map" / "map.png").stat().st_size > 0
    assert (tmp_path / "photos.emb_map" / "projector" / "projector_config.pbtxt").exists()
    done = run_nnclr("embed", "--input=photos", "--output=x", cwd=tmp_path)
    assert done.returncode == 2 and "nnclr embed: error: Pass --encoder=" in done.stderr


def test_faiss_missing_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError("no faiss")) if name == "faiss" else real_import(name, *a, **k)))
    from nnclr_tf import collection_modes
    (tmp_path / "q.png").write_bytes(b"")
    with pytest.raises(collection_modes.UsageError, match=r"pip install nnclr_tf\[search\]"):
        collection_modes.search(collection="c", queries=[str(tmp_path / "q.png")], index="faiss")


def test_faiss_index_finds_the_exact_neighbours_of_a_small_collection():
    rng = np.random.default_rng(6)
    rows = collection.normalise(rng.normal(size=(500, 16)))
    _, exact = search.exact_search(rows[:20], rows, k=5)
    _, approximate = search.faiss_search(search.faiss_index(rows), rows[:20], 5)
    np.testing.assert_array_equal(approximate[:, 0], np.arange(20))
    assert np.mean([len(set(a) & set(e)) for a, e in zip(approximate, exact)]) >= 4.5
