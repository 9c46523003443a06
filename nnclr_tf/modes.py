"""What each `nnclr` mode does, given a validated Config. No flags here: the CLI passes the config."""

from __future__ import annotations

import logging
import math

import keras
import tensorflow as tf

from nnclr_tf import backbones, distribute, evaluate
from nnclr_tf.config import Config, ConfigError
from nnclr_tf.data import dataset_info, evaluation_dataset
from nnclr_tf.data.subsets import subset_size
from nnclr_tf.runs import RunDir

log = logging.getLogger("nnclr_tf")


def pretrain(config: Config, output=None) -> dict:
    from nnclr_tf import train
    return train.pretrain(config).report


def _pretrained(config: Config):
    from nnclr_tf import train
    RunDir(config.run.model_dir).check_writable()  # results go there: refused before the work
    model, saved = train.load_pretrained(config.run.model_dir)
    return model, saved


def _eval_datasets(config: Config, augment_train=None, label_fraction=None, batch_size=None):
    d, e = config.data, config.eval
    batch_size = batch_size or e.linear_batch_size
    info = dataset_info(d.dataset, d.eval_train_split, data_dir=d.data_dir,
                        holdout_fraction=d.holdout_fraction)
    train = evaluation_dataset(d.dataset, d.eval_train_split, data_dir=d.data_dir,
                               holdout_fraction=d.holdout_fraction,
                               batch_size=batch_size, image_size=d.image_size,
                               augment=augment_train, label_fraction=label_fraction,
                               seed=config.run.seed, shuffle=augment_train is not None)
    if label_fraction is not None and train.cardinality() < 0:
        # Our class-balanced subset is a filtered dataset of unknown length: state it, so that fit
        # knows its steps (for the cosine schedule) and starts each epoch from the beginning.
        count = subset_size(label_fraction, info.num_examples)
        train = train.apply(tf.data.experimental.assert_cardinality(
            math.ceil(count / batch_size)))
    test = evaluation_dataset(d.dataset, d.eval_split, data_dir=d.data_dir,
                              holdout_fraction=d.holdout_fraction,
                              batch_size=e.linear_batch_size, image_size=d.image_size)
    return info, train, test


def _finish(config: Config, results, name: str, strategy=None) -> dict:
    if strategy is not None and not distribute.is_chief(strategy):
        return results  # one writer per cluster: the chief
    print(evaluate.results_markdown(results), flush=True)  # first: a failed write loses nothing
    evaluate.write_results(results, config.run.model_dir, name)
    return results


def _trained_under_strategy(config: Config):
    """(strategy, precision, encoder): the pretraining's strategy (run.strategy, run.cpu_replicas)
    and precision policy (run.mixed_precision), and the pretrained encoder rebuilt in the
    strategy's scope under that policy, so that a classifier on it trains on every replica.

    The strategy comes first, as in `pretrain`: splitting the CPU and joining a cluster must
    happen before TensorFlow starts its devices."""
    r, m = config.run, config.model
    strategy = distribute.get_strategy(r.strategy, r.cpu_replicas)
    model, _ = _pretrained(config)  # float32, one device: only its weights are used
    precision = distribute.set_precision(r.mixed_precision, strategy)
    with strategy.scope():
        encoder = backbones.build_backbone(
            m.backbone, input_shape=model.encoder.input_shape[1:], width_multiplier=m.width_multiplier,
            cifar_stem=m.cifar_stem, synchronized_bn=m.synchronized_bn)
    encoder.set_weights(model.encoder.get_weights())
    keras.utils.set_random_seed(r.seed)  # the classifier's head starts the same in every run
    return strategy, precision, encoder


def _distribution(strategy, precision) -> dict:
    """How a protocol ran, for its results file."""
    return {"replicas": int(strategy.num_replicas_in_sync), "precision": precision}


