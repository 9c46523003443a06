"""Optimisation: LARS for Keras 3, the warm-up + cosine learning-rate schedule, optimizer by name.

    schedule = WarmupCosine(base_learning_rate=0.3, batch_size=4096, total_steps=100_000,
                            warmup_steps=1_000)
    optimizer = LARS(schedule, weight_decay=1e-6)   # biases and BN parameters excluded (rank <= 1)
    # model.compile(optimizer=optimizer), or model.compile(optimizer="lars") for the defaults
"""

import math

import keras
from keras import ops

from nnclr_tf.config import LR_SCALINGS, OPTIMIZERS  # the names; `build_optimizer` makes each

SCALINGS = LR_SCALINGS  # the names live in nnclr_tf.config (TensorFlow-free)


@keras.saving.register_keras_serializable(package="nnclr_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) with SimCLR's classic-momentum form.

    For each variable w with gradient g (per step, learning rate lr):
        g' = g + weight_decay * w
        trust_ratio = trust_coefficient * ||w|| / (||g'|| + epsilon)   (1 if ||w|| or ||g'|| is 0)
        v = momentum * v + lr * trust_ratio * g'
        w = w - v          (nesterov: w = w - (momentum * v + lr * trust_ratio * g'))
    Excluded variables (rank <= 1 when `exclude_rank_1`, i.e. biases and batch-norm gamma/beta, and
    those given to `exclude_from_adaptation`) use g' = g and trust_ratio = 1: plain momentum SGD.

    The weight decay is the coupled L2 term of the LARS paper, applied inside `update_step`; Keras'
    own (decoupled) `weight_decay` machinery is left off, so `self.weight_decay` stays None and the
    value lives in `self.lars_weight_decay`.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=1e-6,
        trust_coefficient=0.001,
        epsilon=0.0,
        nesterov=False,
        exclude_rank_1=True,
        name="lars",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=None, **kwargs)
        for arg, value in (("momentum", momentum), ("weight_decay", weight_decay),
                           ("trust_coefficient", trust_coefficient), ("epsilon", epsilon)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LARS {arg}={value!r} must be a non-negative number.")
        if momentum >= 1:
            raise ValueError(f"LARS momentum={momentum} must be below 1; the paper uses 0.9.")
        if trust_coefficient == 0:
            raise ValueError(
                "LARS trust_coefficient=0 would freeze every adapted variable; use a positive value "
                "such as 0.001."
            )
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.epsilon = float(epsilon)
        self.nesterov = bool(nesterov)
        self.exclude_rank_1 = bool(exclude_rank_1)
        self._excluded_keys = set()

    def exclude_from_adaptation(self, var_list):
        """Exclude these variables from weight decay and trust-ratio scaling (call before training).

        Variables are matched by identity (works for mirrored / distributed variables), not by name.
        """
        if self.built:
            raise ValueError(
                "LARS.exclude_from_adaptation was called after the optimizer was built; call it "
                "before the first training step."
            )
        self._excluded_keys.update(self._var_key(variable) for variable in var_list)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        # Keras' version configures its decoupled decay, which LARS does not use: fail loudly
        # rather than silently ignoring the request.
        raise ValueError(
            "LARS does not use Keras' exclude_from_weight_decay; call "
            "exclude_from_adaptation(var_list) (or rely on exclude_rank_1=True) instead."
        )

    def is_adapted(self, variable):
        """Whether `variable` gets weight decay and trust-ratio scaling."""
        if self.exclude_rank_1 and len(variable.shape) <= 1:
            return False
        return self._var_key(variable) not in self._excluded_keys

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [
            self.add_variable_from_reference(variable, name="momentum") for variable in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.cast(ops.convert_to_tensor(gradient), dtype)
        velocity = self.momentums[self._get_variable_index(variable)]

        # Python-level decision: traced once per variable, no runtime branching.
        if self.is_adapted(variable):
            if self.lars_weight_decay > 0:
                gradient = gradient + ops.cast(self.lars_weight_decay, dtype) * variable
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            usable = ops.logical_and(ops.greater(w_norm, 0), ops.greater(g_norm, 0))
            # The safe denominator keeps the unselected branch of `where` finite.
            denominator = ops.where(usable, g_norm + ops.cast(self.epsilon, dtype), 1)
            trust_ratio = ops.where(
                usable, ops.cast(self.trust_coefficient, dtype) * w_norm / denominator, 1
            )
            learning_rate = learning_rate * ops.cast(trust_ratio, dtype)

        momentum = ops.cast(self.momentum, dtype)
        step = learning_rate * gradient
        next_velocity = momentum * velocity + step
        self.assign(velocity, next_velocity)
        if self.nesterov:
            self.assign_sub(variable, momentum * next_velocity + step)
        else:
            self.assign_sub(variable, next_velocity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.lars_weight_decay,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "exclude_rank_1": self.exclude_rank_1,
            }
        )
        return config


def peak_learning_rate(base_learning_rate, batch_size, scaling="linear"):
    """Learning rate at the end of warm-up: base*batch/256 ("linear"), base*sqrt(batch) ("sqrt"), base ("none")."""
    if scaling == "linear":
        return base_learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return base_learning_rate * math.sqrt(batch_size)
    if scaling == "none":
        return float(base_learning_rate)
    raise ValueError(f"Unknown learning-rate scaling={scaling!r}; expected one of {SCALINGS}.")


@keras.saving.register_keras_serializable(package="nnclr_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to the batch-scaled peak over `warmup_steps`, then cosine decay to 0.

    lr(step) = peak * step / warmup_steps                               for step < warmup_steps
             = peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))  afterwards (0 past total)
    """

    def __init__(self, base_learning_rate, batch_size, total_steps, warmup_steps=0, scaling="linear"):
        if scaling not in SCALINGS:
            raise ValueError(f"Unknown learning-rate scaling={scaling!r}; expected one of {SCALINGS}.")
        if not base_learning_rate >= 0:
            raise ValueError(f"base_learning_rate={base_learning_rate} must be non-negative.")
        if not batch_size >= 1:
            raise ValueError(f"batch_size={batch_size} must be a positive integer.")
        if not total_steps >= 1:
            raise ValueError(f"total_steps={total_steps} must be a positive integer.")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"warmup_steps={warmup_steps} must lie between 0 and total_steps={total_steps}."
            )
        self.base_learning_rate = float(base_learning_rate)
        self.batch_size = int(batch_size)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.scaling = scaling
        self.peak_learning_rate = peak_learning_rate(self.base_learning_rate, self.batch_size, scaling)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = ops.cast(self.peak_learning_rate, "float32")
        warmup = float(self.warmup_steps)
        warmup_lr = peak * step / max(warmup, 1.0)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine_lr = peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < warmup, warmup_lr, cosine_lr)

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "batch_size": self.batch_size,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "scaling": self.scaling,
        }


def build_optimizer(name, learning_rate, weight_decay=1e-6, momentum=0.9):
    """Optimizer by name: "lars" (paper), "sgd" (momentum), "adamw" (momentum unused).

    `learning_rate` is a float or a `LearningRateSchedule` such as `WarmupCosine`. For "sgd" and
    "adamw" the weight decay is Keras' decoupled one (scaled by the learning rate) on all variables.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer name={name!r}; expected one of {OPTIMIZERS}.")
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        # Keras optimizers reject Python ints ("1") as learning rates.
        learning_rate = float(learning_rate)
    if name == "lars":
        return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay)
    decay = float(weight_decay) if weight_decay else None
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=float(momentum), weight_decay=decay)
    return keras.optimizers.AdamW(learning_rate, weight_decay=decay or 0.0)
