"""How long the CLI takes to refuse bad input: one table, one row per mistake a user makes.

    python benchmarks/time_to_error.py                     # every case, once each (1-3 minutes)
    python benchmarks/time_to_error.py --repeats=3         # median of 3 runs per case
    python benchmarks/time_to_error.py --skip_checkpoint   # without the corrupted-checkpoint case
    python benchmarks/time_to_error.py --only=dataset      # the cases whose name contains "dataset"

Bad input must be refused with one sentence before any expensive work starts. Each case runs the
installed `nnclr` in a subprocess from a fresh temporary working directory, with relative paths as
a user types them and TFDS_DATA_DIR pointing into that directory (nothing is written elsewhere).
The table gives the wall time to the exit (median over repeats), the exit code, the message (the
last stderr line that says "error"), and what the failed command left in the working directory. The corrupted
checkpoint case first trains the tiny preset for 2 steps (not timed), then truncates the newest
checkpoint's data file and runs `nnclr knn` on that model dir, which must restore it.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

TINY = ["pretrain", "--preset=tiny", "--model_dir=runs/x"]
QUIET = ["--set=run.report=false", "--set=run.export=false"]
# (case, nnclr arguments): each is one mistake on top of an otherwise valid tiny run.
CASES = [
    ("bad flag value", [*TINY, "--batch_size=0"]),
    ("flag of the wrong type", [*TINY, "--batch_size=abc"]),
    ("unknown dataset", [*TINY, "--dataset=cifar11"]),
    ("dataset not prepared (offline)", [*TINY, "--dataset=cifar10"]),
    ("unknown backbone", [*TINY, "--backbone=resnet51"]),
    ("malformed --set", [*TINY, "--set=model.queue_size"]),
    ("unknown --set field", [*TINY, "--set=model.queue_sise=8"]),
    ("image too small", [*TINY, "--image_size=8", "--set=model.cifar_stem=false"]),
]
CHECKPOINT_CASE = ("corrupted checkpoint", ["knn", "--model_dir=runs/x"])


def nnclr_command():
    """The installed `nnclr` beside this interpreter (`python -m nnclr_tf` without one)."""
    script = shutil.which("nnclr", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "nnclr_tf"]


def run(args, cwd):
    """Runs `nnclr *args` in `cwd`; returns (seconds, exit code, the last stderr line that says
    "error", else the last line)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TFDS_DATA_DIR=os.path.join(cwd, "tfds"))
    start = time.perf_counter()
    done = subprocess.run([*nnclr_command(), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=600, check=False)
    seconds = time.perf_counter() - start
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return seconds, done.returncode, (errors or lines or ["(no message)"])[-1]


def left_behind(cwd, before):
    """Paths the command created in `cwd` (the prepared data folder excluded)."""
    found = []
    for root, dirs, files in os.walk(cwd):
        dirs[:] = [d for d in dirs if os.path.join(root, d) != os.path.join(cwd, "tfds")]
        found += [os.path.relpath(os.path.join(root, n), cwd) for n in dirs + files]
    return sorted(set(found) - before) or ["-"]


def corrupt_newest_checkpoint(cwd):
    """Trains 2 steps in runs/x, then truncates the newest checkpoint's data file to half."""
    seconds, code, message = run([*TINY, "--train_steps=2", *QUIET], cwd)
    if code != 0:
        raise SystemExit(f"setting up the corrupted-checkpoint case failed ({message})")
    folder = os.path.join(cwd, "runs", "x", "checkpoints")
    data = sorted(f for f in os.listdir(folder) if ".data-" in f)[-1]
    path = os.path.join(folder, data)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    return seconds


def measure(case, args, repeats, setup=None):
    """Median seconds over `repeats` fresh working directories, with the last run's outcome."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="nnclr_tte_") as cwd:
            if setup is not None:
                setup(cwd)
            before = set(left_behind(cwd, set())) - {"-"}
            seconds, code, message = run(args, cwd)
            times.append(seconds)
            files = left_behind(cwd, before)
    times.sort()
    return case, args, times[len(times) // 2], code, message, files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip_checkpoint", action="store_true")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    rows = [measure(case, cli, args.repeats) for case, cli in CASES if args.only in case]
    if not args.skip_checkpoint and args.only in CHECKPOINT_CASE[0]:
        # The setup prepares the embedded data and trains: the data folder is kept between the
        # setup and the timed command, so only the refusal is timed.
        rows.append(measure(*CHECKPOINT_CASE, args.repeats, setup=corrupt_newest_checkpoint))
    print("| mistake | command | s | exit | message | left in cwd |")
    print("| --- | --- | ---: | ---: | --- | --- |")
    for case, cli, seconds, code, message, files in rows:
        command = "nnclr " + " ".join(cli)
        print(f"| {case} | `{command}` | {seconds:.1f} | {code} | {message} | "
              f"{', '.join(files)} |")


if __name__ == "__main__":
    main()
