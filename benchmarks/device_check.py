"""GPU check of the CIFAR ResNet-18 train step: images/s for 1 and N replicas, bf16, XLA on and
off, and the same loss on 1 and N replicas. Run through benchmarks/device_check.sh (installs first).

    python benchmarks/device_check.py                    # GPUs: every row, then the loss check
    python benchmarks/device_check.py --device=cpu --steps=2   # the same on CPU (2 logical CPUs)

Each measurement runs in its own process (a TensorFlow process keeps its devices, and TF 2.21
refuses a second MirroredStrategy where one has trained), one after another; each row is printed as
soon as it is measured, so a lease that ends early still leaves the rows measured so far.

Throughput: the `cifar10_resnet18` preset's model (ResNet-18, CIFAR stem, 32x32x3, its heads and
65,536-row support set, LARS) at `--batch` images per replica, `model.train_function` on one fixed
in-memory batch, `--steps` steps timed after two warm-up steps (the first traces and, with XLA,
compiles). N replicas: MirroredStrategy over the N GPUs (weak scaling: the global batch is
N x --batch). With one GPU, N = 2 logical GPUs split from it: that checks correctness, not scaling.
"XLA" is the `jit_compile` the model reports after `compile` (Keras may turn it off under a strategy).

Loss check: float32 with TF32 off, the same seeds and the same global batches (different each
step), 1 replica against N; the per-step loss must agree to --loss_rtol. Under ReLUs, summation
order flips activations near 0 (tests/test_distribute.py measures this), so it is a tolerance.
"""

import argparse
import json
import os
import subprocess
import sys
import time

PRESET = "cifar10_resnet18"
IMAGE = (32, 32, 3)
WORKER_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- worker side

def _devices(spec):
    """Makes the devices the worker needs (before TensorFlow starts them); returns the strategy."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from nnclr_tf import distribute  # pylint: disable=import-outside-toplevel

    replicas = spec["replicas"]
    if spec["device"] == "cpu":
        tf.config.set_visible_devices([], "GPU")
        if replicas == 1:
            return tf.distribute.get_strategy()
        return distribute.get_strategy("mirrored", cpu_replicas=replicas)
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise SystemExit("no GPU visible to TensorFlow; run with --device=cpu, or check the CUDA "
                         "install (nvidia-smi, and tensorflow[and-cuda] in this environment)")
    if replicas > len(gpus):  # one GPU: split it into logical GPUs of equal memory
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=spec["split_mib"])] * replicas)
    if not spec["tf32"]:
        tf.config.experimental.enable_tensor_float_32_execution(False)
    devices = [d.name for d in tf.config.list_logical_devices("GPU")][:replicas]
    if replicas == 1:
        return tf.distribute.OneDeviceStrategy(devices[0])
    # NCCL needs distinct physical GPUs; logical GPUs of one card reduce through one device.
    cross = (tf.distribute.NcclAllReduce() if replicas <= len(gpus)
             else tf.distribute.ReductionToOneDevice())
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)


def _model(spec, strategy):
    """The preset's NNCLR model, compiled in `strategy`'s scope (seeded: the same in every worker)."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel
    from nnclr_tf import config as cfg, optim, train  # pylint: disable=import-outside-toplevel

    config = cfg.get_preset(PRESET)
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, width_multiplier=spec["width"]))
    o = config.optim
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(spec["precision"])
    with strategy.scope():
        model = train.build_model(config, IMAGE, 10)
        schedule = optim.WarmupCosine(o.base_learning_rate, spec["global_batch"], total_steps=1000,
                                      warmup_steps=10, scaling=o.lr_scaling)
        optimizer = optim.build_optimizer(o.optimizer, schedule, weight_decay=o.weight_decay,
                                          momentum=o.momentum)
        model.compile(optimizer=optimizer, jit_compile=spec["xla"])
        # The slots in the scope, mirrored like the weights (as train.pretrain does): created
        # lazily inside the distributed step they fail ("must feed a value for placeholder").
        optimizer.build(model.trainable_variables)
    model.make_train_function()
    return model


def _batches(spec, steps):
    """`steps` global batches of fixed random views [global_batch, 32, 32, 3] and labels."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    n = spec["global_batch"] * steps
    data = {"view_1": rng.random((n, *IMAGE), np.float32),
            "view_2": rng.random((n, *IMAGE), np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}
    return tf.data.Dataset.from_tensor_slices(data).batch(spec["global_batch"], drop_remainder=True)


def _gpu_peak_mib():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    peaks = [tf.config.experimental.get_memory_info(d.name)["peak"]
             for d in tf.config.list_logical_devices("GPU")]
    return max(peaks) / 2**20 if peaks else 0.0


def worker(spec):
    """Runs one measurement and prints RESULT {json}."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    strategy = _devices(spec)
    start = time.perf_counter()
    model = _model(spec, strategy)
    result = {"replicas": strategy.num_replicas_in_sync, "xla": bool(model.jit_compile),
              "build_s": time.perf_counter() - start}
    if spec["kind"] == "throughput":
        data = _batches(spec, 1).cache().repeat()
        iterator = iter(strategy.experimental_distribute_dataset(data))
        start = time.perf_counter()
        float(model.train_function(iterator)["loss"])  # traces (and with XLA compiles)
        result["first_step_s"] = time.perf_counter() - start
        float(model.train_function(iterator)["loss"])
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            logs = model.train_function(iterator)
        float(logs["loss"])  # waits for the last step
        seconds = time.perf_counter() - start
        result.update(step_ms=1000 * seconds / spec["steps"],
                      images_per_s=spec["global_batch"] * spec["steps"] / seconds,
                      peak_mib=_gpu_peak_mib())
    else:
        iterator = iter(strategy.experimental_distribute_dataset(_batches(spec, spec["steps"])))
        losses = []
        for _ in range(spec["steps"]):
            model.reset_metrics()  # each step's own loss, not the running mean
            losses.append(float(model.train_function(iterator)["loss"]))
        result["losses"] = losses
    result["tf"] = tf.__version__
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent side

