"""Train-step throughput and peak memory of NNCLR variants, timed side by side.

    python benchmarks/train_step.py --family r18 --variants self,nn98304,nn98304:float32

Each variant (backbone family, positive "self" = SimCLR mode or "nn" with a queue size,
precision, XLA) runs in its own worker process, so its peak RSS (VmHWM) is its own. The
workers build their model and warm up concurrently, then the parent times one step at a time,
round robin (the order rotated each round), so a shared machine's load falls on every variant
alike; each variant's step time is the median over rounds, and its ratio to another variant the
median of the per-round ratios. Steps run `model.train_function` on one fixed in-memory batch.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

# (preset, image size, channels, batch): the CPU preset, a ResNet-18 at 32x32, a ResNet-50 at 96x96.
FAMILIES = {
    "cpu": ("fmnist_cpu", 56, 1, 256),  # the preset upsamples Fashion-MNIST to 56x56
    "r18": ("cifar10_resnet18", 32, 3, 256),
    "r50": ("imagenet_resnet50", 96, 3, 32),
}
PRESET_QUEUE = {"cpu": 8192, "r18": 65536, "r50": 98304}  # the presets' own queue sizes


@dataclasses.dataclass(frozen=True)
class Variant:
    family: str
    positive: str = "nn"  # "nn" or "self" (SimCLR mode: no lookup, no enqueue)
    queue: int = 8192
    precision: str = "mixed_bfloat16"
    xla: bool = False
    batch: int = 0  # 0: the family's batch

    @property
    def label(self):
        what = "SimCLR (self)" if self.positive == "self" else f"NNCLR {self.queue:,}"
        precision = "bf16" if "bfloat16" in self.precision else "fp32"
        return f"{what}, {precision}, XLA {'on' if self.xla else 'off'}"

    def resolved_batch(self):
        return self.batch or FAMILIES[self.family][3]


# ----------------------------------------------------------------------------- worker side

def _build(variant):
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from nnclr_tf import config as cfg, train  # pylint: disable=import-outside-toplevel

    preset, size, channels, _ = FAMILIES[variant.family]
    batch = variant.resolved_batch()
    config = cfg.override(cfg.get_preset(preset), {
        "model.positive": variant.positive, "model.queue_size": max(variant.queue, batch),
        "optim.batch_size": batch, "data.image_size": size})
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(variant.precision)
    model = train.build_model(config, (size, size, channels), 10)
    model.compile(optimizer=train.build_optimizer(config, 100, 1000), jit_compile=variant.xla)
    rng = np.random.default_rng(0)
    shape = (batch, size, size, channels)
    data = {"view_1": rng.random(shape, np.float32), "view_2": rng.random(shape, np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32)}
    iterator = iter(tf.data.Dataset.from_tensors(data).repeat())
    model.make_train_function()
    return model, iterator


def forward_flops(model, image_shape):
    """Float operations of one image through the encoder and both heads (inference mode)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.python.profiler import model_analyzer, option_builder

    def forward(images):
        z = model.projection_head(model.encoder(images, training=False), training=False)
        return model.prediction_head(z, training=False)

    graph = tf.function(forward).get_concrete_function(
        tf.TensorSpec((1, *image_shape), tf.float32)).graph
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return model_analyzer.profile(graph, options=options).total_float_ops


def step_flops(variant, forward):
    """Estimated float operations of one train step: 3x forward (forward + backward) for the two
    views, plus the two lookups' similarity matmuls."""
    batch = variant.resolved_batch()
    lookup = 0 if variant.positive == "self" else 2 * 2 * batch * variant.queue * 256
    return 3 * forward * 2 * batch + lookup


