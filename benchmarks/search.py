"""Using the encoder at scale: embed images/s, and search queries/s with recall@10 (exact vs faiss).

    python benchmarks/search.py --rows 100000              # one size
    python benchmarks/search.py --rows 100000 1000000      # 10^5 and 10^6 rows (minutes)

Embedding: `collection.embed` of synthetic uint8 images of mixed sizes with an exported encoder
(--encoder, default a small random ResNet-like export made here; pass runs/demo for the demo's).
Search: --rows synthetic 64-d rows (a mixture of 1,000 Gaussian clusters, L2-normalised, so that
neighbours exist as in real embeddings); --queries rows drawn near the collection. Exact is the
chunked search (TensorFlow matmul and top_k); faiss is HNSW (M=32, efSearch=128) when faiss-cpu
is installed (`pip install nnclr_tf[search]`), its recall@10 measured against exact.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from nnclr_tf import collection, search  # noqa: E402

DIM = 64
K = 10


def synthetic_rows(count, rng, clusters=1000):
    centres = rng.normal(size=(clusters, DIM)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, count)] + 0.5 * rng.normal(size=(count, DIM)).astype(
        np.float32)
    return collection.normalise(rows)


def embed_rate(encoder, count, rng):
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
              for h, w in rng.integers(24, 64, size=(count, 2))]
    collection.embed(encoder, images[:64], batch_size=64)  # tracing and warm-up
    start = time.perf_counter()
    collection.embed(encoder, images, batch_size=64)
    return count / (time.perf_counter() - start)


def default_encoder(folder):
    import keras  # pylint: disable=import-outside-toplevel
    import nnclr_tf  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    encoder = nnclr_tf.build_backbone("resnet18", input_shape=(28, 28, 3), width_multiplier=0.125,
                                      cifar_stem=True)
    return nnclr_tf.export_encoder(encoder, os.path.join(folder, "encoder"), image_size=28,
                                   channels=3)


def search_rows(rows, num_queries, rng):
    queries = collection.normalise(rows[rng.integers(0, len(rows), num_queries)]
                                   + 0.1 * rng.normal(size=(num_queries, DIM)).astype(np.float32))
    start = time.perf_counter()
    _, exact = search.exact_search(queries, rows, K)
    exact_qps = num_queries / (time.perf_counter() - start)
    result = {"exact q/s": f"{exact_qps:,.0f}", "faiss build s": "-", "faiss q/s": "-",
              "recall@10": "-"}
    try:
        search.faiss_module()
    except ImportError:
        return result
    start = time.perf_counter()
    index = search.faiss_index(rows)
    result["faiss build s"] = f"{time.perf_counter() - start:.1f}"
    start = time.perf_counter()
    _, approximate = search.faiss_search(index, queries, K)
    result["faiss q/s"] = f"{num_queries / (time.perf_counter() - start):,.0f}"
    hits = [len(set(a) & set(e)) for a, e in zip(approximate, exact)]
    result["recall@10"] = f"{np.mean(hits) / K:.3f}"
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--embed_images", type=int, default=1024)
    parser.add_argument("--encoder", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        encoder = args.encoder or default_encoder(folder)
        rate = embed_rate(encoder, args.embed_images, rng)
    print(f"embed: {rate:,.0f} images/s ({args.embed_images} images of 24-63 px, encoder "
          f"{args.encoder or 'ResNet-18 x0.125 at 28 px, random weights'})")
    columns = ["rows", "exact q/s", "faiss build s", "faiss q/s", "recall@10"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for count in args.rows:
        result = {"rows": f"{count:,}", **search_rows(synthetic_rows(count, rng), args.queries, rng)}
        print("| " + " | ".join(result[c] for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