def run_worker(spec):
    """Runs `worker(spec)` in a fresh process; returns its result dict, or {"error": text}."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": f"exit {done.returncode}: " + " | ".join(lines[-3:])}


def describe_machine(device):
    """One line: TensorFlow, the GPUs and their compute capability (a worker-free query)."""
    code = ("import json, tensorflow as tf; g = tf.config.list_physical_devices('GPU'); "
            "print(json.dumps({'tf': tf.__version__, 'cuda': tf.sysconfig.get_build_info()"
            ".get('cuda_version'), 'gpus': [tf.config.experimental.get_device_details(d) "
            "for d in g]}))")
    if device == "cpu":
        return {"gpus": []}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
        "gpus": [], "error": done.stderr.strip().splitlines()[-1:]}


def split_mib(replicas):
    """Memory per logical GPU when one GPU is split: 90 % of the card shared out (nvidia-smi)."""
    try:
        total = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                                "nounits", "--id=0"], capture_output=True, text=True, check=True)
        return int(0.9 * int(total.stdout.split()[0]) / replicas)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return 8 * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--replicas", type=int, default=0,
                        help="N; default: every GPU, or 2 (logical) on one GPU or a CPU")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per throughput row")
    parser.add_argument("--check_steps", type=int, default=5, help="steps of the loss check")
    parser.add_argument("--batch", type=int, default=0,
                        help="images per replica; default 256 (GPU), 16 (CPU)")
    parser.add_argument("--width", type=float, default=0.0,
                        help="ResNet-18 width multiplier; default 1 (GPU), 0.125 (CPU)")
    parser.add_argument("--precisions", default="mixed_bfloat16",
                        help="comma-separated Keras policies for the throughput rows")
    parser.add_argument("--xla", default="off,on", help="XLA settings of the throughput rows")
    parser.add_argument("--loss_rtol", type=float, default=1e-3)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    machine = describe_machine(args.device)
    gpus = len(machine["gpus"])
    print(f"machine: {json.dumps(machine)}", flush=True)
    if args.device == "gpu" and not gpus:
        raise SystemExit("no GPU visible to TensorFlow; use --device=cpu, or check the CUDA install")
    replicas = args.replicas or (gpus if gpus > 1 else 2)
    logical = args.device == "gpu" and replicas > gpus
    batch = args.batch or (256 if args.device == "gpu" else 16)
    common = {"device": args.device, "width": args.width or (1.0 if args.device == "gpu" else 0.125),
              "split_mib": split_mib(replicas) if logical else 0, "tf32": True}

    print(f"\nThroughput, {PRESET} (width {common['width']}), {batch} images per replica, "
          f"{args.steps} timed steps" + (f"; {replicas} logical GPUs on one GPU" if logical else ""))
    print("| replicas | precision | XLA asked | XLA on | global batch | step ms | images/s | "
          "images/s per replica | first step s | peak GPU MiB |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for r in (1, replicas):
        for precision in args.precisions.split(","):
            for xla in [x == "on" for x in args.xla.split(",")]:
                spec = dict(common, kind="throughput", replicas=r, precision=precision, xla=xla,
                            global_batch=batch * r, steps=args.steps)
                got = run_worker(spec)
                if "error" in got:
                    print(f"| {r} | {precision} | {xla} | error: {got['error']} |||||||", flush=True)
                    continue
                print(f"| {got['replicas']} | {precision} | {xla} | {got['xla']} | {batch * r} | "
                      f"{got['step_ms']:.1f} | {got['images_per_s']:,.0f} | "
                      f"{got['images_per_s'] / r:,.0f} | {got['first_step_s']:.1f} | "
                      f"{got['peak_mib']:,.0f} |", flush=True)

    check = dict(common, kind="loss", precision="float32", xla=False, tf32=False,
                 global_batch=batch * replicas, steps=args.check_steps)
    one, many = run_worker(dict(check, replicas=1)), run_worker(dict(check, replicas=replicas))
    print(f"\nLoss check: float32, TF32 off, global batch {batch * replicas}, "
          f"{args.check_steps} steps, 1 replica against {replicas}")
    for name, got in (("1 replica", one), (f"{replicas} replicas", many)):
        print(f"{name}: " + (got.get("error") or " ".join(f"{x:.6f}" for x in got["losses"])))
    if "error" in one or "error" in many:
        raise SystemExit("LOSS CHECK: could not run")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["losses"], many["losses"]))
    verdict = "PASS" if worst <= args.loss_rtol else "FAIL"
    print(f"LOSS CHECK {verdict}: largest relative difference {worst:.2e} "
          f"(tolerance {args.loss_rtol:g})", flush=True)
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    main()
