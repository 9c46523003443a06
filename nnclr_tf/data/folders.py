"""Image folders as datasets: `root/<class name>/**/<image>` (or images directly in `root`, unlabelled).

The folder is scanned once, up front, with cheap checks that need no decoding: the extension, a
non-zero size, the format's signature in the first bytes and its end marker in the last bytes (a
truncated JPEG lacks its final FFD9, a truncated PNG its IEND chunk, a truncated GIF its 0x3B, a
truncated BMP is shorter than its header says). Files that fail are skipped with one warning and
listed in `FolderScan.skipped`, so a bad file never stops training hours in.

    scan = scan_folder("/data/flowers", split="train")
    ds = folder_dataset(scan)  # (image [H, W, 3] uint8, label int32), file order
"""

import dataclasses
import logging
import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TAIL_BYTES = 1024  # Where the end marker may sit: some writers pad a few bytes after it.
_SHOWN_SKIPPED = 5
log = logging.getLogger("nnclr_tf")


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """Result of scanning an image folder.

    paths: [N] image files that passed the checks, sorted by class then path.
    labels: [N] int32 class indices into `class_names` (all -1 for a folder without class folders).
    skipped: (path, reason) of every file that was left out.
    """
    root: str
    paths: tuple
    labels: np.ndarray
    class_names: tuple
    skipped: tuple

    @property
    def has_labels(self):
        return bool(self.class_names)


def _check_file(path):
    """The reason `path` cannot be a readable image, or None when it looks complete."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_EXTENSIONS:
        return f"not an image extension ({extension or 'none'})"
    size = os.path.getsize(path)
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(32)
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return None if tail.rstrip(b"\x00").endswith(b"\x3b") else "truncated GIF (no trailer)"
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if size >= declared else f"truncated BMP ({size} of {declared} bytes)"
    return "not a JPEG, PNG, GIF or BMP image (unknown signature)"


def _list_files(directory):
    files = []
    for parent, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(parent, n) for n in sorted(names) if not n.startswith("."))
    return files


def scan_folder(path, split="train"):
    """Lists and checks the images of a folder dataset.

    `path/<split>` is used when it exists (e.g. an ImageNet-style `train/` and `val/` layout);
    otherwise `path` itself serves the "train" split. Class folders are the sorted sub-folders,
    including empty ones, so that train and test folders agree on label numbers.
    """
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise ValueError(f"Dataset folder {path!r} does not exist; pass an existing folder of "
                         "class sub-folders or a TFDS dataset name.")
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
        root = split_dir
    elif split not in ("train", "all"):
        raise ValueError(f"Dataset folder {path!r} has no sub-folder {split!r}; add one or use "
                         "split='train' to read the whole folder.")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    class_names = tuple(e for e in entries if os.path.isdir(os.path.join(root, e)))
    if class_names:
        candidates = [(f, label) for label, name in enumerate(class_names)
                      for f in _list_files(os.path.join(root, name))]
    else:
        candidates = [(os.path.join(root, e), -1) for e in entries]
    paths, labels, skipped = [], [], []
    for file, label in candidates:
        try:
            reason = _check_file(file)
        except OSError as error:
            reason = f"unreadable ({error.strerror or error})"
        if reason is None:
            paths.append(file)
            labels.append(label)
        else:
            skipped.append((file, reason))
    if skipped:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:_SHOWN_SKIPPED])
        log.warning("Skipped %d of %d files in %s that are not readable images: %s%s",
                        len(skipped), len(candidates), root, shown,
                        " ..." if len(skipped) > _SHOWN_SKIPPED else "")
    return FolderScan(root=root, paths=tuple(paths), labels=np.asarray(labels, np.int32),
                      class_names=class_names, skipped=tuple(skipped))


def decode_image(contents):
    """Encoded JPEG/PNG/GIF/BMP bytes -> [H, W, 3] uint8 (grayscale repeated, alpha dropped,
    first GIF frame)."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def folder_dataset(scan, indices=None):
    """tf.data.Dataset of (image [H, W, 3] uint8, label int32 scalar) in scan order.

    indices: optional [M] positions into `scan.paths` to keep (a subset or a shard).
    Files that still fail to decode (corrupt in the middle, which the cheap scan cannot see) are
    dropped with a logged warning instead of stopping the pipeline.
    """
    paths = np.asarray(scan.paths, dtype=object)
    labels = scan.labels
    if indices is not None:
        paths, labels = paths[indices], labels[indices]
    ds = tf.data.Dataset.from_tensor_slices((paths.astype(str), labels.astype(np.int32)))
    ds = ds.map(lambda p, y: (decode_image(tf.io.read_file(p)), y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors(log_warning=True)
