"""Embedding a collection of images with an exported encoder, in shards on disk, resumable.

    collection = embed("runs/demo", "~/photos", output="photos.emb")  # model dir or SavedModel
    collection = embed(encoder, [image_a, image_b])          # arrays of any sizes, in memory
    collection.ids, collection.labels                        # [N] str, [N] int32 (-1: unknown)
    collection.features, collection.embeddings               # [N, D] float32, [N, E] L2-normalised

A source is a folder (any sizes, nested; unreadable files are skipped and listed in
`collection.skipped`), a list of image files, a list or array of uint8 images of mixed sizes, a
`tf.data.Dataset` of images or (image, label), or a TFDS name with `split`. With `output`, the
collection is written as a folder `shard-00000.npz, ...` (ids, labels, features, embeddings) plus
`manifest.json`; each shard is written whole, then recorded, so an interrupted run keeps every
finished shard and the same call again embeds only the images not yet embedded.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
import uuid

import numpy as np
import tensorflow as tf

from nnclr_tf import export as export_lib
from nnclr_tf import runs
from nnclr_tf import collection_sources

log = logging.getLogger("nnclr_tf")
MANIFEST = "manifest.json"
FORMAT = "nnclr_tf.collection/1"
DEFAULT_SHARD_SIZE = 4096
SPACES = ("features", "embeddings", "thumbnails")
_PARTS = ("ids", "labels", "features", "embeddings", "thumbnails")
THUMBNAIL_SIDE = 8


@dataclasses.dataclass
class Collection:
    """An embedded collection. Rows are images; `ids` are file paths (relative to `root` for a
    folder), "split/index" for TFDS, or positions for arrays.

    ids: [N] str; labels: [N] int32 (-1 when unknown); features: [N, D] float32;
    embeddings: [N, E] float32, L2-normalised; skipped: [(id, reason)];
    info: the manifest (encoder, source, class names, sizes);
    thumbnails: [N, 64] float32, the whole image shrunk to 8x8 grey and standardised, a perceptual
      signature as image hashing uses: the best space for near-duplicates (see duplicates.py).
    """
    ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    embeddings: np.ndarray
    skipped: list
    info: dict
    thumbnails: np.ndarray = None

    def __len__(self):
        return len(self.ids)

    @property
    def class_names(self):
        return tuple(self.info.get("class_names") or ())

    def vectors(self, space="features"):
        """[N, dim] L2-normalised rows of `space` (one of SPACES)."""
        if space not in SPACES:
            raise ValueError(f"--space={space!r} must be one of {', '.join(SPACES)}.")
        return normalise(getattr(self, space))

    def path(self, i):
        """The file of row `i` (None for rows that are not files)."""
        root = self.info.get("root")
        return None if root is None else os.path.join(root, str(self.ids[i]))


def normalise(x):
    """[N, D] -> rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def resolve_encoder(encoder):
    """An ExportedEncoder from itself, a SavedModel folder, or a model dir holding saved_model/."""
    if isinstance(encoder, export_lib.ExportedEncoder):
        return encoder, getattr(encoder, "path", "in-memory encoder")
    path = os.path.expanduser(os.fspath(encoder))
    if "://" not in path:
        path = os.path.abspath(path)  # recorded in the manifest: search finds it from anywhere
    for candidate in (path, os.path.join(path, "saved_model")):
        if runs.exists(os.path.join(candidate, "saved_model.pb")):
            return export_lib.load_encoder(candidate), candidate
    raise ValueError(f"--encoder {os.fspath(encoder)!r} is neither an encoder SavedModel nor a model "
                     "dir holding saved_model/; pass a folder written by `nnclr export` or "
                     "`nnclr pretrain` (run `nnclr export --model_dir=...` first if it has none).")


def _read_shard(path):
    with tf.io.gfile.GFile(path, "rb") as handle:
        with np.load(io.BytesIO(handle.read()), allow_pickle=False) as shard:
            return {key: shard[key] for key in shard.files}


def thumbnail_signature(image):
    """uint8 [H, W, C] -> float32 [64]: the image shrunk to 8x8 grey, zero mean and unit norm."""
    grey = tf.reduce_mean(tf.cast(image, tf.float32), axis=-1, keepdims=True)
    small = tf.reshape(tf.image.resize(grey, [THUMBNAIL_SIDE, THUMBNAIL_SIDE], antialias=True), [-1])
    return tf.math.l2_normalize(small - tf.reduce_mean(small))


