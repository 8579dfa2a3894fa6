"""Latent Embedding Optimization (Rusu et al., ICLR 2019).

Paper: https://arxiv.org/abs/1807.05960. Reference code: deepmind/leo
``model.py`` (TF1 + Sonnet 1), whose semantics this port keeps exactly:

* encoder ``dropout(x) W_e`` -> relation network (mean over all pairs of a
  task's support codes) -> ``average_codes_per_class`` -> ``possibly_sample``
  (Eq. 3-4);
* decoder ``z W_d`` -> ``possibly_sample`` of one classifier weight vector per
  support example (Eq. 5);
* ``leo_inner_loop``: ``z <- z - alpha * dL/dz`` with a learned per-latent
  ``alpha``, the loss summed over the support examples (Eq. 6);
* ``finetuning_inner_loop``: the same in parameter space, with a learned
  per-dimension step size (section 3.3);
* objective: ``mean(query CE + beta KL + gamma encoder penalty) + lambda_1 l2 +
  lambda_2 orthogonality`` (Eq. 9, as coded).

Everything is vectorised over a leading task axis T (the original maps one
task at a time), differentiated to second order with nested
``tf.GradientTape``s, and compiled by the Trainer with ``tf.function`` + XLA.
Randomness (dropout, sampling) is stateless, derived from (seed, meta-step), so
a resumed run repeats an uninterrupted one exactly. The Gaussians are
``tfp.distributions.Normal``, as in the original; their reparameterised draws
``loc + scale * eps`` take ``eps`` from Philox (see ``leo.randomness``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from leo.config import ModelConfig
from leo.randomness import StatelessRandom, dropout
from maml_tf.tasks import TaskBatch

class ProblemInstance(NamedTuple):
  """A meta-batch of tasks, class-major (deepmind/leo ``ProblemInstance``
  with a leading task axis and without the file names).

  Attributes:
    tr_input: ``[T, N, K, d]`` support embeddings.
    tr_output: ``[T, N, K]`` int32 labels.
    val_input: ``[T, N, Q, d]`` query embeddings.
    val_output: ``[T, N, Q]`` int32 labels.
  """

  tr_input: tf.Tensor
  tr_output: tf.Tensor
  val_input: tf.Tensor
  val_output: tf.Tensor


def problem_from_batch(batch: TaskBatch, num_classes: int,
                       dtype=tf.float32) -> ProblemInstance:
  """Reshapes a class-major ``TaskBatch`` (``leo.data``) into
  ``[T, N, K, d]`` / ``[T, N, Q, d]``, cast to ``dtype``."""

  def split(x, y):
    x = tf.convert_to_tensor(x)
    t, s, d = x.shape
    if s % num_classes:
      raise ValueError(f"{s} examples per task is not a multiple of "
                       f"--num_classes={num_classes}")
    shape = [t if t is not None else -1, num_classes, s // num_classes]
    return (tf.reshape(tf.cast(x, dtype), shape + [d]),
            tf.reshape(tf.cast(y, tf.int32), shape))

  return ProblemInstance(*split(batch.support_x, batch.support_y),
                         *split(batch.query_x, batch.query_y))


def orthogonality(weight: tf.Tensor) -> tf.Tensor:
  """deepmind/leo's decoder penalty (without lambda_2): ``mean((C - I)^2)``
  with ``C = W W^T / (n n^T)`` and ``n_r = ||w_r|| + 1e-32`` (rows of W)."""
  w2 = tf.matmul(weight, weight, transpose_b=True)
  wn = tf.norm(weight, ord=2, axis=1, keepdims=True) + tf.constant(
      1e-32, weight.dtype)
  correlation = w2 / tf.matmul(wn, wn, transpose_b=True)
  identity = tf.eye(int(weight.shape[0]), dtype=weight.dtype)
  # Summed as one flat axis (here and in l2_regularization): XLA:CPU splits a
  # sum over a 2-d tensor with axes longer than 32 into 32x32 reduce-window
  # kernels, which its classic emitters took 11-12 s each to compile.
  return tf.reduce_mean(tf.math.squared_difference(
      tf.reshape(correlation, [-1]), tf.reshape(identity, [-1])))


def _reduce_task_mean(x: tf.Tensor) -> tf.Tensor:
  """Mean over every axis but the task axis: ``[T, ...] -> [T]``."""
  return tf.reduce_mean(x, axis=list(range(1, len(x.shape))))


def _glorot(rng: np.random.Generator, shape) -> np.ndarray:
  limit = math.sqrt(6.0 / (shape[0] + shape[1]))
  return rng.uniform(-limit, limit, size=shape)


class LEO(tf.Module):
  """LEO as a learner of ``maml_tf.training.Trainer``.

  Args:
    config: a ``ModelConfig``.
    name: module name.

  Attributes:
    trainable_variables: the original's 7 variables, in this order:
      ``encoder/w [d, z]``, ``relation_network/mlp/linear_{0,1,2}/w
      [2z, 2z]``, ``decoder/w [z, 2d]``, ``leo_inner/lr [1, 1, z]``,
      ``finetuning/lr [1, 1, d]`` (172,736 parameters for d=640, z=64).

  Example:
    >>> leo = LEO(ModelConfig())
    >>> loss, metrics = leo.meta_loss(batch, step=0)   # under a GradientTape
    >>> leo.evaluate(batch)["query_accuracy"]          # [T], deterministic
  """

  def __init__(self, config: ModelConfig, name: str = "leo"):
    super().__init__(name=name)
    self.config = config
    self.dtype = tf.as_dtype(config.dtype)
    d, z = config.embedding_dim, config.num_latents
    rng = np.random.default_rng(config.seed)

    def weight(shape, var_name):
      return tf.Variable(_glorot(rng, shape).astype(config.dtype),
                         name=var_name)

    self.encoder_w = weight([d, z], "encoder/w")
    self.relation_ws = [weight([2 * z, 2 * z],
                               f"relation_network/mlp/linear_{i}/w")
                        for i in range(3)]
    self.decoder_w = weight([z, 2 * d], "decoder/w")
    self.inner_lr = tf.Variable(
        np.full([1, 1, z], config.inner_lr_init, config.dtype),
        name="leo_inner/lr")
    self.finetuning_lr = tf.Variable(
        np.full([1, 1, d], config.finetuning_lr_init, config.dtype),
        name="finetuning/lr")

  # ---------------------------------------------------------------- variables
  @property
  def regularized_weights(self) -> list[tf.Variable]:
    """The weights the l2 penalty covers (not the two learning rates)."""
    return [self.encoder_w, *self.relation_ws, self.decoder_w]

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    return [*self.regularized_weights, self.inner_lr, self.finetuning_lr]

  def _const(self, value: float) -> tf.Tensor:
    return tf.constant(value, self.dtype)

  # ------------------------------------------------------------------ encoder
  def encoder(self, inputs: tf.Tensor, rng: StatelessRandom) -> tf.Tensor:
    """``dropout(x) W_e``: ``[T, N, K, d] -> [T, N, K, z]``."""
    x = dropout(inputs, self.config.dropout_rate, rng)
    return tf.einsum("tnkd,dz->tnkz", x, self.encoder_w)

  def relation_network(self, codes: tf.Tensor) -> tf.Tensor:
    """The mean over j of ``MLP([h_i, h_j])`` over all ordered pairs of a
    task's N*K codes: ``[T, N, K, z] -> [T, N, K, 2z]``.

    MLP: three bias-free 2z-wide layers, ReLU between them, linear output.
    The first layer applied to the concatenation is written as
    ``h_i W0[:z] + h_j W0[z:]`` (the same function, without the pair copy).
    """
    t, n, k, z = codes.shape
    t = -1 if t is None else t
    h = tf.reshape(codes, [t, n * k, z])
    w0, w1, w2 = self.relation_ws
    left = tf.einsum("tiz,zo->tio", h, w0[:z])
    right = tf.einsum("tjz,zo->tjo", h, w0[z:])
    x = tf.nn.relu(left[:, :, None, :] + right[:, None, :, :])
    x = tf.nn.relu(tf.einsum("tijo,op->tijp", x, w1))
    x = tf.einsum("tijp,pq->tijq", x, w2)
    return tf.reshape(tf.reduce_mean(x, axis=2), [t, n, k, 2 * z])

  def average_codes_per_class(self, codes: tf.Tensor) -> tf.Tensor:
    """Mean over the K codes of each class, repeated K times (Eq. 3's
    ``1 / (N K^2)`` sum): ``[T, N, K, c] -> [T, N, K, c]``."""
    return tf.broadcast_to(tf.reduce_mean(codes, axis=2, keepdims=True),
                           tf.shape(codes))

  def possibly_sample(self, distribution_params: tf.Tensor,
                      rng: StatelessRandom, stddev_offset: float = 0.0):
    """A sample of ``N(mu, sigma)`` in meta-training, ``mu`` otherwise.

    ``mu, u = split(params)``; ``sigma = max(exp(u) - (1 - offset), 1e-10)``
    (the original's parameterisation: not a log-variance).

    Args:
      distribution_params: ``[T, ..., 2c]``.
      rng: randomness (evaluation if ``rng.training`` is False).
      stddev_offset: added to ``exp(u) - 1``.

    Returns:
      ``(samples [T, ..., c], kl [T])`` where ``kl`` is the one-sample
      Monte-Carlo ``mean(log q(s) - log N(s; 0, 1))`` over a task's elements
      (0 in evaluation).
    """
    means, unnormalized_stddev = tf.split(distribution_params, 2, axis=-1)
    if not rng.training:
      return means, tf.zeros(tf.shape(means)[:1], self.dtype)
    stddev = tf.maximum(
        tf.exp(unnormalized_stddev) - self._const(1.0 - stddev_offset),
        self._const(1e-10))
    distribution = tfp.distributions.Normal(loc=means, scale=stddev)
    # tfp's own reparameterised draw (Normal._sample_n: loc + scale * eps),
    # with a Philox eps (see leo.randomness).
    samples = means + stddev * rng.normal(tf.shape(means), self.dtype)
    return samples, self.kl_divergence(samples, distribution)

  def kl_divergence(self, samples: tf.Tensor,
                    distribution: tfp.distributions.Normal) -> tf.Tensor:
    """``mean(log q(s) - log N(s; 0, 1))`` per task: ``[T]``."""
    prior = tfp.distributions.Normal(loc=tf.zeros_like(samples),
                                     scale=tf.ones_like(samples))
    return _reduce_task_mean(distribution.log_prob(samples) -
                             prior.log_prob(samples))

  def forward_encoder(self, data: ProblemInstance, rng: StatelessRandom):
    """Support set -> latent codes ``[T, N, K, z]`` and their KL ``[T]``."""
    codes = self.relation_network(self.encoder(data.tr_input, rng))
    return self.possibly_sample(self.average_codes_per_class(codes), rng)

  # ------------------------------------------------------------------ decoder
  def decoder(self, latents: tf.Tensor) -> tf.Tensor:
    """``z W_d``: ``[T, N, K, z] -> [T, N, K, 2d]``."""
    return tf.einsum("tnkz,zo->tnko", latents, self.decoder_w)

  def forward_decoder(self, data: ProblemInstance, latents: tf.Tensor,
                      rng: StatelessRandom):
    """Latents -> ``(support loss [T, N, K], classifier weights
    [T, N, K, d])``.

    The sampling offset ``sqrt(2 / (N + d))`` makes the initial weights'
    spread Glorot-like rather than ~1.
    """
    _, n, _, d = data.tr_input.shape
    offset = math.sqrt(2.0 / (n + d))
    weights, _ = self.possibly_sample(self.decoder(latents), rng, offset)
    tr_loss, _ = self.calculate_inner_loss(data.tr_input, data.tr_output,
                                           weights, rng)
    return tr_loss, weights

  # --------------------------------------------------------------- classifier
  def predict(self, inputs: tf.Tensor, weights: tf.Tensor,
              rng: StatelessRandom) -> tf.Tensor:
    """Logits ``[T, N, Kx, N]``: ``x . mean_k w_{c,k}`` for each class c.

    The original averages the K per-example logits ``x . w_{c,k}``; averaging
    the weights first is the same function, K times cheaper. No bias.
    """
    x = dropout(inputs, self.config.dropout_rate, rng)
    return tf.einsum("tnjd,tcd->tnjc", x, tf.reduce_mean(weights, axis=2))

  def loss_fn(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy per example ``[T, N, Kx]`` (one-hot labels)."""
    one_hot = tf.one_hot(labels, int(logits.shape[-1]), dtype=logits.dtype)
    return tf.nn.softmax_cross_entropy_with_logits(labels=one_hot,
                                                   logits=logits)

  def calculate_inner_loss(self, inputs: tf.Tensor, labels: tf.Tensor,
                           weights: tf.Tensor, rng: StatelessRandom):
    """Per-example loss ``[T, N, Kx]`` and accuracy ``[T]``."""
    logits = self.predict(inputs, weights, rng)
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    accuracy = _reduce_task_mean(
        tf.cast(tf.equal(predictions, labels), self.dtype))
    return self.loss_fn(logits, labels), accuracy

  # --------------------------------------------------------------- the loops
  def leo_inner_loop(self, data: ProblemInstance, latents: tf.Tensor,
                     rng: StatelessRandom):
    """Adaptation in latent space (Eq. 6), ``inner_unroll_length`` steps.

    Each step decodes (re-sampling the weights and re-drawing dropout in
    meta-training) and moves ``z`` by the gradient of the support loss summed
    over the N*K examples. Under an outer tape the steps are differentiated
    to second order.

    Returns:
      ``(tr_loss [T, N, K], classifier_weights [T, N, K, d], tr_loss_grad,
      encoder_penalty [T])``: the last decode's support loss and weights, the
      loss's gradient with respect to those weights (where fine-tuning
      starts) and ``mean((stop_gradient(z_final) - z_0)^2)`` (0 in
      evaluation).
    """
    starting_latents = latents
    steps = self.config.inner_unroll_length
    for step in range(steps + 1):
      with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(latents)
        tr_loss, weights = self.forward_decoder(data, latents, rng)
      if step == steps:
        tr_loss_grad = tape.gradient(
            tr_loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      else:
        grad = tape.gradient(tr_loss, latents,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
        latents = latents - self.inner_lr * grad
    if rng.training:
      encoder_penalty = _reduce_task_mean(
          tf.square(starting_latents - tf.stop_gradient(latents)))
    else:
      encoder_penalty = tf.zeros(tf.shape(latents)[:1], self.dtype)
    return tr_loss, weights, tr_loss_grad, encoder_penalty

  def finetuning_inner_loop(self, data: ProblemInstance, tr_loss_grad,
                            classifier_weights: tf.Tensor,
                            rng: StatelessRandom):
    """Fine-tuning of the classifier weights (section 3.3),
    ``finetuning_unroll_length`` steps of ``w <- w - lr * dL_support/dw``
    with a learned per-dimension ``lr``, then the query loss.

    Args:
      data: the tasks.
      tr_loss_grad: gradient of the LEO loop's last support loss with respect
        to ``classifier_weights``.
      classifier_weights: ``[T, N, K, d]``.
      rng: randomness.

    Returns:
      ``(val_loss [T, N, Q], val_accuracy [T])``.
    """
    weights, grad = classifier_weights, tr_loss_grad
    for step in range(self.config.finetuning_unroll_length):
      if step:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
          tape.watch(weights)
          tr_loss, _ = self.calculate_inner_loss(data.tr_input, data.tr_output,
                                                 weights, rng)
        grad = tape.gradient(tr_loss, weights,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
      weights = weights - self.finetuning_lr * grad
    return self.calculate_inner_loss(data.val_input, data.val_output, weights,
                                     rng)

  # ----------------------------------------------------------------- penalties
  def l2_regularization(self) -> tf.Tensor:
    """``lambda_1 * sum(w^2) / 2`` over the five weights (TF1's
    ``l2_regularizer``, which keeps the 1/2; Keras' l2 does not)."""
    return self._const(self.config.l2_penalty_weight) * tf.add_n(
        [tf.nn.l2_loss(tf.reshape(w, [-1])) for w in self.regularized_weights])

  def orthogonality_regularization(self) -> tf.Tensor:
    """``lambda_2 * orthogonality(decoder/w)``."""
    return (self._const(self.config.orthogonality_penalty_weight) *
            orthogonality(tf.convert_to_tensor(self.decoder_w)))

  # ---------------------------------------------------------------- learner
  def forward(self, data: ProblemInstance, rng: StatelessRandom) -> dict:
    """The whole inner computation for every task.

    Returns:
      ``val_loss [T, N, Q]``, ``val_accuracy [T]``, ``kl [T]`` and
      ``encoder_penalty [T]``.
    """
    if data.tr_input.shape[-1] != self.config.embedding_dim:
      raise ValueError(f"embeddings of width {data.tr_input.shape[-1]}, but "
                       f"the model expects {self.config.embedding_dim}")
    latents, kl = self.forward_encoder(data, rng)
    _, weights, tr_loss_grad, encoder_penalty = self.leo_inner_loop(
        data, latents, rng)
    val_loss, val_accuracy = self.finetuning_inner_loop(data, tr_loss_grad,
                                                        weights, rng)
    return {"val_loss": val_loss, "val_accuracy": val_accuracy, "kl": kl,
            "encoder_penalty": encoder_penalty}

  def problem(self, batch: TaskBatch) -> ProblemInstance:
    return problem_from_batch(batch, self.config.num_classes, self.dtype)

  def meta_loss(self, batch: TaskBatch, step=0, training: bool = True):
    """The meta-training objective (deepmind/leo ``LEO._build``).

    Args:
      batch: class-major ``TaskBatch`` (``leo.data``), T tasks.
      step: the meta-step (seeds dropout and sampling).
      training: meta-training mode (dropout, sampling, KL, encoder penalty).

    Returns:
      ``(loss, metrics)``: ``loss = mean_T(mean(query CE) + beta KL + gamma
      encoder_penalty) + l2 + orthogonality``; scalar metrics.
    """
    c = self.config
    rng = StatelessRandom(c.seed if training else None, step)
    out = self.forward(self.problem(batch), rng)
    query_loss = _reduce_task_mean(out["val_loss"])
    task_objective = (query_loss + self._const(c.kl_weight) * out["kl"] +
                      self._const(c.encoder_penalty_weight) *
                      out["encoder_penalty"])
    l2 = self.l2_regularization()
    orth = self.orthogonality_regularization()
    loss = tf.reduce_mean(task_objective) + l2 + orth
    metrics = {"query_loss": tf.reduce_mean(query_loss),
               "query_accuracy": tf.reduce_mean(out["val_accuracy"]),
               "kl": tf.reduce_mean(out["kl"]),
               "encoder_penalty": tf.reduce_mean(out["encoder_penalty"]),
               "l2_penalty": l2, "orthogonality_penalty": orth}
    return loss, metrics

  def evaluate(self, batch: TaskBatch) -> dict:
    """Deterministic evaluation (means, no dropout): ``query_accuracy`` and
    ``query_loss`` (mean cross-entropy), each ``[T]``."""
    out = self.forward(self.problem(batch), StatelessRandom(None))
    return {"query_accuracy": out["val_accuracy"],
            "query_loss": _reduce_task_mean(out["val_loss"])}

  def fallback_gradients(self) -> list[tf.Tensor]:
    """What to apply when the loss or a gradient is not finite.

    deepmind/leo intends the gradients of ``1e-4 / lambda_1 * l2`` (a pull
    towards 0 of the five weights, ``1e-4 * w``) and zeros for the learning
    rates; its ``zip`` swaps gradients and variables, so it applies the
    variable values themselves. This is the intended version.
    """
    return ([self._const(1e-4) * w for w in self.regularized_weights] +
            [tf.zeros_like(self.inner_lr), tf.zeros_like(self.finetuning_lr)])
