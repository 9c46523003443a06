"""The train step with TensorFlow's oneDNN kernels off and on (TF_ENABLE_ONEDNN_OPTS=0 / 1).

    python benchmarks/onednn.py                          # the demo preset, float32
    python benchmarks/onednn.py --preset fmnist_cpu --set model.backbone=resnet50

TensorFlow reads the switch once, when it is imported, so each setting runs in its own process;
the settings alternate over `--rounds` fresh processes so that a machine's drift falls on both.
Each process builds the preset's model, runs `--warmup` steps on one fixed in-memory batch, then
times `--steps` steps; the table shows the median step time of each setting and their ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(preset, overrides, warmup, steps):
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from nnclr_tf import config as cfg, train  # pylint: disable=import-outside-toplevel

    config = cfg.override(cfg.get_preset(preset), dict(item.split("=", 1) for item in overrides))
    size, batch = config.data.image_size, config.optim.batch_size
    keras.utils.set_random_seed(0)
    model = train.build_model(config, (size, size, 1), 10)
    model.compile(optimizer=train.build_optimizer(config, 100, 1000))
    rng = np.random.default_rng(0)
    data = {"view_1": rng.random((batch, size, size, 1), np.float32),
            "view_2": rng.random((batch, size, size, 1), np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32)}
    iterator = iter(tf.data.Dataset.from_tensors(data).repeat())
    model.make_train_function()
    for _ in range(warmup):
        model.train_function(iterator)["loss"].numpy()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_function(iterator)["loss"].numpy()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.preset, args.set, args.warmup, args.steps)
        return
    command = [sys.executable, __file__, "--worker", "--preset", args.preset,
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    for item in args.set:
        command += ["--set", item]
    times = {"0": [], "1": []}
    for round_ in range(args.rounds):
        for setting in (("0", "1") if round_ % 2 == 0 else ("1", "0")):
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="2")
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            times[setting].append(json.loads(done.stdout.strip().splitlines()[-1])["step_s"])
    off, on = statistics.median(times["0"]), statistics.median(times["1"])
    what = " ".join([args.preset, *args.set])
    print("| preset | oneDNN off, s/step | oneDNN on, s/step | speed-up |")
    print("| --- | --- | --- | --- |")
    print(f"| {what} | {off:.3f} | {on:.3f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
