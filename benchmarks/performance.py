"""The train step against this machine's limits: one table, and the goals as measured ratios.

    python benchmarks/performance.py              # the goals, side by side (under 10 minutes)
    python benchmarks/performance.py --quick      # the goals with fewer variants
    python benchmarks/performance.py --grid wide  # also queue sizes, XLA and ResNet-50
    python benchmarks/performance.py --full       # family x queue x precision x XLA (hours)

Prints the machine; its peak arithmetic rate (a 4096^3 matmul, fp32 and bf16, best of 5); the
input pipeline's images/s; the lookup at the paper's scale and the enqueue cost
(benchmarks/lookup.py); the train-step table (benchmarks/train_step.py: each variant in its own
process for its peak RSS, steps timed round robin, medians); then each goal as a ratio. Families:
"cpu" = the fmnist_cpu preset (ResNet-18 x0.5, ImageNet stem, 56x56x1, batch 256), "r18" = ResNet-18 CIFAR stem
at 32x32x3, batch 256, "r50" = ResNet-50 at 96x96x3, batch 32; heads as in their presets.
"SimCLR (self)" is positive="self": the same backbone and heads, no lookup and no enqueue.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import input_pipeline  # noqa: E402  (benchmarks/ is the script's folder, first on sys.path)
import lookup  # noqa: E402
from nnclr_tf import distribute  # noqa: E402
from train_step import (FAMILIES, PRESET_QUEUE, Variant, median, paired_ratio,  # noqa: E402
                        run_group, step_flops)

BF16, FP32 = "mixed_bfloat16", "float32"
QUEUES = (4096, 16384, 65536, 98304)
# Input pipeline per family: (dataset, image size, channels, augmentation preset of the family).
PIPELINES = {"cpu": ("embedded", 56, 1, "cifar"), "r18": ("embedded", 32, 3, "cifar"),
             "r50": ("embedded", 96, 3, "byol")}


def _variants(family, items):
    """[(what, precision, xla)] -> Variants; what = "self", "nn" (the preset's queue) or a size."""
    out = []
    for what, precision, xla in items:
        queue = PRESET_QUEUE[family] if what in ("self", "nn") else int(what)
        out.append(Variant(family, "self" if what == "self" else "nn", queue, precision, xla))
    return out


def grid(name):
    """[(family, rounds, variants)] of the named grid."""
    if name == "quick":  # the goals only
        return [("cpu", 5, _variants("cpu", [("self", BF16, False), ("nn", BF16, False),
                                             ("nn", FP32, False)])),
                ("r18", 3, _variants("r18", [("self", BF16, False), ("98304", BF16, False)]))]
    if name == "default":  # the goals, each side by side, and one ResNet-50 row pair
        cpu = [("self", BF16, False), ("nn", BF16, False), ("98304", BF16, False),
               ("self", FP32, False), ("nn", FP32, False)]
        r18 = [("self", BF16, False), ("98304", BF16, False), ("self", FP32, False)]
        return [("cpu", 5, _variants("cpu", cpu)), ("r18", 3, _variants("r18", r18)),
                ("r50", 3, _variants("r50", [("self", BF16, False), ("98304", BF16, False)]))]
    if name == "wide":  # every dimension once: queue sizes, precisions, XLA, three families
        cpu = [("self", BF16, False), ("nn", BF16, False)] + [(q, BF16, False) for q in QUEUES]
        cpu += [("self", FP32, False), ("nn", FP32, False), ("nn", BF16, True)]
        return [("cpu", 4, _variants("cpu", cpu)),
                ("r18", 3, _variants("r18", [("self", BF16, False), ("98304", BF16, False)])),
                ("r50", 2, _variants("r50", [("self", BF16, False), ("98304", BF16, False),
                                             ("self", FP32, False)]))]
    groups = []  # full: the whole cross product
    for family in FAMILIES:
        for xla in (False, True):
            items = [(what, precision, xla) for precision in (BF16, FP32)
                     for what in ("self", "nn") + QUEUES]
            groups.append((family, 3, _variants(family, items)))
    return groups


def machine():
    with open("/proc/cpuinfo", encoding="ascii") as info:
        text = info.read()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text]
    with open("/proc/meminfo", encoding="ascii") as info:
        memory = int(info.readline().split()[1]) / 2**20
    return (f"{model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, "
            f"flags {' '.join(flags) or 'none of avx512f/avx512_bf16/amx_bf16'}; TensorFlow "
            f"{tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}; "
            f"precision 'auto' -> {distribute.resolve_precision('auto')}")


