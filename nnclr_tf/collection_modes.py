"""The `nnclr` modes that use a trained encoder: embed, search, duplicates. The CLI passes values,
never flags:

    nnclr embed --encoder=runs/demo --input=photos --output=photos.emb
    nnclr search --collection=photos.emb --query=query.jpg --k=5 --output=search.png
    nnclr duplicates --collection=photos.emb --output=photos_duplicates
    nnclr map --collection=photos.emb --output=photos_map
"""

from __future__ import annotations

import os

MODES = {
    "embed": "embed a folder (or a TFDS split) with an encoder into a collection folder; resumable",
    "search": "the --k nearest images of a collection to each --query image (table and picture)",
    "duplicates": "near-duplicate groups of a collection above a cosine --threshold (never deletes)",
    "map": "a 2-D map of a collection coloured by label (PNG) and a TensorBoard projector export",
}


class UsageError(ValueError):
    """A flag is missing or wrong; the message names it."""


def embed(encoder=None, model_dir=None, inputs=(), dataset=None, split="test", data_dir=None,
          output=None, batch_size=None, overwrite=False):
    encoder = encoder or model_dir
    if not encoder:
        raise UsageError("Pass --encoder=<model dir or SavedModel folder>, e.g. --encoder=runs/demo.")
    if bool(inputs) == bool(dataset):
        raise UsageError("Pass either --input=<folder or image files> or --dataset=<TFDS name> "
                         "(with --split), not both or neither.")
    if not output:
        raise UsageError("Pass --output=<folder for the collection>, e.g. --output=photos.emb.")
    if inputs:
        source = inputs[0] if len(inputs) == 1 and os.path.isdir(os.path.expanduser(inputs[0])) \
            else [os.path.expanduser(p) for p in _files(inputs)]
    else:
        source = dataset
    from nnclr_tf import collection as collection_lib  # TensorFlow: after the flags are checked
    result = collection_lib.embed(encoder, source, output=output, split=split, data_dir=data_dir,
                                  batch_size=batch_size or 64, overwrite=overwrite, progress=True)
    print(f"{len(result)} images embedded in {output} (features {result.features.shape[1]}-d, "
          f"embeddings {result.embeddings.shape[1]}-d); {len(result.skipped)} files skipped.",
          flush=True)
    return result


def _files(inputs):
    """Image files named by `inputs` (files, or every image under a folder)."""
    from nnclr_tf.data import folders  # pylint: disable=import-outside-toplevel
    paths = []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            paths += [p for p in folders._list_files(item)
                      if os.path.splitext(p)[1].lower() in folders.IMAGE_EXTENSIONS]
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise UsageError(f"--query/--input {item!r} does not exist; pass image files or folders.")
    return paths


def _queries(queries):
    if not queries:
        raise UsageError("Pass --query=<image file or folder> (repeat it for more).")
    files = _files(queries)
    if not files:
        raise UsageError(f"--query {', '.join(queries)} holds no image files.")
    return files


def search(collection=None, queries=(), k=5, index="exact", space=None, encoder=None,
           output=None):
    from nnclr_tf import search as search_lib  # pylint: disable=import-outside-toplevel
    if not collection:
        raise UsageError("Pass --collection=<folder written by nnclr embed>.")
    if index not in search_lib.INDEXES:
        raise UsageError(f"--index={index!r} must be one of {', '.join(search_lib.INDEXES)}.")
    if index == "faiss":
        try:
            search_lib.faiss_module()
        except ImportError as error:
            raise UsageError(str(error)) from error
    files = _queries(queries)
    from nnclr_tf import collection as collection_lib  # pylint: disable=import-outside-toplevel
    loaded = collection_lib.load_collection(collection)
    result = search_lib.search(loaded, files, k=k, space=space or "features", index=index,
                               encoder=encoder)
    print(search_lib.result_table(result, loaded), flush=True)
    picture = output or "search.png"
    try:
        search_lib.plot_search(result, loaded, picture)
        print(f"Picture of the queries and their neighbours written to {picture}", flush=True)
    except ValueError as error:
        print(f"No picture: {error}", flush=True)
    return result


