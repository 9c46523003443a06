"""The NNCLR contrastive loss (and, with anchors = z, the SimCLR-style baseline).

PAPER.md, batch of n, temperature tau:
    L_i = -log( exp(NN(z_i) . p_i+ / tau) / sum_k exp(NN(z_i) . p_k+ / tau) )
where + marks the other view. `contrastive_loss(anchors=nn_1, predictions=p_2)` is that term;
`nnclr_loss` symmetrises it over the two views (and optionally the transposed matrix).

Cross-replica negatives: each replica passes its local anchors, the all-gathered predictions and
`label_offset = replica_id * local_batch`; dividing each replica's loss by the replica count makes
the summed gradients equal the single-device gradient on the global batch.
All math is float32, whatever the inputs' dtype (e.g. under mixed_bfloat16), and the logits'
matmul keeps float32 precision where GPUs (TF32) and TPUs (bfloat16) would round it
(`nnclr_tf.similarity`).
"""

import tensorflow as tf

from nnclr_tf import similarity

REDUCTIONS = ("mean", "sum", "none")


def _logits(anchors, predictions, temperature, predictions_global, label_offset):
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive; the paper uses 0.1.")
    anchors = tf.math.l2_normalize(tf.cast(anchors, tf.float32), axis=-1)
    targets = predictions if predictions_global is None else predictions_global
    targets = tf.math.l2_normalize(tf.cast(targets, tf.float32), axis=-1)
    # [batch, columns], at float32 precision on GPUs and TPUs too.
    logits = similarity.float32_matmul(anchors, targets, transpose_b=True) / temperature
    labels = tf.range(tf.shape(anchors)[0]) + tf.cast(label_offset, tf.int32)
    return logits, labels


def contrastive_loss(anchors, predictions, temperature=0.1, reduction="mean",
                     predictions_global=None, label_offset=0):
    """Cross-entropy of row i of anchors @ predictions^T / tau picking column i.

    Args:
      anchors: [batch, dim] (NN(z) of one view, or z for the SimCLR baseline).
      predictions: [batch, dim] predictions of the other view, row-aligned with `anchors`.
      temperature: softmax temperature tau.
      reduction: "mean" -> scalar, "sum" -> scalar, "none" -> [batch].
      predictions_global: optional [global_batch, dim] all-gathered predictions (containing
        this replica's rows); when given the columns are these, and `predictions` is unused.
      label_offset: index of this replica's first row in `predictions_global`
        (replica_id * local_batch).

    Returns:
      float32 loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")
    logits, labels = _logits(anchors, predictions, temperature, predictions_global, label_offset)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if reduction == "mean":
        return tf.reduce_mean(losses)
    if reduction == "sum":
        return tf.reduce_sum(losses)
    return losses


def nnclr_loss(nn_1, nn_2, p_1, p_2, temperature=0.1, transposed=False, gathered=None,
               label_offset=0):
    """Symmetric NNCLR loss: 0.5 * (L(nn_1, p_2) + L(nn_2, p_1)).

    Args:
      nn_1, nn_2: [batch, dim] nearest neighbours of z_1, z_2 (no gradient expected).
      p_1, p_2: [batch, dim] predictions of view 1 and view 2.
      temperature: softmax temperature tau.
      transposed: also add L(p_2, nn_1) + L(p_1, nn_2) (rows = predictions); the four terms
        are averaged.
      gathered: optional tuple (nn_1, nn_2, p_1, p_2) all-gathered over replicas, for
        cross-replica negatives; the nn entries may be None when `transposed` is False.
      label_offset: replica_id * local_batch when `gathered` is given.

    Returns:
      scalar float32 loss.
    """
    g_nn_1, g_nn_2, g_p_1, g_p_2 = gathered if gathered is not None else (None,) * 4
    if transposed and gathered is not None and (g_nn_1 is None or g_nn_2 is None):
        raise ValueError("transposed=True with gathered negatives needs the all-gathered "
                         "nn_1 and nn_2 in `gathered`; pass all four tensors.")

    def term(anchors, predictions, predictions_global):
        return contrastive_loss(anchors, predictions, temperature,
                                predictions_global=predictions_global, label_offset=label_offset)

    terms = [term(nn_1, p_2, g_p_2), term(nn_2, p_1, g_p_1)]
    if transposed:
        terms += [term(p_2, nn_1, g_nn_1), term(p_1, nn_2, g_nn_2)]
    return tf.add_n(terms) / float(len(terms))


def contrastive_accuracy(anchors, predictions, predictions_global=None, label_offset=0):
    """Fraction of rows whose most similar column is their own positive, float32 scalar.

    Args as in `contrastive_loss` (anchors [batch, dim], predictions [batch, dim]).
    """
    logits, labels = _logits(anchors, predictions, 1.0, predictions_global, label_offset)
    hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
    return tf.reduce_mean(tf.cast(hits, tf.float32))
