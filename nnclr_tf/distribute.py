"""Choosing the tf.distribute strategy and the precision policy for a run.

    strategy = get_strategy("auto")            # the first of the list below that applies
    set_precision("auto", strategy)            # bf16 on TPU, Ampere+ GPUs, AMX CPUs; else fp16 / fp32
    with strategy.scope():
        model = ...

Strategies ("auto" takes the first that applies):
  tpu           TPUStrategy, when a TPU cluster resolver answers (Cloud TPU VM, or TPU_NAME set)
  multi_worker  MultiWorkerMirroredStrategy, when TF_CONFIG describes a cluster (one process
                per worker; the Keras workarounds it needs live in `nnclr_tf.keras_workarounds`)
  mirrored      MirroredStrategy over all local GPUs when there are several, else over the
                logical CPUs that `cpu_replicas=N` splits the CPU into (to test on one machine)
  default       one device
Create the strategy before anything else touches TensorFlow's devices: splitting the CPU must
happen before TensorFlow starts them.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from nnclr_tf import keras_workarounds
from nnclr_tf.config import STRATEGIES, ConfigError

# Signs of a TPU host: only then is a cluster resolver asked (off TPUs it may wait on the network).
_TPU_ENVIRONMENT = ("TPU_NAME", "COLAB_TPU_ADDR")
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


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


def _tpu_hinted() -> bool:
    return (any(name in os.environ for name in _TPU_ENVIRONMENT)
            or any(os.path.exists(path) for path in _TPU_DEVICE_FILES))


def _tpu_resolver():
    """A connected, initialised TPU cluster resolver, or None when no TPU answers."""
    tpu = os.environ.get("TPU_NAME", "local")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":  # a TPU VM's own chips need no connection; a pod or TPU node does
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return resolver
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None


def _tf_config_cluster() -> bool:
    try:
        return bool(json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster"))
    except ValueError as error:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({error}); see BUILD.md, "
                          "'Distributed training', for an example.") from error


def get_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy `name`, one of auto | default | mirrored | multi_worker | tpu."""
    if name not in STRATEGIES:
        raise ConfigError(f"Unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}.")
    split_cpu(cpu_replicas)
    if name == "auto":
        resolver = _tpu_resolver() if _tpu_hinted() else None
        if resolver is not None:
            return tf.distribute.TPUStrategy(resolver)
        if _tf_config_cluster():
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
        if not _tf_config_cluster():
            raise ConfigError("strategy 'multi_worker' needs the TF_CONFIG environment variable "
                              "describing the cluster; set it on every worker (see BUILD.md).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = _tpu_resolver()
    if resolver is None:
        raise ConfigError("strategy 'tpu' found no TPU: run on a Cloud TPU VM or set TPU_NAME.")
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True where this process writes the run's files: always, except on the non-chief workers
    of a MultiWorkerMirroredStrategy (there `index` 0, or the "chief" task, writes)."""
    return bool(strategy.extended.should_checkpoint)


def check_same_step(strategy: tf.distribute.Strategy, step: int, model_dir: str) -> None:
    """Raises ConfigError on every worker when the workers of a multi-worker run would resume from
    different steps (each read another copy of `model_dir`); elsewhere it does nothing."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    moments = tf.constant([step, step**2], tf.float64)
    mean = strategy.reduce(tf.distribute.ReduceOp.MEAN,
                           strategy.run(lambda: tf.identity(moments)), axis=None).numpy()
    if mean[1] - mean[0] ** 2 > 0.5:  # the workers' steps vary: every worker sees the same mean
        raise ConfigError(
            f"The workers resume from different steps (this worker: {step}, mean over workers: "
            f"{mean[0]:g}) because they read different copies of run.model_dir {model_dir!r}; put "
            "the model dir on storage every worker reads (GCS, NFS) or copy the chief's "
            "checkpoints to each worker's model dir.")


def wait_for_chief(strategy: tf.distribute.Strategy) -> None:
    """Every worker of a multi-worker run joins one last collective here: the others after
    training, the chief after its report and export. A worker that exited while the chief still
    evaluated would stop sending heartbeats, and the chief's coordination service would report it
    as crashed and abort the cluster's collectives. Elsewhere it does nothing."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    done = tf.constant(1.0)
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(done)), axis=None)


def is_tpu(strategy: tf.distribute.Strategy | None) -> bool:
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


STEPS_PER_EXECUTION_ON_ACCELERATORS = 32


def resolve_jit_compile(requested: bool, num_replicas: int, tpu: bool) -> bool:
    """Whether Keras may XLA-compile the train step: as requested, except under a mirrored
    strategy of several replicas (GPUs, logical CPUs, workers), where Keras cannot
    (`keras_workarounds.jit_compile_supported`, keras-team/keras#19005)."""
    return bool(requested) and keras_workarounds.jit_compile_supported(num_replicas, tpu)


def resolve_steps_per_execution(requested: int, accelerator: bool, mirrored: bool = False) -> int:
    """run.steps_per_execution: `requested` when > 0; for 0 (auto), 32 on GPUs and TPUs, where
    one host dispatch per step would leave the device idle between steps, and 1 on CPUs, where a
    step outlasts its dispatch and logs, signals and checkpoints then act at every step.

    mirrored: a MirroredStrategy or MultiWorkerMirroredStrategy of several replicas, where it is
    always 1: Keras cannot run several steps per execution there
    (`keras_workarounds.multi_step_execution_supported`, keras-team/keras#19246).
    """
    if not keras_workarounds.multi_step_execution_supported(mirrored):
        return 1
    if requested > 0:
        return requested
    return STEPS_PER_EXECUTION_ON_ACCELERATORS if accelerator else 1


def is_mirrored(strategy: tf.distribute.Strategy) -> bool:
    """True for a MirroredStrategy or MultiWorkerMirroredStrategy of more than one replica."""
    return (isinstance(strategy, (tf.distribute.MirroredStrategy,
                                  tf.distribute.MultiWorkerMirroredStrategy))
            and strategy.num_replicas_in_sync > 1)


def on_accelerator(strategy: tf.distribute.Strategy) -> bool:
    """True when `strategy` computes on TPUs or GPUs (a mirrored strategy over CPUs does not)."""
    if is_tpu(strategy):
        return True
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: the default device, a GPU when there is one
        return bool(tf.config.list_logical_devices("GPU"))
    return any("GPU" in device.upper() for device in devices)


def cpu_has_amx() -> bool:
    """True where the CPU has AMX bf16 tiles, so mixed_bfloat16 is faster than float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return "amx_bf16" in info.read()
    except OSError:
        return False


def gpu_compute_capabilities() -> list[tuple[int, int] | None]:
    """(major, minor) of each local GPU, None where TensorFlow does not say; [] without GPUs."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        except (ValueError, RuntimeError):
            capability = None
        capabilities.append(tuple(capability) if capability else None)
    return capabilities


def auto_precision(on_tpu: bool, gpu_capabilities, cpu_amx: bool) -> str:
    """What "auto" means on a platform: mixed_bfloat16 on TPUs, on GPUs that all have bfloat16
    tensor cores (compute capability >= 8.0: A100, H100, L4, RTX 30xx+) and on CPUs with AMX;
    mixed_float16 on older GPUs (Keras' compile then wraps the optimizer in a LossScaleOptimizer);
    float32 elsewhere. bfloat16 has float32's range, so it needs no loss scale and skips no step.

    gpu_capabilities: one (major, minor) or None (unknown: taken as older) per GPU, [] for none.
    """
    if on_tpu:
        return "mixed_bfloat16"
    if gpu_capabilities:
        modern = all(c is not None and tuple(c) >= (8, 0) for c in gpu_capabilities)
        return "mixed_bfloat16" if modern else "mixed_float16"
    return "mixed_bfloat16" if cpu_amx else "float32"


def resolve_precision(policy: str, strategy: tf.distribute.Strategy | None = None) -> str:
    """Maps "auto" to the fastest policy for the platform (`auto_precision`); refuses float16 on
    TPUs. NNCLR.train_step uses a LossScaleOptimizer through `optimizer.scale_loss`."""
    if policy not in ("auto", "mixed_float16"):
        return policy  # without looking at devices, which would start TensorFlow's
    on_tpu = is_tpu(strategy) if strategy is not None else bool(tf.config.list_logical_devices("TPU"))
    if policy == "mixed_float16" and on_tpu:
        raise ConfigError("mixed_precision=mixed_float16 does not run on TPUs; use mixed_bfloat16 "
                          "(or auto).")
    if policy != "auto":
        return policy
    gpus = [] if on_tpu else gpu_compute_capabilities()
    return auto_precision(on_tpu, gpus, cpu_has_amx() if not (on_tpu or gpus) else False)


def set_precision(policy: str, strategy: tf.distribute.Strategy | None = None) -> str:
    """Sets the global Keras dtype policy for `strategy`'s platform and returns the policy set."""
    policy = resolve_precision(policy, strategy)
    keras.mixed_precision.set_dtype_policy(policy)
    return policy
