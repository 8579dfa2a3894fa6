"""Losses and metrics, per task, with cbfinn/maml's scaling.

All functions take a leading task axis and return one value per task ``[T]``;
the meta-objective is the mean over tasks.
"""

from __future__ import annotations

import tensorflow as tf


def mse(predictions: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """Mean squared error over all of a task's elements: ``[T, B, D] -> [T]``."""
  targets = tf.cast(targets, predictions.dtype)
  axes = list(range(1, len(predictions.shape)))
  return tf.reduce_mean(tf.square(predictions - targets), axis=axes)


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Softmax cross-entropy per example: ``logits [T, B, N]``, ``labels [T, B]``
  int -> ``[T, B]``.

  Written with ``log_softmax`` and a one-hot product: the fused sparse op has no
  second derivative in TF, which second-order MAML needs.
  """
  one_hot = tf.one_hot(tf.cast(labels, tf.int32), int(logits.shape[-1]),
                       dtype=logits.dtype)
  return -tf.reduce_sum(one_hot * tf.nn.log_softmax(logits), axis=-1)


def scaled_cross_entropy(logits: tf.Tensor, labels: tf.Tensor,
                         shots: int) -> tf.Tensor:
  """cbfinn/maml's classification loss: sum of per-example CE divided by K.

  The original's ``xent`` is ``softmax_cross_entropy / update_batch_size``, a
  per-example vector that ``tf.gradients`` and the later ``reduce_sum`` turn
  into ``sum CE / K``: N x the mean on the support set and ``N Q / K`` x the
  mean on the query set. The inner learning rates (0.4, 0.1, 0.01) and the
  MiniImagenet gradient clip were tuned for this scale, so it is kept.

  Returns:
    ``[T]``.
  """
  return tf.reduce_sum(cross_entropy(logits, labels), axis=1) / float(shots)


def mean_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Mean cross-entropy per task ``[T]`` (the usual scale)."""
  return tf.reduce_mean(cross_entropy(logits, labels), axis=1)


def accuracy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
  """Fraction of correct argmax predictions per task: ``[T]``."""
  predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
  correct = tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)),
                    logits.dtype)
  return tf.reduce_mean(correct, axis=1)