def peak_rate(dtype, n=2048, repeats=15):
    """Best GFLOP/s of an n x n x n matmul: the peak, as near as a shared machine shows it."""
    a = tf.cast(tf.random.normal([n, n]), dtype)
    b = tf.cast(tf.random.normal([n, n]), dtype)
    matmul = tf.function(tf.matmul)
    matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def pipeline_rates(families):
    rates = {}
    print("\nInput pipeline (pretraining_dataset, two augmented views per image, embedded data)")
    print("| family | image | augmentation | batch | images/s |")
    print("| --- | --- | --- | ---: | ---: |")
    for family in families:
        dataset, size, channels, preset = PIPELINES[family]
        batch = FAMILIES[family][3]
        rates[family] = input_pipeline.measure(dataset, None, batch, size, preset,
                                               steps=max(8, 2048 // batch), warmup=2,
                                               channels=channels)
        print(f"| {family} | {size}x{size}x{channels} | {preset} | {batch} | "
              f"{rates[family]:,.0f} |", flush=True)
    return rates


def run_steps(groups):
    """Runs every group; returns [(family, workers, forward FLOPs)]."""
    done = []
    for family, rounds, variants in groups:
        start = time.perf_counter()
        workers = run_group(variants, rounds)
        forward = next((w.info["forward_flops"] for w in workers if "forward_flops" in w.info), 0)
        done.append((family, workers, forward))
        print(f"(train step group {family}: {len(workers)} variants, {rounds} rounds, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    return done


def step_table(done, peaks):
    """Prints the train-step table; returns {Variant: (worker, SimCLR worker or None)}."""
    results = {}
    print("\nTrain step (model.train_function on one fixed batch; medians of interleaved rounds)")
    print("| family | variant | batch | step s | CPU s | images/s | % of peak | peak RSS MiB | "
          "x SimCLR (wall) | x SimCLR (CPU) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family, workers, forward in done:
        reference = {(w.variant.precision, w.variant.xla): w for w in workers
                     if w.variant.positive == "self"}  # SimCLR mode per precision and XLA
        for w in workers:
            v, step = w.variant, median(w.walls)
            simclr = reference.get((v.precision, v.xla))
            rate = step_flops(v, forward) / step / 1e9
            share = f"{100 * rate / peaks[v.precision]:.0f}" if forward else "-"
            ratios = (f"{paired_ratio(w, simclr):.3f} | {paired_ratio(w, simclr, 'cpus'):.3f}"
                      if simclr else "- | -")
            print(f"| {family} | {v.label} | {v.resolved_batch()} | {step:.2f} | "
                  f"{median(w.cpus):.2f} | {v.resolved_batch() / step:,.1f} | {share} | "
                  f"{w.peak_bytes / 2**20:,.0f} | {ratios} |")
            results[v] = (w, simclr)
    print("step s: wall time; CPU s: the worker's CPU time (both threads), which another "
          "process's load disturbs less. % of peak: estimated step FLOPs (3 x the forward FLOPs "
          "of encoder and heads from TensorFlow's profiler, two views, plus the lookups' "
          "matmuls) / step time / the matmul peak of the variant's precision. x SimCLR: median "
          "over rounds of the step time over the SimCLR-mode step (same precision and XLA) "
          "timed in the same round.")
    return results


def goals(results, pipelines, enqueue_rows):
    def find(family, what, precision=BF16, xla=False):
        queue = PRESET_QUEUE[family] if what in ("self", "nn") else int(what)
        for v, pair in results.items():
            if (v.family, v.positive == "self", v.queue, v.precision, v.xla) == (
                    family, what == "self", queue, precision, xla):
                return pair
        return None

    print("\nGoals (ratios of medians measured side by side in the same group; wall time, "
          "and CPU time in brackets)")
    lines = []

    def verdict(value, limit, below=True):
        return "met" if (value <= limit if below else value >= limit) else "MISSED"

    for family, what, limit in (("cpu", "nn", 1.05), ("r18", "98304", 1.15)):
        pair = find(family, what)
        if pair and pair[1]:
            wall, cpu = paired_ratio(*pair), paired_ratio(*pair, "cpus")
            lines.append(f"NNCLR / SimCLR step, {family}, queue {pair[0].variant.queue:,}, bf16: "
                         f"{wall:.3f} ({cpu:.3f}); goal <= {limit}: {verdict(wall, limit)} "
                         f"({verdict(cpu, limit)})")
    for family in FAMILIES:
        for what in ("nn", "self"):
            fast, slow = find(family, what), find(family, what, FP32)
            if fast and slow:
                wall, cpu = paired_ratio(slow[0], fast[0]), paired_ratio(slow[0], fast[0], "cpus")
                lines.append(f"mixed_bfloat16 speed-up over float32, {family} "
                             f"{'SimCLR' if what == 'self' else 'NNCLR'} step: {wall:.2f}x "
                             f"({cpu:.2f}x); goal >= 2: {verdict(wall, 2, False)} "
                             f"({verdict(cpu, 2, False)})")
                break
    for family in FAMILIES:
        on, off = find(family, "nn", BF16, True), find(family, "nn")
        if on and off:
            lines.append(f"XLA on / off step time, {family} NNCLR bf16: "
                         f"{paired_ratio(on[0], off[0]):.2f} "
                         f"({paired_ratio(on[0], off[0], 'cpus'):.2f})")
    for family, rate in pipelines.items():
        pair = find(family, "nn") or find(family, "98304") or find(family, "self")
        if pair:
            model_rate = pair[0].variant.resolved_batch() / median(pair[0].walls)
            ratio = rate / model_rate
            lines.append(f"input pipeline / model images/s, {family}: {rate:,.0f} / "
                         f"{model_rate:,.1f} = {ratio:.1f}x; goal >= 5: {verdict(ratio, 5, False)}")
    smallest, largest = enqueue_rows[0], enqueue_rows[-1]
    lines.append(f"enqueue (scatter) at {largest[0]:,} / at {smallest[0]:,} rows: "
                 f"{largest[1] / smallest[1]:.2f} (O(batch): about 1; the TPU 'assign' path: "
                 f"{largest[2] / smallest[2]:.1f})")
    for line in lines:
        print("- " + line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="default", choices=("quick", "default", "wide", "full"))
    parser.add_argument("--quick", action="store_const", const="quick", dest="grid",
                        help="same as --grid quick")
    parser.add_argument("--full", action="store_const", const="full", dest="grid",
                        help="same as --grid full")
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()
    print(f"Machine: {machine()}")
    print(f"Load average at start (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    peaks = {FP32: peak_rate(tf.float32), BF16: peak_rate(tf.bfloat16)}
    groups = grid(args.grid)
    pipelines = pipeline_rates([family for family, _, _ in groups])
    enqueue_rows = lookup.print_tables(rounds=5, peak=peaks[FP32])
    done = run_steps(groups)
    # Once more at the end, for the best of both: the load of a shared machine varies.
    peaks = {FP32: max(peaks[FP32], peak_rate(tf.float32)),
             BF16: max(peaks[BF16], peak_rate(tf.bfloat16))}
    print(f"\nPeak arithmetic rate (2048^3 matmul, best of 15 at start and at end): fp32 "
          f"{peaks[FP32]:,.0f} GFLOP/s, bf16 {peaks[BF16]:,.0f} GFLOP/s")
    goals(step_table(done, peaks), pipelines, enqueue_rows)
    load = os.getloadavg()
    print(f"Grid '{args.grid}': {time.perf_counter() - start:.0f} s wall; load average at end "
          f"(1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
