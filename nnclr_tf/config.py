"""Typed experiment configuration: frozen dataclasses, named presets, validation and overrides.

A preset is data. Everything a run needs is in one `Config`; the command line turns flags into one,
a notebook builds one with `get_preset(...)` and `override(...)`, and nothing below reads flags.

    config = override(get_preset("fmnist_cpu"), {"model.queue_size": 4096, "optim.epochs": 2})
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field

BACKBONES = ("resnet18", "resnet34", "resnet50")
AUGMENT_PRESETS = ("byol", "cifar", "crops")
JPEG_DECODES = ("full", "union", "crops")  # nnclr_tf.data.jpeg implements each
LR_SCALINGS = ("linear", "sqrt", "none")  # base rate x batch / 256, x sqrt(batch / 256), as given
OPTIMIZERS = ("lars", "sgd", "adamw")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
POSITIVES = ("nn", "self")


class ConfigError(ValueError):
    """A configuration value a user set is out of range or unknown."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    projection_hidden_dims: tuple[int, ...] = (2048, 2048)
    projection_dim: int = 256
    prediction_hidden_dims: tuple[int, ...] = (4096,)
    queue_size: int = 98_304
    temperature: float = 0.1
    positive: str = "nn"
    top_k: int = 1
    transposed_loss: bool = False
    synchronized_bn: bool = True
    online_probe: bool = True


@dataclass(frozen=True)
class AugmentConfig:
    preset: str = "byol"
    crop_scale: tuple[float, float] = (0.08, 1.0)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "imagenet2012"
    train_split: str = "train"
    eval_train_split: str = "train"
    eval_split: str = "validation"
    data_dir: str | None = None
    image_size: int = 224
    shuffle_buffer: int = 10_000
    download: bool = False
    holdout_fraction: float = 0.1  # image folders without test/: this part of each class is "test"
    # JPEG sources (imagenet2012, .jpg folders): "full" decodes whole images, "union" only the box
    # holding both views' crops, "crops" each crop alone (BUILD.md: no gain measured on 2 CPU cores).
    jpeg_decode: str = "full"


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "lars"
    base_learning_rate: float = 0.3
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    batch_size: int = 4096
    epochs: int = 1000
    train_steps: int = 0  # > 0 overrides epochs
    warmup_epochs: float = 10.0


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_every_epochs: int = 0  # 0: no kNN monitor during pretraining
    linear_epochs: int = 90
    linear_learning_rate: float = 0.1
    linear_batch_size: int = 1024
    finetune_epochs: int = 30
    finetune_learning_rate: float = 0.01
    # Capped so that an epoch of the labelled subset has at least 8 steps (1 % of a small set would
    # otherwise be one step per epoch); the batch used is in finetune.json.
    finetune_batch_size: int = 256
    label_fraction: float = 0.01
    max_eval_examples: int = 0  # 0: the whole split
    transfer_datasets: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    model_dir: str = "runs/nnclr"
    strategy: str = "auto"
    cpu_replicas: int = 0  # > 1 splits the CPU into that many logical devices (testing distribution)
    mixed_precision: str = "auto"
    jit_compile: bool = False
    # Training steps per host dispatch (Keras compile); 0 = auto: 1 on CPUs, 32 on GPUs and TPUs.
    steps_per_execution: int = 0
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    log_every_steps: int = 50
    export: bool = True
    report: bool = True
    allow_config_change: bool = False  # resume a model dir with other trained settings (--allow_config_change)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _preset_imagenet_resnet50() -> Config:
    # The paper: ResNet-50, LARS, batch 4096, 1000 epochs, 10 warm-up epochs, wd 1e-6, tau 0.1,
    # support set 98,304 x 256, projection 2048-2048-256, prediction 4096-256, BYOL augmentations.
    return Config()


def _preset_cifar10_resnet18() -> Config:
    return Config(
        model=ModelConfig(backbone="resnet18", cifar_stem=True, queue_size=65_536),
        augment=AugmentConfig(preset="cifar", crop_scale=(0.08, 1.0)),
        data=DataConfig(dataset="cifar10", eval_split="test", image_size=32),
        optim=OptimConfig(batch_size=512, epochs=1000, base_learning_rate=0.3, weight_decay=1e-5),
        eval=EvalConfig(knn_k=200, linear_epochs=100, knn_every_epochs=10),
    )


