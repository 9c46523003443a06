"""Support-set cost at scale: the nearest-neighbour lookup (chunked or whole) and the enqueue.

    python benchmarks/lookup.py                  # the paper's 98,304 x 256 queue, batch 512

Lookup: one `nearest_neighbour` call of a per-replica batch on a full queue, for several bounds on
the similarity matrix (`max_similarity_bytes`; "whole" materialises [batch, size]); times are
medians of interleaved rounds, every variant returns the same neighbours (checked), and the
memory column is the growth of peak RSS over the filled queue in a fresh process per variant.
Enqueue: one write of a batch into queues of growing size, "scatter" (CPU/GPU) against "assign"
(the TPU path, which rewrites the buffer).
"""

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nnclr_tf.support_set import DEFAULT_MAX_SIMILARITY_BYTES, SupportSet  # noqa: E402
from train_step import status_bytes  # noqa: E402  (benchmarks/ is first on sys.path)

MIB = 2**20
BOUNDS = {"whole": None, "16 MiB (default)": 16 * MIB, "4 MiB": 4 * MIB}


def _filled(size, dim, bound, seed=0):
    support_set = SupportSet(size, dim, max_similarity_bytes=bound, write_mode="scatter")
    support_set.build((None, dim))
    support_set.enqueue(np.random.default_rng(seed).normal(size=(size, dim)).astype(np.float32))
    return support_set


def lookup_memory(size, dim, batch, bound):
    """Peak RSS growth (bytes) of a first lookup over the filled queue, in a fresh process."""
    queries = tf.constant(np.random.default_rng(1).normal(size=(batch, dim)).astype(np.float32))
    # A small lookup first: TensorFlow's one-off allocations (thread pools, oneDNN) then happen
    # before the baseline, without leaving large freed buffers for the measured call to reuse.
    tf.function(_filled(1024, dim, None).nearest_neighbour)(queries).numpy()
    support_set = _filled(size, dim, bound)
    lookup = tf.function(support_set.nearest_neighbour).get_concrete_function(queries)
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current RSS
    lookup(queries).numpy()
    return status_bytes("VmHWM") - before


def _memory_in_subprocess(size, dim, batch, bound):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory", str(bound or 0),
                          "--size", str(size), "--dim", str(dim), "--batch", str(batch)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def lookup_table(size=98304, dim=256, batch=512, rounds=7, xla=True):
    """Rows (name, chunk rows, median ms, min ms, peak MiB) for each bound (and XLA)."""
    queries = tf.constant(np.random.default_rng(1).normal(size=(batch, dim)).astype(np.float32))
    variants = {}
    for name, bound in BOUNDS.items():
        support_set = _filled(size, dim, bound)
        variants[name] = (support_set, tf.function(support_set.nearest_neighbour), bound)
    if xla:
        support_set = _filled(size, dim, DEFAULT_MAX_SIMILARITY_BYTES)
        variants["default, XLA"] = (support_set, tf.function(support_set.nearest_neighbour,
                                                            jit_compile=True),
                                    DEFAULT_MAX_SIMILARITY_BYTES)
    reference = variants["whole"][1](queries).numpy()
    for name, (_, lookup, _) in variants.items():
        if not np.array_equal(lookup(queries).numpy(), reference):  # also traces / compiles
            raise AssertionError(f"lookup {name} returned other neighbours than the whole matrix")
    times = {name: [] for name in variants}
    for r in range(rounds):
        names = list(variants)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name][1](queries).numpy()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (support_set, _, bound) in variants.items():
        memory = None if "XLA" in name else _memory_in_subprocess(size, dim, batch, bound)
        rows.append((name, support_set.chunk_rows(batch), 1e3 * float(np.median(times[name])),
                     1e3 * min(times[name]), memory))
    return rows


def enqueue_table(sizes=(4096, 16384, 65536, 98304), dim=256, batch=512, calls=10):
    """Rows (size, scatter ms, assign ms): median time of one enqueue of `batch` rows."""
    rows_in = tf.constant(np.random.default_rng(2).normal(size=(batch, dim)).astype(np.float32))
    labels = tf.range(batch)
    rows = []
    for size in sizes:
        medians = []
        for mode in ("scatter", "assign"):
            support_set = SupportSet(size, dim, write_mode=mode)
            support_set.build((None, dim))
            enqueue = tf.function(support_set.enqueue)
            enqueue(rows_in, labels)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                enqueue(rows_in, labels)
                support_set.count.numpy()  # wait for the write
                times.append(time.perf_counter() - start)
            medians.append(1e3 * float(np.median(times)))
        rows.append((size, *medians))
    return rows


def print_tables(size=98304, dim=256, batch=512, rounds=7, peak=None):
    """Prints the lookup and enqueue tables; returns the enqueue rows. peak: fp32 GFLOP/s."""
    gflop = 2 * batch * size * dim / 1e9
    print(f"\nLookup, queue {size:,} x {dim}, batch {batch} ({gflop:.1f} GFLOP of similarities), "
          f"median of {rounds} interleaved rounds; identical neighbours in every row")
    print("| similarity bound | chunk rows | chunk MiB | ms (median) | ms (min) | GFLOP/s"
          + (" | % of fp32 peak" if peak else "") + " | peak RSS growth MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---:" + (" | ---:" if peak else "") + " | ---: |")
    for name, chunk, median_ms, min_ms, memory in lookup_table(size, dim, batch, rounds):
        rate = gflop / median_ms * 1e3
        memory = "-" if memory is None else f"{memory / MIB:,.0f}"
        share = f" | {100 * rate / peak:.0f}" if peak else ""
        print(f"| {name} | {chunk:,} | {4 * batch * chunk / MIB:,.0f} | {median_ms:,.0f} | "
              f"{min_ms:,.0f} | {rate:,.0f}{share} | {memory} |", flush=True)
    enqueue_rows = enqueue_table(dim=dim, batch=batch)
    print(f"\nEnqueue of {batch} rows (dim {dim}), median ms per call")
    print("| queue size | scatter (CPU/GPU default) | assign (TPU path) |")
    print("| ---: | ---: | ---: |")
    for queue, scatter, assign in enqueue_rows:
        print(f"| {queue:,} | {scatter:.2f} | {assign:.2f} |")
    return enqueue_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=98304)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory is not None:
        print(lookup_memory(args.size, args.dim, args.batch, args.memory or None))
        return
    print_tables(args.size, args.dim, args.batch, args.rounds)


if __name__ == "__main__":
    main()
