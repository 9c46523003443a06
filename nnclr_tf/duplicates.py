"""Near-duplicate images in an embedded collection: pairs above a cosine threshold, grouped.

    collection = load_collection("photos.emb")
    pairs = duplicate_pairs(collection.vectors(DEFAULT_SPACE), threshold=DEFAULT_THRESHOLD)
    groups = group_pairs(pairs, len(collection))        # [[row, row, ...], ...]
    write_report(collection, pairs, groups, "dups/")    # pairs.csv, groups.json, review.html,
                                                        # would_remove.txt (nothing is deleted)

The pairs are found with the collection multiplied by itself `chunk_rows` rows at a time, so
memory is [chunk_rows, N]; time grows as N^2 (about a minute for 10^5 rows on two CPU cores).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os

import numpy as np

from nnclr_tf import runs

# Measured on 300 embedded Fashion-MNIST test images plus 30 planted copies (resized 0.6x-1.6x,
# re-encoded as JPEG quality 60-90): the copies' thumbnail cosine was >= 0.9991, and 1 of the 44,850
# distinct pairs reached 0.995. The encoder's features (a 50-step demo run) did not separate them:
# at 0.9, 29 of 30 copies and 10,210 distinct pairs; self-supervised features are trained to be
# alike across crops of similar things, which is what search wants and de-duplication does not.
DEFAULT_SPACE = "thumbnails"
DEFAULT_THRESHOLD = 0.995
DEFAULT_CHUNK_ROWS = 4096


def duplicate_pairs(vectors, threshold=DEFAULT_THRESHOLD, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Every pair (i < j) of rows of `vectors` [N, D] (L2-normalised) whose cosine similarity is
    >= threshold. Returns a list of (i, j, similarity), most similar first."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold={threshold} must be a cosine similarity in [-1, 1], "
                         f"e.g. --threshold={DEFAULT_THRESHOLD}.")
    vectors = np.asarray(vectors, np.float32)
    found = []
    for start in range(0, len(vectors), chunk_rows):
        block = vectors[start : start + chunk_rows]
        # Only columns after each row's own index: each pair once, no self-pairs.
        similarity = block @ vectors[start:].T  # [chunk, N - start]
        rows, cols = np.nonzero(np.triu(similarity >= threshold, k=1))
        found += [(start + int(r), start + int(c), float(similarity[r, c]))
                  for r, c in zip(rows, cols)]
    return sorted(found, key=lambda pair: (-pair[2], pair[0], pair[1]))


def group_pairs(pairs, count):
    """Connected groups of rows linked by `pairs` (union-find), largest first; singletons left out."""
    parent = list(range(count))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups = {}
    for i in sorted({r for pair in pairs for r in pair[:2]}):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def _pixels(path):
    """Width * height of an image file (0 when it cannot be read)."""
    try:
        from PIL import Image  # pylint: disable=import-outside-toplevel
        with Image.open(path) as image:
            return image.size[0] * image.size[1]
    except Exception:  # pylint: disable=broad-except
        return 0


def files_to_remove(collection, groups):
    """For each group, every file but the one to keep (most pixels, then the shortest path)."""
    remove = []
    for group in groups:
        paths = [collection.path(r) or str(collection.ids[r]) for r in group]
        keep = max(paths, key=lambda p: (_pixels(p), -len(p), [-ord(c) for c in p]))
        remove += [p for p in paths if p != keep]
    return remove


def _thumbnail(path, size=96):
    """A data: URI of a small PNG of the image file, or None."""
    try:
        from PIL import Image  # pylint: disable=import-outside-toplevel
        with Image.open(path) as image:
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    except Exception:  # pylint: disable=broad-except
        return None


def review_html(collection, groups, pairs, threshold, limit=500):
    """A self-contained HTML page: one row of thumbnails per group, best match similarity shown."""
    best = {}
    for i, j, s in pairs:
        best[i] = max(best.get(i, -1.0), s)
        best[j] = max(best.get(j, -1.0), s)
    parts = ["<!doctype html><meta charset='utf-8'><title>Near-duplicates</title>",
             "<style>body{font-family:sans-serif} .g{display:flex;gap:8px;margin:8px 0;"
             "padding:6px;border-bottom:1px solid #ccc} figure{margin:0;width:120px;"
             "font-size:11px;word-break:break-all}</style>",
             f"<h1>{len(groups)} groups of near-duplicates (cosine &ge; {threshold})</h1>",
             "<p>Nothing was deleted; would_remove.txt lists every file but the largest of each "
             "group.</p>"]
    for number, group in enumerate(groups[:limit], start=1):
        parts.append(f"<div class='g'><b>{number}</b>")
        for row in group:
            path = collection.path(row)
            uri = _thumbnail(path) if path else None
            image = f"<img src='{uri}'>" if uri else ""
            parts.append(f"<figure>{image}<figcaption>{html.escape(str(collection.ids[row]))}"
                         f"<br>{best[row]:.4f}</figcaption></figure>")
        parts.append("</div>")
    if len(groups) > limit:
        parts.append(f"<p>... and {len(groups) - limit} more groups in groups.json.</p>")
    return "\n".join(parts)


def write_report(collection, pairs, groups, output, threshold):
    """Writes pairs.csv, groups.json, review.html and would_remove.txt into `output`; returns
    {name: path}. Nothing is deleted."""
    runs.makedirs(output)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["id_a", "id_b", "cosine"])
    for i, j, s in pairs:
        writer.writerow([collection.ids[i], collection.ids[j], f"{s:.6f}"])
    files = {name: os.path.join(output, name) for name in
             ("pairs.csv", "groups.json", "review.html", "would_remove.txt")}
    runs.write_text(files["pairs.csv"], rows.getvalue())
    runs.write_text(files["groups.json"], json.dumps(
        {"threshold": threshold, "groups": [[str(collection.ids[r]) for r in g] for g in groups]},
        indent=2) + "\n")
    runs.write_text(files["review.html"], review_html(collection, groups, pairs, threshold))
    runs.write_text(files["would_remove.txt"],
                    "".join(f"{p}\n" for p in files_to_remove(collection, groups)))
    return files
