"""Image folders as datasets: `root/<class name>/**/<image>` (or images directly in `root`, unlabelled).

The folder is scanned once, up front, with cheap checks that need no decoding: the extension, a
non-zero size, the format's signature in the first bytes and its end marker in the last bytes (a
truncated JPEG lacks its final FFD9, a truncated PNG its IEND chunk, a truncated GIF its 0x3B, a
truncated BMP is shorter than its header says). Files that fail are skipped with one warning and
listed in `FolderScan.skipped`, so a bad file never stops training hours in.

Splits: `root/train/`, `root/test/` (or `val/`, `validation/`) when they exist; otherwise a fixed
part of each class (`holdout_fraction`, chosen by file name, so every process and every run agrees)
is held out as "test" and the rest is "train".

    scan = scan_folder("/data/flowers", split="train")  # without test/: 90 % of each class
    ds = folder_dataset(scan)  # (image [H, W, 3] uint8, label int32), file order
"""

import dataclasses
import logging
import os

import numpy as np
import tensorflow as tf

from nnclr_tf.data import subsets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TAIL_BYTES = 1024  # Where the end marker may sit: some writers pad a few bytes after it.
_SHOWN_SKIPPED = 5
HELD_OUT_SPLITS = ("test", "validation", "val")
DEFAULT_HOLDOUT_FRACTION = 0.1
log = logging.getLogger("nnclr_tf")
_WARNED = set()  # messages already logged by this process (see _warn_once)


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """Result of scanning an image folder.

    paths: [N] image files that passed the checks, sorted by class then path.
    labels: [N] int32 class indices into `class_names` (all -1 for a folder without class folders).
    skipped: (path, reason) of every file that was left out.
    description: one or two sentences on what the split is (a held-out part, unlabelled, ...).
    """
    root: str
    paths: tuple
    labels: np.ndarray
    class_names: tuple
    skipped: tuple
    description: str = ""

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


def _warn_once(message):
    """Logs `message` once per process: a command resolves the same folder several times (pretraining,
    each evaluation split, the report), and one warning says it all."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _checked_files(directory, class_names):
    """(paths, labels, skipped) of the readable images under `directory`, sorted by class then path."""
    if class_names:
        candidates = [(f, label) for label, name in enumerate(class_names)
                      for f in _list_files(os.path.join(directory, name))]
    else:
        candidates = [(os.path.join(directory, e), -1) for e in sorted(os.listdir(directory))
                      if not e.startswith(".") and not os.path.isdir(os.path.join(directory, e))]
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
        _warn_once(f"Skipped {len(skipped)} of {len(candidates)} files in {directory} that are not "
                   f"readable images: {shown}{' ...' if len(skipped) > _SHOWN_SKIPPED else ''}")
    return paths, np.asarray(labels, np.int32), skipped


def _class_names(directory):
    return tuple(sorted(e for e in os.listdir(directory)
                        if not e.startswith(".") and os.path.isdir(os.path.join(directory, e))))


def _split_folder(root, split):
    """(folder holding `split` whole, or None; folder a held-out part is carved from)."""
    layout = os.path.isdir(os.path.join(root, "train"))  # ImageNet-style train/ (+ val/, test/)
    base = os.path.join(root, "train") if layout else root
    held_out = [s for s in HELD_OUT_SPLITS if layout and os.path.isdir(os.path.join(root, s))]
    if split == "all":  # everything below root, e.g. a collection to embed
        return root, None
    if layout and os.path.isdir(os.path.join(root, split)) and (split != "train" or held_out):
        return os.path.join(root, split), None
    if split in HELD_OUT_SPLITS and held_out:
        return os.path.join(root, held_out[0]), None  # "test" also finds val/ or validation/
    if split in ("train", *HELD_OUT_SPLITS):
        return None, base
    extra = f", {', '.join(repr(n) for n in _class_names(root) if n != 'train')}" if layout else ""
    raise ValueError(
        f"Image folder {root!r} has no split {split!r} (no sub-folder {split}/): its splits are "
        f"'train', 'all'{extra} and the held-out 'test' (also called 'validation' or 'val'); "
        "choose one with --set data.eval_split=test (or data.train_split, data.eval_train_split).")


def scan_folder(path, split="train", holdout_fraction=DEFAULT_HOLDOUT_FRACTION):
    """Lists and checks the images of one split of a folder dataset.

    `path/<split>` is used when it exists (an ImageNet-style `train/` and `val/` layout; "test",
    "validation" and "val" find each other). Otherwise the folder (or its `train/`) is split per
    class, deterministically by file name: `holdout_fraction` of each class with two or more
    images (at least one) is the held-out part, named "test", "validation" or "val"; "train" is
    the rest. "all" is always the whole folder, its sub-folders the classes. A flat folder (no
    class sub-folders) is unlabelled and has no held-out part. Class folders are the sorted
    sub-folders, including empty ones, so that train and test folders agree on label numbers.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}; use e.g. "
                         f"--set data.holdout_fraction={DEFAULT_HOLDOUT_FRACTION}.")
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise ValueError(f"Dataset folder {path!r} does not exist; pass --dataset=<an existing "
                         "folder of class sub-folders> or a TFDS dataset name.")
    whole, carved_from = _split_folder(root, split)
    directory = whole or carved_from
    class_names = _class_names(directory)
    paths, labels, skipped = _checked_files(directory, class_names)
    if not paths:
        others = f" (only {len(skipped)} other files, listed above)" if skipped else ""
        raise ValueError(
            f"Image folder {directory!r} has no readable images{others}; it needs "
            f"{', '.join(IMAGE_EXTENSIONS)} files, in one sub-folder per class (or directly in the "
            "folder for unlabelled images).")
    description = f"Image folder {path!r}"
    if not class_names:
        if carved_from is not None and split != "train":
            raise ValueError(
                f"Image folder {path!r} has no class sub-folders, so its images are unlabelled and "
                f"it has no labelled split {split!r} to evaluate on; put the images in one "
                "sub-folder per class to get kNN and linear-probe scores.")
        description += (f" has no class sub-folders: its {len(paths)} images are unlabelled, so "
                        "there are no kNN or linear-probe scores.")
    elif carved_from is not None:
        held = subsets.held_out_mask(
            [os.path.relpath(p, directory) for p in paths], labels, holdout_fraction)
        keep = held if split in HELD_OUT_SPLITS else ~held
        if not keep.any():
            raise ValueError(
                f"Image folder {path!r} has no class with two or more images, so nothing can be "
                f"held out for the {split!r} split; add images or a test/ sub-folder.")
        paths, labels = [p for p, k in zip(paths, keep) if k], labels[keep]
        description += (
            f" has no test/ sub-folder, so {int(held.sum())} of its {len(held)} images "
            f"({100 * holdout_fraction:g} % of each class, chosen by file name; --set "
            f"data.holdout_fraction=...) are held out as its 'test' split and the other "
            f"{int((~held).sum())} are 'train'.")
    else:
        description += f" split {split!r}: {directory} ({len(paths)} images)."
    if len(class_names) == 1:
        single = (f"Image folder {path!r} has one class only ({class_names[0]!r}): kNN and "
                  "linear-probe scores on it are meaningless (every prediction is right); add a "
                  "sub-folder per class.")
        _warn_once(single)
        description += " " + single
    return FolderScan(root=directory, paths=tuple(paths), labels=labels, class_names=class_names,
                      skipped=tuple(skipped), description=description)


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