def duplicates(collection=None, threshold=None, space=None, output=None):
    from nnclr_tf import duplicates as dup  # pylint: disable=import-outside-toplevel
    if not collection:
        raise UsageError("Pass --collection=<folder written by nnclr embed>.")
    from nnclr_tf import collection as collection_lib  # pylint: disable=import-outside-toplevel
    threshold = dup.DEFAULT_THRESHOLD if threshold is None else threshold
    loaded = collection_lib.load_collection(collection)
    pairs = dup.duplicate_pairs(loaded.vectors(space or dup.DEFAULT_SPACE), threshold)
    groups = dup.group_pairs(pairs, len(loaded))
    output = output or f"{collection.rstrip('/')}_duplicates"
    files = dup.write_report(loaded, pairs, groups, output, threshold)
    removable = sum(len(g) - 1 for g in groups)
    print(f"{len(pairs)} pairs in {len(groups)} groups at cosine >= {threshold} among "
          f"{len(loaded)} images; {removable} files one could remove (nothing was deleted).",
          flush=True)
    for name, path in files.items():
        print(f"  {name}: {path}", flush=True)
    return pairs, groups


def map(collection=None, space=None, output=None):  # pylint: disable=redefined-builtin
    from nnclr_tf import collection as collection_lib  # pylint: disable=import-outside-toplevel
    from nnclr_tf import projection  # pylint: disable=import-outside-toplevel
    if not collection:
        raise UsageError("Pass --collection=<folder written by nnclr embed>.")
    loaded = collection_lib.load_collection(collection)
    output = output or f"{collection.rstrip('/')}_map"
    picture = projection.plot_map(loaded, os.path.join(output, "map.png"), space or "features")
    rows = projection.write_projector(loaded, os.path.join(output, "projector"),
                                      space or "features")
    print(f"2-D map (PCA) written to {picture}; TensorBoard projector of {len(rows)} images in "
          f"{os.path.join(output, 'projector')} (open it with: tensorboard --logdir "
          f"{os.path.join(output, 'projector')}).", flush=True)
    return picture


def export_format(config, format, output=None, overwrite=False):  # pylint: disable=redefined-builtin
    """`nnclr export --format=tflite|onnx`: the run's SavedModel (regenerated from its checkpoint),
    converted; written to --output (default MODEL_DIR/encoder.tflite or encoder.onnx)."""
    from nnclr_tf import export_formats  # pylint: disable=import-outside-toplevel
    if format not in export_formats.FORMATS:
        raise UsageError(f"--format={format!r} must be one of {', '.join(export_formats.FORMATS)}.")
    model_dir = config.run.model_dir
    path = output or os.path.join(model_dir, f"encoder.{format}")
    if os.path.exists(path) and not overwrite and output:
        raise UsageError(f"--output {output!r} already exists; pass --overwrite to replace it, or "
                         "choose another --output.")
    if format == "onnx":
        try:
            import tf2onnx  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError as error:
            raise UsageError("--format=onnx needs tf2onnx, which is not installed; run "
                             "`pip install nnclr_tf[onnx]`.") from error
    from nnclr_tf import modes  # pylint: disable=import-outside-toplevel
    saved_model = modes.export(config)["saved_model"]
    write = export_formats.write_tflite if format == "tflite" else export_formats.write_onnx
    write(saved_model, path)
    from nnclr_tf import runs  # pylint: disable=import-outside-toplevel
    info = runs.read_json(os.path.join(saved_model, "export.json"))
    print(f"{format} encoder written to {path}: uint8 images [N, {info['image_size']}, "
          f"{info['image_size']}, {info['channels']}] -> features, embeddings.", flush=True)
    return path