def _preset_cifar100_resnet18() -> Config:
    base = _preset_cifar10_resnet18()
    return dataclasses.replace(base, data=dataclasses.replace(base.data, dataset="cifar100"))


def _preset_stl10_resnet18() -> Config:
    return Config(
        model=ModelConfig(backbone="resnet18", cifar_stem=False, queue_size=65_536),
        augment=AugmentConfig(preset="byol"),
        data=DataConfig(dataset="stl10", train_split="unlabelled", eval_split="test", image_size=96),
        optim=OptimConfig(batch_size=512, epochs=400, weight_decay=1e-5),
        eval=EvalConfig(linear_epochs=100),
    )


def _preset_fmnist_cpu() -> Config:
    # Pretrains in under 20 minutes on 2 idle CPU cores (about 1.1 s a step) on the full
    # Fashion-MNIST; BUILD.md has the pilots behind each choice. The ImageNet stem on images
    # upsampled to 56 px costs what the CIFAR stem costs at 28 px with half the width, and learns
    # more per step; brightness / contrast jitter and solarize ("cifar", grayscale) beat crops only.
    return Config(
        model=ModelConfig(
            backbone="resnet18", width_multiplier=0.5, cifar_stem=False,
            projection_hidden_dims=(512,), projection_dim=128, prediction_hidden_dims=(512,),
            queue_size=8192,
        ),
        augment=AugmentConfig(preset="cifar", crop_scale=(0.25, 1.0)),
        data=DataConfig(dataset="fashion_mnist_full", eval_split="test", image_size=56,
                        shuffle_buffer=60_000),
        optim=OptimConfig(optimizer="lars", batch_size=256, epochs=4, base_learning_rate=1.0,
                          weight_decay=1e-5, warmup_epochs=0.5),
        eval=EvalConfig(knn_k=20, linear_epochs=30, linear_learning_rate=0.1, knn_every_epochs=0),
        run=RunConfig(model_dir="runs/fmnist_cpu", mixed_precision="auto"),
    )


def _preset_demo() -> Config:
    # The first command a new user runs: about five minutes on 2 CPU cores, embedded data, offline.
    # A ResNet-50 at width 0.25 (512 features, ImageNet stem, images upsampled to 56 px) with
    # crops of half the image or more: of the pilots in BUILD.md ("The default job") the best
    # linear probe under 5 minutes; ResNet-18 at width 0.25 (128 features) is 2.5x faster a step
    # and 1.5 points below. Batch 128 gives twice the steps of 256 for the same images seen.
    base = _preset_fmnist_cpu()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, backbone="resnet50", queue_size=4096,
                                  width_multiplier=0.25),
        augment=dataclasses.replace(base.augment, crop_scale=(0.5, 1.0)),
        data=dataclasses.replace(base.data, dataset="embedded", shuffle_buffer=10_000),
        optim=dataclasses.replace(base.optim, batch_size=128, epochs=4, warmup_epochs=0.5),
        eval=dataclasses.replace(base.eval, max_eval_examples=0),
        run=dataclasses.replace(base.run, model_dir="runs/demo", checkpoint_every_steps=50),
    )


def _preset_tiny() -> Config:
    # For tests and smoke runs: seconds, not minutes.
    base = _preset_demo()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, backbone="resnet18", width_multiplier=0.125,
                                  queue_size=64, cifar_stem=True, projection_hidden_dims=(32,),
                                  projection_dim=16, prediction_hidden_dims=(32,)),
        augment=AugmentConfig(preset="crops", crop_scale=(0.25, 1.0)),
        data=dataclasses.replace(base.data, image_size=16, shuffle_buffer=256),
        optim=dataclasses.replace(base.optim, batch_size=16, epochs=1, train_steps=4,
                                  warmup_epochs=0.0),
        eval=dataclasses.replace(base.eval, knn_k=5, linear_epochs=2, finetune_epochs=1,
                                 max_eval_examples=64),
        run=dataclasses.replace(base.run, model_dir="runs/tiny", checkpoint_every_steps=2,
                                log_every_steps=1),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "imagenet_resnet50": _preset_imagenet_resnet50,
    "cifar10_resnet18": _preset_cifar10_resnet18,
    "cifar100_resnet18": _preset_cifar100_resnet18,
    "stl10_resnet18": _preset_stl10_resnet18,
    "fmnist_cpu": _preset_fmnist_cpu,
    "demo": _preset_demo,
    "tiny": _preset_tiny,
}