def _write_shard(path, ids, labels, features, embeddings, thumbnails):
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray(ids, dtype=str), labels=np.asarray(labels, np.int32),
             features=np.asarray(features, np.float32), embeddings=np.asarray(embeddings, np.float32),
             thumbnails=np.asarray(thumbnails, np.float32))
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(tmp, "wb") as handle:
        handle.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def iter_shards(output):
    """Yields each shard of an embedded collection folder as a dict of arrays (ids, labels,
    features [n, D], embeddings [n, E]): bounded memory for collections larger than it."""
    manifest = read_manifest(output)
    for shard in manifest["shards"]:
        yield _read_shard(os.path.join(output, shard["file"]))


def read_manifest(output):
    path = os.path.join(os.fspath(output), MANIFEST)
    if not runs.exists(path):
        raise ValueError(f"{os.fspath(output)!r} is not an embedded collection (no {MANIFEST}); "
                         "write one with `nnclr embed --encoder=... --input=... --output=...`.")
    return runs.read_json(path)


def load_collection(output):
    """The whole collection written at `output`, in memory."""
    manifest = read_manifest(output)
    return _collection(list(iter_shards(output)), [tuple(s) for s in manifest.get("skipped", [])],
                       manifest)


def _collection(parts, skipped, manifest):
    """A Collection of the concatenated shard dicts `parts` (none: an empty collection)."""
    dims = {"features": manifest.get("features_dim", 0),
            "embeddings": manifest.get("embeddings_dim", 0), "thumbnails": THUMBNAIL_SIDE ** 2}
    joined = {}
    for key in _PARTS:
        if parts:
            joined[key] = np.concatenate([p[key] for p in parts])
        else:
            joined[key] = np.zeros([0, dims[key]] if key in dims else [0],
                                   str if key == "ids" else np.float32 if key in dims else np.int32)
    return Collection(joined["ids"], joined["labels"], joined["features"], joined["embeddings"],
                      skipped, manifest, joined["thumbnails"])