def knn(config: Config, output=None) -> dict:
    model, _ = _pretrained(config)
    info, train, test = _eval_datasets(config)
    result = evaluate.knn_evaluate(model.encoder, train, test, num_classes=info.num_classes,
                                   k=config.eval.knn_k, temperature=config.eval.knn_temperature)
    return _finish(config, {"protocol": "knn", "dataset": config.data.dataset, **_splits(config),
                            **result}, "knn")


def _splits(config: Config, num_train=None) -> dict:
    """The splits (and training examples) a results file was measured on: its protocol."""
    d = config.data
    counts = {} if num_train is None else {"num_train": int(num_train)}
    return {"train_split": d.eval_train_split, "test_split": d.eval_split, **counts}


def linear_eval(config: Config, output=None) -> dict:
    strategy, precision, encoder = _trained_under_strategy(config)
    e = config.eval
    info, train, test = _eval_datasets(config, augment_train="crop_flip")
    result = evaluate.linear_evaluation(encoder, train, test, num_classes=info.num_classes,
                                        epochs=e.linear_epochs, learning_rate=e.linear_learning_rate,
                                        strategy=strategy,
                                        callbacks=[evaluate.EpochLog("linear_eval")])
    return _finish(config, {"protocol": "linear_eval", "dataset": config.data.dataset,
                            **_splits(config, info.num_examples), "batch_size": e.linear_batch_size,
                            "augment": "crop_flip", **_distribution(strategy, precision), **result},
                   "linear_eval", strategy)


def finetune_batch_size(requested: int, num_train: int) -> int:
    """`requested`, capped so that an epoch of `num_train` examples has at least 8 steps (even, >= 2)."""
    return max(2, min(int(requested), num_train // 8) // 2 * 2)


def finetune(config: Config, output=None) -> dict:
    strategy, precision, encoder = _trained_under_strategy(config)
    e, d = config.eval, config.data
    info = dataset_info(d.dataset, d.eval_train_split, data_dir=d.data_dir,
                        holdout_fraction=d.holdout_fraction)
    batch_size = finetune_batch_size(e.finetune_batch_size, subset_size(e.label_fraction, info.num_examples))
    info, train, test = _eval_datasets(config, augment_train="crop_flip", label_fraction=e.label_fraction,
                                       batch_size=batch_size)
    result = evaluate.fine_tune(encoder, train, test, num_classes=info.num_classes,
                                epochs=e.finetune_epochs, learning_rate=e.finetune_learning_rate,
                                strategy=strategy,
                                callbacks=[evaluate.EpochLog("finetune")])
    scores = result[0] if isinstance(result, tuple) else result
    num_train = subset_size(e.label_fraction, info.num_examples)
    return _finish(config, {"protocol": "finetune", "label_fraction": e.label_fraction,
                            "dataset": config.data.dataset, **_splits(config, num_train),
                            "batch_size": batch_size, "augment": "crop_flip",
                            **_distribution(strategy, precision), **scores},
                   "finetune", strategy)


def transfer(config: Config, output=None) -> dict:
    model, _ = _pretrained(config)
    rows = evaluate.transfer_suite(model.encoder, config.eval.transfer_datasets or None,
                                   data_dir=config.data.data_dir, image_size=config.data.image_size)
    return _finish(config, rows, "transfer")


def export(config: Config, output=None, overwrite=False) -> dict:
    """Writes the run's export (the same as at the end of pretraining) to `output`, default
    MODEL_DIR/saved_model, which it replaces: that one is always regenerated from the checkpoint."""
    run_dir = RunDir(config.run.model_dir)
    path = output or run_dir.saved_model
    if output and not overwrite and tf.io.gfile.exists(path) and (
            not tf.io.gfile.isdir(path) or tf.io.gfile.listdir(path)):
        raise ConfigError(f"--output {output!r} already exists and is not empty; pass --overwrite "
                          "to replace it, or choose another --output.")
    model, _ = _pretrained(config)
    _, input_shape, _ = run_dir.read_claim()
    run_dir.export(model, input_shape, path=path, overwrite=True)
    print(f"SavedModel (float32 serving; see export.json inside) written to {path}", flush=True)
    return {"saved_model": path, "precision": "float32"}
