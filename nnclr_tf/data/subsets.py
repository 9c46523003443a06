"""Class-balanced labelled subsets (the semi-supervised 1 % / 10 % protocol) and their selection.

    indices = balanced_subset(labels, fraction=0.01, seed=0)  # sorted positions into `labels`

ImageNet has official subsets (TFDS `imagenet2012_subset/1pct` and `/10pct`, used by SimCLR and the
NNCLR paper); every other dataset gets this seeded, class-balanced draw instead. Image folders without
a test/ sub-folder get their held-out split here too (`held_out_mask`).
"""

import hashlib
import logging

import numpy as np
import tensorflow as tf

log = logging.getLogger("nnclr_tf")


def subset_size(fraction, num_examples):
    """round(fraction * num_examples), after checking that the fraction makes sense."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}; use e.g. "
                         "--set eval.label_fraction=0.01 for 1 %.")
    return int(round(fraction * num_examples))


def class_quotas(counts, total, rng):
    """Splits `total` picks over classes as evenly as possible without exceeding `counts`.

    counts: [num_classes] examples available per class. Classes that receive one extra pick when
    `total` does not divide evenly are chosen by `rng`. Returns [num_classes] int64 quotas.
    """
    counts = np.asarray(counts, np.int64)
    quotas = np.zeros_like(counts)
    active = [int(c) for c in rng.permutation(np.flatnonzero(counts > 0))]
    remaining = min(int(total), int(counts.sum()))
    while remaining > 0 and active:
        share, extra = divmod(remaining, len(active))
        # A class too small for its share gives everything it has; the rest is shared again.
        full = [c for c in active if counts[c] - quotas[c] <= share]
        if full:
            for c in full:
                remaining -= counts[c] - quotas[c]
                quotas[c] = counts[c]
            active = [c for c in active if c not in full]
            continue
        for position, c in enumerate(active):
            quotas[c] += share + (1 if position < extra else 0)
        remaining = 0
    return quotas


def balanced_subset(labels, fraction, seed=0):
    """Sorted indices of a seeded, class-balanced subset of round(fraction * N) examples, and of at
    least one example of every class (with a warning when the fraction gives fewer).

    labels: [N] integer class labels (>= 0). The same (labels, fraction, seed) always gives the same
    subset; another seed gives another one.
    """
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("label_fraction needs labelled examples, but this split has unlabelled "
                         "ones (label -1); pick a labelled split with --set data.eval_train_split=.")
    requested = subset_size(fraction, labels.size)
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
    classes = int(np.count_nonzero(counts))
    size = max(requested, classes)
    if size > requested:
        log.warning("eval.label_fraction=%g of %d labelled images selects %d, fewer than one per "
                    "class: using one image of each of the %d classes instead; for more, raise it, "
                    "e.g. --set eval.label_fraction=%.2g.", fraction, labels.size, requested,
                    classes, min(1.0, 2 * classes / labels.size))
    rng = np.random.default_rng(seed)
    quotas = class_quotas(counts, size, rng)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
              for c, q in enumerate(quotas) if q > 0]
    return np.sort(np.concatenate(chosen or [np.zeros([0], np.int64)])).astype(np.int64)


def held_out_mask(names, labels, fraction):
    """[N] bool: the held-out part of each class, `fraction` of it (rounded, at least one image
    when the class has two or more, never all of it).

    names: [N] stable names of the examples (file paths relative to the dataset folder). An
    example's side depends on its name's hash and its class's size only: no seed, so every process
    carves the same split, and adding images to a folder moves few others.
    """
    labels = np.asarray(labels)
    keys = np.asarray([hashlib.sha1(str(n).encode("utf-8")).hexdigest() for n in names])
    held = np.zeros([labels.size], bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < 2:
            continue
        count = min(members.size - 1, max(1, int(fraction * members.size + 0.5)))
        held[members[np.argsort(keys[members], kind="stable")[:count]]] = True
    return held


def keep_indices(ds, indices, num_examples):
    """Keeps the elements of `ds` whose position (in its deterministic order) is in `indices`."""
    mask = np.zeros([num_examples], dtype=bool)
    mask[np.asarray(indices)] = True
    mask = tf.constant(mask)
    ds = ds.enumerate().filter(lambda i, element: tf.gather(mask, i))
    return ds.map(lambda i, element: element)
