"""One whole `NNCLR.train_step` against a NumPy reference written from the paper, not from the code.

The model is small enough to write out by hand: images [4, 4, 4, 1] -> Flatten -> Dense (the
encoder, no BN) -> projection Dense (no bias) -> BN -> L2 norm = z -> prediction Dense -> L2 norm
= p, a support set of 8 known rows, and plain SGD. The reference (float64) computes the
neighbours (argmax cosine), the paper's loss (Dwibedi et al. 2021) symmetrised over the views,

    loss = 0.5 * (L(NN(z_1), p_2) + L(NN(z_2), p_1)),
    L(a, p) = mean_i -log( exp(a_i . p_i / tau) / sum_k exp(a_i . p_k / tau) ),

its gradient by central finite differences of that NumPy loss with the neighbours held constant,
and the SGD update. The model runs in float32, hence the 1e-5 tolerances. Each check is paired
with the wrong implementation it must tell apart (other pairing, other neighbour, lookup after
the enqueue, gradient through the neighbour), and asserts that one would miss the tolerance.
"""

import keras
import numpy as np
import pytest

from nnclr_tf.model import NNCLR

BATCH, SIDE, FEATURES, DIM, QUEUE = 4, 4, 6, 5, 8
TAU, LR, EPSILON = 0.1, 0.05, 1e-3  # EPSILON: Keras' BatchNormalization default
COUNT_BEFORE = 11  # rows ever enqueued: the queue is full and the next write goes to row 11 % 8
QUEUE_LABELS = 100 + np.arange(QUEUE)  # one distinct label per queue row
# The float32 model lands within 1e-6 of the float64 reference here (loss 4e-7, weights 8e-7,
# queue 4e-7 measured); 1e-5 leaves room for other CPUs' float32 kernels.
TOLERANCE = 1e-5
WRONG_BY = 1e-3  # what every wrong implementation below misses the reference by, at least


def _normalised(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def initial_state():
    """Views, weights and queue rows of the step, float64, from a fixed seed."""
    rng = np.random.default_rng(7)
    views = rng.uniform(size=(2, BATCH, SIDE, SIDE, 1))
    params = {
        "encoder_kernel": rng.normal(scale=0.5, size=(SIDE * SIDE, FEATURES)),
        "encoder_bias": rng.normal(scale=0.1, size=FEATURES),
        "projection_kernel": rng.normal(scale=0.5, size=(FEATURES, DIM)),
        "bn_gamma": rng.uniform(0.5, 1.5, size=DIM),
        "bn_beta": rng.normal(scale=0.1, size=DIM),
        "prediction_kernel": rng.normal(scale=0.5, size=(DIM, DIM)),
        "prediction_bias": rng.normal(scale=0.1, size=DIM),
    }
    queue = _normalised(rng.normal(size=(QUEUE, DIM)))
    return views[0], views[1], params, queue


def forward(params, view_1, view_2):
    """z_1, z_2, p_1, p_2 [batch, dim]: both views in one pass, so BN sees 2 * batch rows."""
    images = np.concatenate([view_1, view_2]).reshape(2 * BATCH, -1)
    features = images @ params["encoder_kernel"] + params["encoder_bias"]
    u = features @ params["projection_kernel"]
    mean, variance = u.mean(axis=0), u.var(axis=0)  # batch statistics, biased variance
    y = params["bn_gamma"] * (u - mean) / np.sqrt(variance + EPSILON) + params["bn_beta"]
    z = _normalised(y)
    p = _normalised(z @ params["prediction_kernel"] + params["prediction_bias"])
    return z[:BATCH], z[BATCH:], p[:BATCH], p[BATCH:]


def neighbour_index(z, queue):
    """Row of `queue` with the largest cosine similarity to each z, and its margin over the next."""
    cosines = _normalised(z) @ _normalised(queue).T
    ranked = np.sort(cosines, axis=1)
    return np.argmax(cosines, axis=1), ranked[:, -1] - ranked[:, -2]


def contrastive(anchors, predictions):
    """The paper's L averaged over the batch: row i of anchors . predictions^T / tau picks column i."""
    logits = _normalised(anchors) @ _normalised(predictions).T / TAU
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_sum - np.diag(logits)))