def status_bytes(field):
    """A kB field of /proc/self/status in bytes: "VmRSS" (resident now) or "VmHWM" (peak).

    VmHWM, not ru_maxrss, for the peak: Linux carries ru_maxrss over from the parent through fork
    and exec."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def worker(spec):
    """Line protocol on stdin/stdout: READY {...}; 'step' -> TIME wall cpu; 'exit' -> PEAK bytes."""
    variant = Variant(**json.loads(spec))
    start = time.perf_counter()
    model, iterator = _build(variant)
    info = {"build_s": time.perf_counter() - start}
    start = time.perf_counter()
    model.train_function(iterator)["loss"].numpy()  # trace (XLA: compile) and run
    info["first_step_s"] = time.perf_counter() - start
    model.train_function(iterator)["loss"].numpy()  # warm-up: oneDNN primitives, caches
    if variant.positive == "self":
        _, size, channels, _ = FAMILIES[variant.family]
        info["forward_flops"] = forward_flops(model, (size, size, channels))
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            wall, cpu = time.perf_counter(), time.process_time()
            model.train_function(iterator)["loss"].numpy()
            print(f"TIME {time.perf_counter() - wall} {time.process_time() - cpu}", flush=True)
        else:
            break
    print(f"PEAK {status_bytes('VmHWM')}", flush=True)


# ----------------------------------------------------------------------------- parent side

class Worker:
    def __init__(self, variant):
        self.variant = variant
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker",
             json.dumps(dataclasses.asdict(variant))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env)
        self.info, self.walls, self.cpus, self.peak_bytes = {}, [], [], 0

    def _expect(self, tag):
        for line in self.process.stdout:
            if line.startswith(tag + " "):
                return line[len(tag) + 1:].strip()
        raise RuntimeError(f"benchmark worker for {self.variant} exited early "
                           f"(code {self.process.wait()}); run it alone to see its error")

    def ready(self):
        self.info = json.loads(self._expect("READY"))

    def step(self):
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        wall, cpu = self._expect("TIME").split()
        self.walls.append(float(wall))
        self.cpus.append(float(cpu))

    def close(self):
        self.process.stdin.write("exit\n")
        self.process.stdin.flush()
        self.peak_bytes = int(self._expect("PEAK"))
        self.process.wait()


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def run_group(variants, rounds, max_parallel_start=3):
    """Starts one worker per variant, then times `rounds` round-robin steps; returns the workers."""
    workers = [Worker(v) for v in variants[:max_parallel_start]]
    for index, variant in enumerate(variants[max_parallel_start:]):
        workers[index].ready()  # stagger the start: bounded memory and CPU contention
        workers.append(Worker(variant))
    for w in workers:
        if not w.info:
            w.ready()
    for r in range(rounds):
        shift = r % len(workers)
        for w in workers[shift:] + workers[:shift]:
            w.step()
    for w in workers:
        w.close()
    return workers


def paired_ratio(worker, reference, times="walls"):
    """Median over rounds of worker's step time / reference's step time in the same round."""
    return median([a / b for a, b in zip(getattr(worker, times), getattr(reference, times))])


def parse_variants(family, text, xla=False):
    """'self:mixed_bfloat16,nn98304:float32' -> [Variant, ...]."""
    variants = []
    for item in text.split(","):
        what, _, precision = item.partition(":")
        positive = "self" if what == "self" else "nn"
        queue = PRESET_QUEUE[family] if what in ("self", "nn") else int(what[2:])
        variants.append(Variant(family, positive, queue, precision or "mixed_bfloat16", xla))
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="cpu", choices=sorted(FAMILIES))
    parser.add_argument("--variants", default="self,nn,nn98304,self:float32,nn:float32")
    parser.add_argument("--xla", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    workers = run_group(parse_variants(args.family, args.variants, args.xla), args.rounds)
    print("| variant | batch | step s (median) | images/s | peak RSS MiB | x first row |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for w in workers:
        step = median(w.walls)
        print(f"| {args.family} {w.variant.label} | {w.variant.resolved_batch()} | {step:.3f} | "
              f"{w.variant.resolved_batch() / step:,.1f} | {w.peak_bytes / 2**20:,.0f} | "
              f"{paired_ratio(w, workers[0]):.3f} |")


if __name__ == "__main__":
    main()