def _unknown(kind: str, value: str, choices) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"Unknown {kind} {value!r}: expected one of {', '.join(choices)}.{hint}")


def get_preset(name: str) -> Config:
    """Returns the named preset, validated."""
    if name not in PRESETS:
        raise _unknown("preset", name, PRESETS)
    return validate(PRESETS[name]())


def _convert(text: str, annotation: str, key: str):
    """Parses a command-line string into the type named by a dataclass field annotation."""
    try:
        if annotation == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation == "int":
            return int(text)
        if annotation == "float":
            return float(text)
        if annotation == "str":
            return text
        if annotation == "str | None":
            return None if text.strip().lower() in ("", "none") else text
        if annotation.startswith("tuple["):
            inner = "float" if "float" in annotation else "int" if "int" in annotation else "str"
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            return tuple(_convert(p.strip(), inner, key) for p in parts)
    except ValueError:
        pass
    raise ConfigError(f"Config field {key} got {text!r}, which is not a valid {annotation}.")


def override(config: Config, overrides: dict[str, object]) -> Config:
    """Returns `config` with dotted keys replaced, e.g. {"model.queue_size": 4096}; validated.

    String values are parsed to the field's type, so command-line text can be passed as it is.
    """
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        section_name, _, field_name = key.partition(".")
        if section_name not in sections or not field_name:
            raise _unknown("config section", section_name, sections) if field_name else ConfigError(
                f"Config override {key!r} must look like section.field, e.g. model.queue_size.")
        section = sections[section_name]
        types = {f.name: str(f.type) for f in dataclasses.fields(section)}
        if field_name not in types:
            raise _unknown(f"field of {section_name}", field_name, types)
        if isinstance(value, str):
            value = _convert(value, types[field_name], key)
        elif isinstance(value, list):
            value = tuple(value)
        sections[section_name] = dataclasses.replace(section, **{field_name: value})
    return validate(Config(**sections))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def min_image_size(cifar_stem: bool) -> int:
    """Smallest image side every backbone accepts: its total stride, 8 with the CIFAR stem and 32
    with the ImageNet one (backbones.min_image_size, which a test keeps equal to this). Checked
    here so that a wrong size fails before TensorFlow loads."""
    return 8 if cifar_stem else 32


def _check_image_size(m: ModelConfig, d: DataConfig) -> None:
    smallest = min_image_size(m.cifar_stem)
    if d.image_size < smallest:
        stem = ("CIFAR stem (model.cifar_stem=true)" if m.cifar_stem
                else "ImageNet stem (model.cifar_stem=false)")
        way_out = "" if m.cifar_stem else " or --set model.cifar_stem=true"
        raise ConfigError(f"data.image_size={d.image_size} is too small for {m.backbone} with the "
                          f"{stem}, which needs at least {smallest} pixels; add --image_size="
                          f"{smallest}{way_out}.")


