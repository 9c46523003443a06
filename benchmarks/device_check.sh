#!/usr/bin/env bash
# The GPU check in one command, for a short lease: install, then every number at once
# (benchmarks/device_check.py: CIFAR ResNet-18 images/s on 1 and N GPUs, bf16, XLA off and on,
# and the same loss on 1 and N replicas). Run from anywhere; it works in the repository root.
#
#   bash benchmarks/device_check.sh                      # a GPU machine: venv, install, measure
#   DEVICE=cpu STEPS=2 bash benchmarks/device_check.sh   # a rehearsal on CPU: no install, the
#                                                        # active Python, 2 logical CPUs as N
#
# Settings (environment):
#   DEVICE      gpu | cpu                                        (gpu)
#   STEPS       timed steps per throughput row                   (50)
#   CHECK_STEPS steps of the 1-vs-N loss check                   (5)
#   REPLICAS    N; default every GPU, or 2 logical GPUs when there is one
#   BATCH       images per replica                               (256 on GPU, 16 on CPU)
#   PRECISIONS  Keras policies of the throughput rows            (mixed_bfloat16; add ,float32)
#   XLA         XLA settings of the throughput rows              (off,on)
#   INSTALL     auto | yes | no   auto: on GPU, install unless the active Python already has
#               TensorFlow with a GPU and nnclr_tf; on CPU, never                 (auto)
#   VENV        the virtual environment to create                (.venv-gpu)
#   WHEELHOUSE  a folder of wheels for a machine without network (pip download them elsewhere:
#               pip download -d wheels "tensorflow[and-cuda]==2.21.0" -r requirements.txt)
# Not yet run on a GPU. On CPU (DEVICE=cpu STEPS=2 CHECK_STEPS=3 XLA=off) it took 5.5 min; a GPU run
# starts 6 measuring processes (8 with float32 rows), each importing TensorFlow and building the model.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE=${DEVICE:-gpu}
STEPS=${STEPS:-50}
CHECK_STEPS=${CHECK_STEPS:-5}
REPLICAS=${REPLICAS:-0}
BATCH=${BATCH:-0}
PRECISIONS=${PRECISIONS:-mixed_bfloat16}
XLA=${XLA:-off,on}
INSTALL=${INSTALL:-auto}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
started=$SECONDS

say() { echo "[device_check $((SECONDS - started))s] $*"; }

case "$DEVICE" in
  gpu | cpu) ;;
  *) echo "device_check: DEVICE=$DEVICE is not gpu or cpu; set DEVICE=gpu (default) or DEVICE=cpu." >&2
     exit 2 ;;
esac

ready() {  # the active Python has TensorFlow (with a GPU when DEVICE=gpu) and nnclr_tf
  "$PYTHON" - "$DEVICE" <<'EOF' >/dev/null 2>&1
import sys
import tensorflow as tf
import nnclr_tf  # noqa: F401
sys.exit(0 if sys.argv[1] == "cpu" or tf.config.list_physical_devices("GPU") else 1)
EOF
}

if [[ "$DEVICE" == gpu ]]; then
  say "GPUs: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | paste -sd ';')"
fi

if [[ "$INSTALL" == yes || ("$INSTALL" == auto && "$DEVICE" == gpu) ]] \
    && ! { [[ "$INSTALL" == auto ]] && ready; }; then
  say "installing into $VENV (requirements.txt with tensorflow[and-cuda] for tensorflow-cpu)"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  PYTHON=python
  sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' requirements.txt > "$VENV/requirements-gpu.txt"
  pip_args=(--quiet --disable-pip-version-check)
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    pip_args+=(--no-index --find-links "$WHEELHOUSE")
  fi
  if ! pip install "${pip_args[@]}" -r "$VENV/requirements-gpu.txt" -e .; then
    echo "device_check: pip could not install the requirements (no network here?); set" \
         "WHEELHOUSE to a folder of downloaded wheels, or INSTALL=no in an environment that has them." >&2
    exit 1
  fi
  say "installed: $(python -c 'import tensorflow as tf; print("TensorFlow", tf.__version__)' 2>/dev/null)"
elif ! ready; then
  what="TensorFlow"
  [[ "$DEVICE" == gpu ]] && what="TensorFlow with a GPU"
  echo "device_check: the active Python ($(command -v "$PYTHON")) lacks $what or nnclr_tf;" \
       "activate the project's environment, or run with INSTALL=yes." >&2
  exit 1
fi

say "measuring (each row in its own process)"
"$PYTHON" benchmarks/device_check.py --device="$DEVICE" --steps="$STEPS" \
  --check_steps="$CHECK_STEPS" --replicas="$REPLICAS" --batch="$BATCH" \
  --precisions="$PRECISIONS" --xla="$XLA"
say "done"