def symmetric_loss(nn_1, nn_2, p_1, p_2):
    return 0.5 * (contrastive(nn_1, p_2) + contrastive(nn_2, p_1))


def gradient(loss_of, params, step=1e-5):
    """d loss / d params by central differences, float64 (error ~ step^2, far below 1e-5)."""
    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            shifted = {k: v.copy() for k, v in params.items()}
            shifted[name][index] = value[index] + step
            up = loss_of(shifted)
            shifted[name][index] = value[index] - step
            grad[index] = (up - loss_of(shifted)) / (2 * step)
        grads[name] = grad
    return grads


def sgd(params, grads):
    return {name: params[name] - LR * grads[name] for name in params}


class Reference:
    """The step in NumPy: neighbours, loss, gradients and updates, plus the wrong variants."""

    def __init__(self):
        self.view_1, self.view_2, self.params, self.queue = initial_state()
        self.z_1, self.z_2, self.p_1, self.p_2 = forward(self.params, self.view_1, self.view_2)
        self.index_1, self.margin_1 = neighbour_index(self.z_1, self.queue)
        self.index_2, self.margin_2 = neighbour_index(self.z_2, self.queue)
        self.nn_1, self.nn_2 = self.queue[self.index_1], self.queue[self.index_2]
        self.loss = symmetric_loss(self.nn_1, self.nn_2, self.p_1, self.p_2)
        self.write_rows = (COUNT_BEFORE + np.arange(BATCH)) % QUEUE

        def held_constant(params):  # the neighbours are rows of the queue, constants
            _, _, p_1, p_2 = forward(params, self.view_1, self.view_2)
            return symmetric_loss(self.nn_1, self.nn_2, p_1, p_2)

        def straight_through(params):  # same value, but d NN(z) / d z = identity
            z_1, z_2, p_1, p_2 = forward(params, self.view_1, self.view_2)
            return symmetric_loss(self.nn_1 + z_1 - self.z_1, self.nn_2 + z_2 - self.z_2, p_1, p_2)

        assert abs(straight_through(self.params) - self.loss) < 1e-12
        self.updated = sgd(self.params, gradient(held_constant, self.params))
        self.updated_through_neighbour = sgd(self.params, gradient(straight_through, self.params))


@pytest.fixture(scope="module", name="ref")
def reference_fixture():
    return Reference()


@pytest.fixture(scope="module", name="step")
def model_step_fixture(ref):
    """Runs one train_step of the model set to the reference's state; returns (model, logs)."""
    keras.mixed_precision.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    images = keras.Input((SIDE, SIDE, 1))
    encoder = keras.Model(images, keras.layers.Dense(FEATURES)(keras.layers.Flatten()(images)))
    model = NNCLR(encoder, projection_hidden_dims=(), projection_dim=DIM,
                  prediction_hidden_dims=(), queue_size=QUEUE, temperature=TAU, num_classes=0)
    bn = model.projection_head.output_bn
    assert bn.epsilon == EPSILON and not model.transposed_loss and model.positive == "nn"
    for variable, value in zip(_trainable(model), ref.params.values()):
        variable.assign(value.astype(np.float32))
    model.support_set.embeddings.assign(ref.queue.astype(np.float32))
    model.support_set.labels.assign(QUEUE_LABELS.astype(np.int32))
    model.support_set.count.assign(COUNT_BEFORE)
    model.compile(optimizer=keras.optimizers.SGD(LR), jit_compile=False)
    # Each image is labelled with the queue label of view 1's reference neighbour, so nn_acc is 1
    # exactly when the model picked that row for every image.
    labels = QUEUE_LABELS[ref.index_1].astype(np.int32)
    logs = model.train_on_batch((ref.view_1.astype(np.float32), ref.view_2.astype(np.float32)),
                                labels, return_dict=True)
    return model, logs