class _Progress:
    """One line per update: done / total, images per second and the time left."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.monotonic()
        self.last = 0.0

    def update(self, count, final=False):
        self.done += count
        now = time.monotonic()
        if not self.enabled or (now - self.last < 2.0 and not final):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if final:
            print(f"embedded {self.done} new images ({rate:.0f} img/s)", flush=True)
            return
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"embedded {self.done}/{self.total} images, {rate:.0f} img/s, "
              f"ETA {left:.0f} s", flush=True)


def embed(encoder, source, output=None, split="test", data_dir=None, batch_size=64,
          shard_size=DEFAULT_SHARD_SIZE, overwrite=False, progress=None):
    """Embeds every image of `source` with `encoder`; see the module docstring.

    Args:
      encoder: an ExportedEncoder, an encoder SavedModel folder or a model dir with saved_model/.
      source: folder, list of files, list / array of uint8 [H, W, C] images, tf.data.Dataset of
        images or (image, label), or a TFDS name (with `split`, `data_dir`).
      output: folder to write shards and manifest.json to (None: in memory only). A folder already
        holding a collection of the same encoder and source is resumed.
      batch_size: images per encoder call; shard_size: images per shard file.
      overwrite: start `output` afresh instead of resuming it.
      progress: print a progress line (default: when writing to `output`).

    Returns:
      The Collection (with `output`, everything the folder holds, earlier runs included).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"--batch_size={batch_size} and shard size {shard_size} must be >= 1.")
    model, model_path = resolve_encoder(encoder)
    items = collection_sources.items_of(source, split, data_dir)
    manifest = {"format": FORMAT, "encoder": str(model_path), "image_size": model.image_size,
                "channels": model.channels, "probe": _probe(model), **items.info, "shards": [], "skipped": []}
    done_ids = set()
    if output is not None:
        output = os.fspath(output)
        manifest, done_ids = _resume(output, manifest, overwrite)
    keep = np.asarray([i for i, name in enumerate(items.ids) if name not in done_ids], np.int64)
    if done_ids:
        log.info("%s already holds %d embedded images; embedding the other %d.", output,
                 len(done_ids), len(keep))
    image_size, channels = model.image_size, model.channels
    ds = items.dataset(keep).map(
        lambda i, image, y: (i, export_lib.preprocess_for_eval(image, image_size, channels), y,
                             thumbnail_signature(image)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(batch_size).prefetch(2)

    bar = _Progress(len(keep), output is not None if progress is None else progress)
    buffer = {key: [] for key in _PARTS}
    in_memory = []
    received = set()

    def flush():
        if not buffer["ids"]:
            return
        part = {key: np.concatenate(value) for key, value in buffer.items()}
        for value in buffer.values():
            value.clear()
        if output is None:
            in_memory.append(part)
            return
        name = f"shard-{len(manifest['shards']):05d}-{uuid.uuid4().hex[:6]}.npz"
        _write_shard(os.path.join(output, name), **part)
        manifest["shards"].append({"file": name, "count": int(len(part["ids"]))})
        manifest["count"] = int(sum(s["count"] for s in manifest["shards"]))
        runs.write_json(os.path.join(output, MANIFEST), manifest)

    for ids, images, labels, thumbnails in ds:
        out = model.embed_float(images)
        ids = ids.numpy().astype(str)
        received.update(ids)
        buffer["ids"].append(ids)
        buffer["labels"].append(labels.numpy())
        buffer["features"].append(out["features"].numpy())
        buffer["embeddings"].append(out["embeddings"].numpy())
        buffer["thumbnails"].append(thumbnails.numpy())
        manifest.setdefault("features_dim", int(out["features"].shape[-1]))
        manifest.setdefault("embeddings_dim", int(out["embeddings"].shape[-1]))
        bar.update(len(ids))
        if sum(len(b) for b in buffer["ids"]) >= shard_size:
            flush()
    flush()
    bar.update(0, final=True)
    undecodable = [(items.ids[i], "could not be decoded (corrupt image data)") for i in keep
                   if items.ids[i] not in received]
    skipped = items.skipped + undecodable
    if skipped:
        shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:5])
        log.warning("Skipped %d files that are not readable images: %s%s", len(skipped), shown,
                    " ..." if len(skipped) > 5 else "")
    manifest["skipped"] = [list(s) for s in skipped]
    if output is None:
        manifest["count"] = int(sum(len(p["ids"]) for p in in_memory))
        return _collection(in_memory, skipped, manifest)
    manifest["count"] = int(sum(s["count"] for s in manifest["shards"]))
    runs.write_json(os.path.join(output, MANIFEST), manifest)
    return load_collection(output)


def _probe(model):
    """The features of a fixed ramp image, [D] list: tells encoders apart whatever their path."""
    side, channels = model.image_size, model.channels
    ramp = (np.arange(side * side * channels) % 251).astype(np.float32) / 255.0
    features = model.embed_float(ramp.reshape(1, side, side, channels))
    return [round(float(v), 5) for v in np.asarray(features["features"][0])]


def _resume(output, manifest, overwrite):
    """(manifest to continue, ids already embedded) for the collection folder `output`."""
    path = os.path.join(output, MANIFEST)
    if runs.exists(path) and not overwrite:
        old = runs.read_json(path)
        for key in ("source", "image_size", "channels"):
            if old.get(key) != manifest.get(key):
                raise ValueError(
                    f"--output {output!r} holds a collection embedded with {key} "
                    f"{old.get(key)!r}, not {manifest.get(key)!r}; pass --overwrite to replace it "
                    "or choose another --output.")
        if len(old.get("probe", [])) != len(manifest["probe"]) or not np.allclose(
                old["probe"], manifest["probe"], atol=1e-4):
            raise ValueError(
                f"--output {output!r} holds a collection embedded with another encoder "
                f"({old.get('encoder')}); pass --overwrite to replace it or choose another --output.")
        if manifest["encoder"] != "in-memory encoder":
            old["encoder"] = manifest["encoder"]
        done = set()
        for shard in old["shards"]:
            done.update(_read_shard(os.path.join(output, shard["file"]))["ids"].tolist())
        return old, done
    if runs.exists(output) and tf.io.gfile.listdir(output) and not runs.exists(path):
        raise ValueError(f"--output {output!r} exists and is not an embedded collection; choose "
                         "a new --output (nothing there is removed).")
    if overwrite and runs.exists(output):
        for name in tf.io.gfile.listdir(output):
            if name == MANIFEST or name.startswith("shard-"):
                tf.io.gfile.remove(os.path.join(output, name))
    runs.makedirs(output)
    return manifest, set()
