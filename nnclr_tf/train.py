"""The pretraining job: config in, trained encoder, checkpoints, export and report out.

    from nnclr_tf import config as cfg, train
    result = train.pretrain(cfg.get_preset("demo"))
    result.model.encoder          # the trained keras.Model
    result.report                 # dict with kNN / linear-probe numbers and the paths written

Running the same config again with the same run.model_dir resumes from the last checkpoint (step,
learning-rate schedule, optimizer state, every weight and the support set), so a killed run redoes
at most run.checkpoint_every_steps steps; SIGINT or SIGTERM save a checkpoint at the next step
boundary and raise callbacks.TrainingInterrupted. The data stream is a function of (run.seed, step),
so with run.deterministic=true the resumed run ends with the weights of an uninterrupted one, bit
for bit. Resuming with other trained settings (batch size, learning rate, steps, seed, data, ...)
is refused unless run.allow_config_change; config_history.jsonl keeps each config's step range.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from nnclr_tf import backbones, distribute, optim
from nnclr_tf.callbacks import CheckpointCallback, CSVLog, StopOnSignal, TensorBoard
from nnclr_tf.config import Config, ConfigError, validate
from nnclr_tf.data import dataset_info, pretraining_dataset
from nnclr_tf.data.sources import is_folder
from nnclr_tf.model import NNCLR
from nnclr_tf.runs import (RunDir, TrainingDivergedError, changed_settings, checkpoint_step,
                           model_checkpoint, restore_checkpoint, save_checkpoint)

log = logging.getLogger("nnclr_tf")


@dataclasses.dataclass
class PretrainResult:
    model: NNCLR
    history: dict
    report: dict
    model_dir: str


def build_model(config: Config, input_shape: tuple[int, int, int], num_classes: int) -> NNCLR:
    """Builds the NNCLR model of `config` for images of `input_shape`; call inside strategy.scope()."""
    m = config.model
    encoder = backbones.build_backbone(
        m.backbone, input_shape=input_shape, width_multiplier=m.width_multiplier,
        cifar_stem=m.cifar_stem, synchronized_bn=m.synchronized_bn)
    model = NNCLR(
        encoder,
        projection_hidden_dims=m.projection_hidden_dims, projection_dim=m.projection_dim,
        prediction_hidden_dims=m.prediction_hidden_dims, queue_size=m.queue_size,
        temperature=m.temperature, positive=m.positive, top_k=m.top_k,
        transposed_loss=m.transposed_loss, num_classes=num_classes if m.online_probe else 0,
        synchronized_bn=m.synchronized_bn, seed=config.run.seed)
    model.build((None, *input_shape))
    return model


def schedule_steps(config: Config, num_examples: int) -> tuple[int, int]:
    """Returns (steps_per_epoch, total_steps) for the global batch."""
    o = config.optim
    steps_per_epoch = max(1, num_examples // o.batch_size)
    total = o.train_steps if o.train_steps > 0 else o.epochs * steps_per_epoch
    return min(steps_per_epoch, total), total


def learning_rate_schedule(config: Config, steps_per_epoch: int, total_steps: int) -> optim.WarmupCosine:
    """The run's warm-up + cosine schedule: a function of the step and of the run's total steps."""
    o = config.optim
    return optim.WarmupCosine(
        base_learning_rate=o.base_learning_rate, batch_size=o.batch_size, total_steps=total_steps,
        warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)), scaling=o.lr_scaling)


def build_optimizer(config: Config, steps_per_epoch: int, total_steps: int) -> keras.optimizers.Optimizer:
    o = config.optim
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    return optim.build_optimizer(o.optimizer, schedule,
                                 weight_decay=o.weight_decay, momentum=o.momentum)


def check_resume(config: Config, previous: Config, step: int, num_examples: int) -> None:
    """Refuses (ConfigError) to resume at `step` a run trained with `previous` under other trained
    settings, unless run.allow_config_change; the message states what the new step count does to
    the learning-rate schedule, which is a function of the step and of the total steps."""
    changes = changed_settings(previous, config)
    if not changes:
        return
    old, new = (learning_rate_schedule(c, *schedule_steps(c, num_examples)) for c in (previous, config))
    schedule = ""
    if old.total_steps != new.total_steps:
        schedule = (f" (the learning-rate schedule is then recomputed for {new.total_steps} steps "
                    f"instead of {old.total_steps}: the rate at step {step} becomes "
                    f"{float(new(step)):.4g} instead of {float(old(step)):.4g}, decaying to 0 at "
                    f"step {new.total_steps})")
    where = f"Model dir {config.run.model_dir!r} holds a run at step {step}"
    if not config.run.allow_config_change:
        raise ConfigError(
            f"{where} trained with other settings ({', '.join(changes)}): run with the same "
            f"settings to resume it, add --allow_config_change to continue it with the new ones"
            f"{schedule}, or use a new --model_dir.")
    log.warning("%s; continuing it with changed settings (%s)%s.", where, ", ".join(changes), schedule)


def check_input(config: Config, channels: int) -> tuple[int, int, int]:
    """Checks the image size against the backbone before anything expensive; returns input_shape."""
    m, size = config.model, config.data.image_size
    smallest = backbones.min_image_size(m.backbone, m.cifar_stem)
    if size < smallest:
        raise ConfigError(
            f"data.image_size={size} is too small for {m.backbone} "
            f"({'CIFAR' if m.cifar_stem else 'ImageNet'} stem), which needs at least {smallest} pixels; "
            "raise --image_size or use model.cifar_stem=true.")
    return (size, size, channels)


def pretrain(config: Config, *, verbose="auto", callbacks=(), report: bool | None = None) -> PretrainResult:
    """Pretrains NNCLR as configured; resumes from run.model_dir when it holds a checkpoint.

    On SIGINT / SIGTERM during training it saves a checkpoint after the step that is running and
    raises callbacks.TrainingInterrupted (a KeyboardInterrupt) naming that step.
    """
    config = validate(config)
    r = config.run
    # The strategy first: splitting the CPU and configuring a multi-worker cluster's collectives
    # must happen before anything (even reading a dataset's metadata) starts TensorFlow's devices.
    strategy = distribute.get_strategy(r.strategy, r.cpu_replicas)
    # Multi-worker runs keep the default handlers: saving is a collective every worker joins, so
    # one signalled worker cannot stop and save alone.
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    with StopOnSignal(install=not multi_worker) as stop:
        return _pretrain(config, strategy, stop, verbose, callbacks, report)


def _pretrain(config, strategy, stop, verbose, callbacks, report) -> PretrainResult:
    if is_folder(config.data.dataset):
        # Recorded absolute, so that `nnclr knn --model_dir=...` finds the folder from any directory.
        folder = os.path.abspath(os.path.expanduser(config.data.dataset))
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset=folder))
    d, o, r = config.data, config.optim, config.run
    run_dir = RunDir(r.model_dir)
    chief = distribute.is_chief(strategy)
    if chief:
        run_dir.check_writable()  # a read-only or full model dir: refused before any work
    info = dataset_info(d.dataset, d.train_split, data_dir=d.data_dir,
                        holdout_fraction=d.holdout_fraction)
    evaluates = (r.report if report is None else report) or config.eval.knn_every_epochs > 0
    if info.num_classes > 0 and evaluates:
        for split in dict.fromkeys((d.eval_train_split, d.eval_split)):
            # The report's splits must exist before training, not after (e.g. an image folder).
            dataset_info(d.dataset, split, data_dir=d.data_dir, holdout_fraction=d.holdout_fraction)
    input_shape = check_input(config, info.image_shape[-1])
    if info.num_examples < o.batch_size:
        raise ConfigError(
            f"Dataset {d.dataset!r} split {d.train_split!r} has {info.num_examples} images, fewer than "
            f"one batch of {o.batch_size}; lower --batch_size or use more data.")
    previous = run_dir.check_claim(config, input_shape, info.num_classes)  # another architecture
    if previous is not None:  # other trained settings: refused here, unless allowed
        check_resume(config, previous, checkpoint_step(run_dir.latest_checkpoint(warn=False)),
                     info.num_examples)

    keras.utils.set_random_seed(r.seed)
    if r.deterministic:
        tf.config.experimental.enable_op_determinism()
    # The precision policy depends on the platform the strategy found (TPU: bfloat16).
    precision = distribute.set_precision(r.mixed_precision, strategy)
    steps_per_epoch, total_steps = schedule_steps(config, info.num_examples)
    accelerator, mirrored = distribute.on_accelerator(strategy), distribute.is_mirrored(strategy)
    steps_per_execution = distribute.resolve_steps_per_execution(
        r.steps_per_execution, accelerator, mirrored)
    if r.steps_per_execution > 1 and steps_per_execution == 1:
        log.warning("run.steps_per_execution=%d is 1 under %d mirrored replicas: Keras cannot run "
                    "several steps per execution there (keras-team/keras#19246).",
                    r.steps_per_execution, strategy.num_replicas_in_sync)
    jit_compile = distribute.resolve_jit_compile(r.jit_compile, strategy.num_replicas_in_sync,
                                                 distribute.is_tpu(strategy))
    if r.jit_compile and not jit_compile:
        log.warning("run.jit_compile is off: Keras cannot XLA-compile one step over %d mirrored "
                    "replicas (keras-team/keras#19005); training continues without XLA.",
                    strategy.num_replicas_in_sync)
    log.info("Pretraining %s on %s (%d images): %d steps of %d, %s, %d replica(s), %d step(s) "
             "per execution.", config.model.backbone, d.dataset, info.num_examples, total_steps,
             o.batch_size, precision, strategy.num_replicas_in_sync, steps_per_execution)

    with strategy.scope():
        model = build_model(config, input_shape, info.num_classes)
        optimizer = build_optimizer(config, steps_per_epoch, total_steps)
        model.compile(optimizer=optimizer, jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        optimizer.build(model.trainable_variables)  # its slots mirror the weights: made in the scope
    # Multi-worker: every worker saves each checkpoint (saving is collective), the chief into the
    # model dir, the others into a scratch folder deleted at the end; all resume from the model dir.
    scratch = None if chief else tempfile.mkdtemp(prefix="nnclr_worker_checkpoints_")
    try:
        # model.optimizer: under mixed_float16, compile wrapped `optimizer` in a LossScaleOptimizer
        # whose dynamic loss scale must resume too.
        checkpoints = run_dir.checkpoint_manager(model, model.optimizer, keep=r.keep_checkpoints,
                                                 directory=scratch)
        start_step = run_dir.restore(checkpoints)
        distribute.check_same_step(strategy, start_step, r.model_dir)
        if chief:  # once the restore worked
            run_dir.record_claim(config, input_shape, info.num_classes, step=start_step)
        history = _train(model, config, info, run_dir, checkpoints, start_step, chief, stop,
                         verbose, callbacks)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    result = PretrainResult(model=model, history=history, report={}, model_dir=r.model_dir)
    try:
        if chief:
            _finish_on_chief(model, config, run_dir, input_shape, info, report, result)
    finally:
        distribute.wait_for_chief(strategy)  # the other workers stay until the chief is done
    return result


def _finish_on_chief(model, config, run_dir, input_shape, info, report, result) -> None:
    r = config.run
    if report if report is not None else r.report:
        from nnclr_tf.report import write_report  # plotting and evaluation only after training
        result.report = write_report(model, config, run_dir, input_shape, info)
    elif r.export:
        run_dir.export(model, input_shape)
    run_dir.save_model(model)


def _train(model, config, info, run_dir, checkpoints, start_step, chief, stop, verbose,
           callbacks) -> dict:
    """Trains from `start_step` to the configured end, saves the last checkpoint; returns the history.

    Stopped by a signal (`stop`), it saves the step reached and raises TrainingInterrupted.
    """
    d, o, r = config.data, config.optim, config.run
    steps_per_epoch, total_steps = schedule_steps(config, info.num_examples)
    strategy, channels = model.distribute_strategy, model.encoder.input_shape[-1]

    def make_dataset(initial_step, steps):
        # The data stream is a function of (seed, step): a resumed run sees what an uninterrupted one would.
        # Exactly `steps` steps of it: Keras runs a whole execution of steps_per_execution steps
        # while the data lasts, so a fit call whose steps it does not divide ends with a shorter one.
        def dataset_fn(input_context=None):
            # A pipeline feeding k replicas yields k of its batches per global step.
            per_step = (input_context.num_replicas_in_sync // input_context.num_input_pipelines
                        if input_context is not None else 1)
            return pretraining_dataset(
                d.dataset, split=d.train_split, data_dir=d.data_dir, batch_size=o.batch_size,
                holdout_fraction=d.holdout_fraction,
                image_size=d.image_size, augment=config.augment.preset,
                crop_scale=config.augment.crop_scale, with_labels=info.num_classes > 0,
                input_context=input_context, shuffle_buffer=d.shuffle_buffer, seed=r.seed,
                channels=channels, initial_step=initial_step * per_step,
                jpeg_decode=d.jpeg_decode).take(steps * per_step)
        if strategy.num_replicas_in_sync > 1:
            return strategy.distribute_datasets_from_function(dataset_fn)
        return dataset_fn()

    history: dict[str, list] = {}
    if start_step >= total_steps:
        log.info("Model dir %s already holds a finished run of %d steps; nothing to train (to train "
                 "longer, raise --train_steps or --epochs and add --allow_config_change).",
                 r.model_dir, start_step)
        return history
    # On GPUs and TPUs the host reads the loss back (waiting for the device) once per 32 steps at
    # most, also where an execution is one step (mirrored replicas).
    accelerator = distribute.on_accelerator(strategy)
    checkpoint_callback = CheckpointCallback(
        checkpoints, every_steps=r.checkpoint_every_steps,
        loss_check_steps=distribute.STEPS_PER_EXECUTION_ON_ACCELERATORS if accelerator else 1)
    writers = []  # the chief's: the kNN monitor (before the loggers, which record knn_top1), logs
    if chief:
        if config.eval.knn_every_epochs > 0:
            from nnclr_tf.report import knn_monitor_callbacks
            writers += knn_monitor_callbacks(config, info.num_classes)
        # Both log at the optimizer step, so the logs of a resumed run continue its own.
        writers += [CSVLog(run_dir.csv_log),
                    TensorBoard(run_dir.tensorboard, update_freq=r.log_every_steps)]
    fit_callbacks = [stop, checkpoint_callback, *writers, *callbacks]
    step = start_step
    with stop.training():
        log.info("Training from step %d to step %d.", start_step, total_steps)
        for initial_epoch, epochs, steps in plan_segments(start_step, total_steps, steps_per_epoch,
                                                          model.steps_per_execution):
            if stop.signum is not None or model.stop_training:
                break
            # Each segment continues the one data stream from the step it starts at.
            data = make_dataset(step, (epochs - initial_epoch) * steps)
            out = model.fit(data, initial_epoch=initial_epoch, epochs=epochs,
                            steps_per_epoch=steps, callbacks=fit_callbacks, verbose=verbose,
                            shuffle=False)  # the pipeline shuffles; Keras would warn per call
            for key, values in out.history.items():
                history.setdefault(key, []).extend(float(v) for v in values)
            step = int(model.optimizer.iterations.numpy())
    if checkpoint_callback.diverged_at is not None:
        raise TrainingDivergedError(
            f"Training stopped at step {checkpoint_callback.diverged_at}: the loss is not finite "
            f"(NaN or Inf). The last good checkpoint in {run_dir.checkpoints} was kept; lower the "
            "learning rate or check the input data, then run the same command to resume.")
    save_checkpoint(checkpoints, model)
    if chief:
        run_dir.record_history(config, start_step, step)
    if stop.signum is not None:
        raise stop.interrupted(step)
    return history


def plan_segments(start_step: int, total_steps: int, steps_per_epoch: int,
                  steps_per_execution: int = 1) -> list[tuple[int, int, int]]:
    """Splits steps [start_step, total_steps) into model.fit calls (initial_epoch, epochs, steps_per_epoch).

    A run resumed mid-epoch first finishes that epoch; whole epochs go in one call; a last partial
    epoch gets a call of its own. So the epoch numbers shown match an uninterrupted run. Keras
    starts each epoch's executions where the last one ended, so whole epochs share a call only
    when steps_per_execution divides steps_per_epoch; otherwise each epoch gets its own call,
    whose data end after its steps, so that its last execution is shorter and ends the epoch.
    """
    segments = []
    step = start_step
    while step < total_steps:
        epoch, done = divmod(step, steps_per_epoch)
        if done or total_steps - step < steps_per_epoch or steps_per_epoch % steps_per_execution:
            steps = min(steps_per_epoch - done, total_steps - step)
            segments.append((epoch, epoch + 1, steps))
            step += steps
        else:
            whole = (total_steps - step) // steps_per_epoch
            segments.append((epoch, epoch + whole, steps_per_epoch))
            step += whole * steps_per_epoch
    return segments


def load_pretrained(model_dir: str) -> tuple[NNCLR, Config]:
    """Rebuilds the model saved in `model_dir` (its config.json) and restores its latest checkpoint."""
    run_dir = RunDir(model_dir)
    config, input_shape, num_classes = run_dir.read_claim()
    distribute.set_precision("float32")
    model = build_model(config, input_shape, num_classes)
    latest = run_dir.latest_checkpoint()
    if latest is None:
        raise ConfigError(f"Model dir {model_dir!r} holds no checkpoint; run `nnclr pretrain` first.")
    restore_checkpoint(model_checkpoint(model), latest)  # every weight, or a clear error
    return model, config