def validate(config: Config) -> Config:
    """Raises ConfigError with one sentence for the first invalid value; returns the config."""
    m, a, d, o, e, r = config.model, config.augment, config.data, config.optim, config.eval, config.run
    if m.backbone not in BACKBONES:
        raise _unknown("backbone", m.backbone, BACKBONES)
    if m.positive not in POSITIVES:
        raise _unknown("positive", m.positive, POSITIVES)
    if a.preset not in AUGMENT_PRESETS:
        raise _unknown("augmentation preset", a.preset, AUGMENT_PRESETS)
    if o.optimizer not in OPTIMIZERS:
        raise _unknown("optimizer", o.optimizer, OPTIMIZERS)
    if r.strategy not in STRATEGIES:
        raise _unknown("strategy", r.strategy, STRATEGIES)
    if r.mixed_precision not in PRECISIONS:
        raise _unknown("mixed precision policy", r.mixed_precision, PRECISIONS)
    _check(d.jpeg_decode in JPEG_DECODES,
           f"data.jpeg_decode must be one of {', '.join(JPEG_DECODES)}, got {d.jpeg_decode!r}.")
    _check(o.lr_scaling in LR_SCALINGS,
           f"optim.lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {o.lr_scaling!r}.")
    _check(m.width_multiplier > 0,
           f"model.width_multiplier must be > 0, got {m.width_multiplier}.")
    _check_image_size(m, d)
    _check(m.temperature > 0, f"model.temperature must be > 0, got {m.temperature}.")
    _check(m.projection_dim > 0, f"model.projection_dim must be > 0, got {m.projection_dim}.")
    _check(all(h > 0 for h in m.projection_hidden_dims + m.prediction_hidden_dims),
           "model hidden layer sizes must all be > 0.")
    _check(m.top_k >= 1, f"model.top_k must be >= 1, got {m.top_k}.")
    _check(o.batch_size >= 2, f"optim.batch_size must be >= 2 (negatives), got {o.batch_size}.")
    _check(m.queue_size > 0, f"model.queue_size must be > 0, got {m.queue_size}.")
    _check(m.queue_size >= o.batch_size,
           f"model.queue_size ({m.queue_size}) must be >= the global batch size ({o.batch_size}); "
           "raise --queue_size or lower --batch_size.")
    _check(m.top_k <= m.queue_size, f"model.top_k ({m.top_k}) must be <= model.queue_size.")
    lo, hi = a.crop_scale
    _check(0 < lo <= hi <= 1, f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {a.crop_scale}.")
    _check(d.image_size >= 8, f"data.image_size must be >= 8 pixels, got {d.image_size}.")
    _check(0 < d.holdout_fraction < 1,
           f"data.holdout_fraction must be in (0, 1), got {d.holdout_fraction}; e.g. "
           "--set data.holdout_fraction=0.1 holds out 10 % of each class of an image folder.")
    _check(o.base_learning_rate > 0, f"optim.base_learning_rate must be > 0, got {o.base_learning_rate}.")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}.")
    _check(o.epochs >= 1 or o.train_steps >= 1,
           f"optim.epochs must be >= 1 (or optim.train_steps > 0), got {o.epochs}.")
    _check(o.train_steps >= 0, f"optim.train_steps must be >= 0, got {o.train_steps}.")
    _check(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}.")
    _check(e.knn_k >= 1, f"eval.knn_k must be >= 1, got {e.knn_k}.")
    _check(e.knn_temperature > 0, f"eval.knn_temperature must be > 0, got {e.knn_temperature}.")
    for name in ("linear_batch_size", "finetune_batch_size", "linear_epochs", "finetune_epochs"):
        _check(getattr(e, name) >= 1, f"eval.{name} must be >= 1, got {getattr(e, name)}.")
    for name in ("linear_learning_rate", "finetune_learning_rate"):
        _check(getattr(e, name) > 0, f"eval.{name} must be > 0, got {getattr(e, name)}.")
    _check(e.max_eval_examples >= 0,
           f"eval.max_eval_examples must be >= 0 (0: the whole split), got {e.max_eval_examples}.")
    _check(0 < e.label_fraction <= 1, f"eval.label_fraction must be in (0, 1], got {e.label_fraction}.")
    _check(r.checkpoint_every_steps >= 1,
           f"run.checkpoint_every_steps must be >= 1, got {r.checkpoint_every_steps}.")
    _check(r.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {r.keep_checkpoints}.")
    _check(r.steps_per_execution >= 0,
           f"run.steps_per_execution must be >= 0 (0: sized for the platform), got "
           f"{r.steps_per_execution}.")
    _check(r.cpu_replicas >= 0, f"run.cpu_replicas must be >= 0, got {r.cpu_replicas}.")
    _check(bool(r.model_dir), "run.model_dir must not be empty.")
    return config


def from_dict(values: dict) -> Config:
    """Inverse of Config.to_dict (used to reload the config saved beside a checkpoint)."""
    sections = {}
    for f in dataclasses.fields(Config):
        cls = f.default_factory
        raw = dict(values.get(f.name, {}))
        known = {g.name for g in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        sections[f.name] = cls(**kwargs)
    return Config(**sections)
