"""`nnclr pretrain` with two test hooks, for tests that kill and restart a run (test_lifecycle.py).

    python tests/pretrain_until.py --preset=tiny --model_dir=... [--block_at_step=3] [--probe=p.npz]

Takes every `nnclr` flag and builds the config exactly as `nnclr pretrain` does. --block_at_step=N
prints "BLOCKED N" on stdout once step N is done and waits there for a signal, so a test can
SIGKILL the run mid-interval at a known step, or SIGTERM it there (the run then stops at that step
boundary, as `nnclr pretrain` does, and exits 143 with its one line). --probe=PATH writes, when
training starts, the step and support set the run resumed with (an .npz of plain arrays).
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as `nnclr` does, before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from nnclr_tf import cli  # noqa: E402  (defines the nnclr flags)

flags.DEFINE_integer("block_at_step", 0, "Print BLOCKED and wait after this optimizer step (0: never).")
flags.DEFINE_string("probe", None, "Write the resumed step and support set here at the start.")
FLAGS = flags.FLAGS


class Hooks(keras.callbacks.Callback):
    def __init__(self, block_at_step, probe):
        super().__init__()
        self.block_at_step, self.probe = block_at_step, probe

    def on_train_begin(self, logs=None):
        if self.probe:
            np.savez(self.probe, step=int(self.model.optimizer.iterations.numpy()),
                     **{v.name: np.asarray(v.numpy()) for v in self.model.support_set.weights})

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self.block_at_step:
            # Python writes a byte to the wakeup pipe for every signal, so a signal that arrives
            # before the read still ends it; the run's own handler has run by the time read returns.
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            previous = signal.set_wakeup_fd(write_end)
            print(f"BLOCKED {step}", flush=True)
            os.read(read_end, 1)  # until a signal (SIGKILL: never returns)
            signal.set_wakeup_fd(previous)


def main(argv):
    del argv
    config = cli.config_from_flags("pretrain")
    from nnclr_tf import train  # after the flags, as the CLI does
    try:
        train.pretrain(config, verbose=0, callbacks=[Hooks(FLAGS.block_at_step, FLAGS.probe)])
    except KeyboardInterrupt as stop:  # as cli.main reports it
        print(f"nnclr pretrain: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    app.run(main)