def _trainable(model):
    """The model's trainable variables in the order of `initial_state`'s params."""
    dense = model.encoder.layers[-1]
    projection, prediction = model.projection_head, model.prediction_head
    return [dense.kernel, dense.bias, projection.output_dense.kernel, projection.output_bn.gamma,
            projection.output_bn.beta, prediction.output_dense.kernel, prediction.output_dense.bias]


def test_reference_is_unambiguous(ref):
    # float32 cannot flip a neighbour whose cosine leads the next row's by this much.
    assert min(ref.margin_1.min(), ref.margin_2.min()) > 1e-3


def test_neighbours_and_pairing_give_the_paper_loss(ref, step):
    _, logs = step
    assert logs["nn_acc"] == 1.0  # view 1's neighbours are the reference's rows
    assert abs(logs["loss"] - ref.loss) < TOLERANCE
    # The loss value tells apart: the same view's prediction paired with its neighbour, the
    # second-nearest row, and the lookup after the enqueue (each z_1 would find itself).
    same_view = symmetric_loss(ref.nn_1, ref.nn_2, ref.p_2, ref.p_1)
    second = np.argsort(_normalised(ref.z_2) @ ref.queue.T, axis=1)[:, -2]
    other_row = symmetric_loss(ref.nn_1, ref.queue[second], ref.p_1, ref.p_2)
    queue_after = ref.queue.copy()
    queue_after[ref.write_rows] = ref.z_1
    late_1, late_2 = (queue_after[neighbour_index(z, queue_after)[0]] for z in (ref.z_1, ref.z_2))
    lookup_after_enqueue = symmetric_loss(late_1, late_2, ref.p_1, ref.p_2)
    for wrong in (same_view, other_row, lookup_after_enqueue):
        assert abs(wrong - ref.loss) > WRONG_BY


def test_view_1_projections_are_enqueued_after_the_lookup(ref, step):
    model, _ = step
    queue = model.support_set.embeddings.numpy()
    kept = np.setdiff1d(np.arange(QUEUE), ref.write_rows)
    np.testing.assert_array_equal(queue[kept], ref.queue[kept].astype(np.float32))
    np.testing.assert_allclose(queue[ref.write_rows], ref.z_1, atol=TOLERANCE, rtol=0)
    assert int(model.support_set.count.numpy()) == COUNT_BEFORE + BATCH
    labels = model.support_set.labels.numpy()
    np.testing.assert_array_equal(labels[ref.write_rows], QUEUE_LABELS[ref.index_1])
    np.testing.assert_array_equal(labels[kept], QUEUE_LABELS[kept])
    # z_2 or the neighbours in those rows would miss the tolerance.
    assert np.abs(ref.z_2 - ref.z_1).max() > WRONG_BY
    assert np.abs(ref.nn_1 - ref.z_1).max() > WRONG_BY


def test_sgd_update_has_no_gradient_through_the_neighbour(ref, step):
    model, _ = step
    for variable, name in zip(_trainable(model), ref.params):
        np.testing.assert_allclose(variable.numpy(), ref.updated[name], atol=TOLERANCE, rtol=0,
                                   err_msg=name)
    # Had the gradient flowed through NN(z) (straight through), the encoder and the projection
    # would have moved elsewhere; the prediction head, after z, would not.
    for name in ("encoder_kernel", "projection_kernel", "bn_gamma", "bn_beta"):
        assert np.abs(ref.updated_through_neighbour[name] - ref.updated[name]).max() > WRONG_BY
    for name in ("prediction_kernel", "prediction_bias"):
        np.testing.assert_allclose(ref.updated_through_neighbour[name], ref.updated[name],
                                   atol=1e-9)
    # Every weight moved by more than the tolerance, so the comparison above sees the update;
    # except the encoder's bias, which the batch norm's mean subtraction cancels: no gradient.
    for name in ref.params:
        moved = np.abs(ref.updated[name] - ref.params[name]).max()
        assert moved < 1e-9 if name == "encoder_bias" else moved > WRONG_BY, name
