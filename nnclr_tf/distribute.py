"""Choosing the tf.distribute strategy and the precision policy for a run.

    strategy = get_strategy("auto")            # TPU if one answers, mirrored if > 1 GPU, else default
    set_precision("auto")                      # bf16 on TPU / AMX CPUs, fp16 on GPUs, else fp32
    with strategy.scope():
        model = ...
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from nnclr_tf.config import ConfigError


def split_cpu(replicas: int) -> None:
    """Splits the first CPU into `replicas` logical devices, to test distribution on one machine.

    Must run before TensorFlow initialises its devices (before any op runs).
    """
    if replicas <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError as error:
        current = len(tf.config.list_logical_devices("CPU"))
        if current != replicas:
            raise ConfigError(
                f"run.cpu_replicas={replicas} must be set before TensorFlow starts, but it already "
                f"runs with {current} CPU device(s); set it in a fresh process.") from error


def _tpu_resolver():
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return resolver
    except (ValueError, tf.errors.NotFoundError, tf.errors.UnavailableError):
        return None


def get_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy for `name` in auto | default | mirrored | multi_worker | tpu."""
    split_cpu(cpu_replicas)
    if name == "auto":
        if "TPU_NAME" in os.environ or os.path.exists("/dev/accel0"):
            name = "tpu"
        elif "TF_CONFIG" in os.environ and json.loads(os.environ["TF_CONFIG"]).get("cluster"):
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1 or cpu_replicas > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError("strategy 'multi_worker' needs the TF_CONFIG environment variable "
                              "describing the cluster; set it on every worker.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = _tpu_resolver()
        if resolver is None:
            raise ConfigError("strategy 'tpu' found no TPU: run on a Cloud TPU VM or set TPU_NAME.")
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"Unknown strategy {name!r}: expected auto, default, mirrored, multi_worker or tpu.")


def cpu_has_amx() -> bool:
    """True where the CPU has AMX bf16 tiles, so mixed_bfloat16 is faster than float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return "amx_bf16" in info.read()
    except OSError:
        return False


def resolve_precision(policy: str) -> str:
    """Maps "auto" to the policy that is fastest on this platform."""
    if policy != "auto":
        return policy
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_amx() else "float32"


def set_precision(policy: str) -> str:
    """Sets the global Keras dtype policy and returns the policy set."""
    policy = resolve_precision(policy)
    keras.mixed_precision.set_dtype_policy(policy)
    return policy
