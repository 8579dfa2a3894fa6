"""LEO's model, in the spirit of deepmind/leo's model_test.py: hand-computed
inner loops, train/eval behaviour, the original's variables, the penalties'
formulas and second-order meta-gradients against finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from leo.config import ModelConfig
from leo.model import LEO, ProblemInstance, orthogonality, problem_from_batch
from leo.randomness import StatelessRandom, dropout
from maml_tf.tasks import TaskBatch
from tests import helpers

EVAL = StatelessRandom(None)


def tiny_config(**kwargs):
  """deepmind/leo's get_test_config, shrunk to a 6-d embedding."""
  defaults = dict(inner_unroll_length=3, finetuning_unroll_length=4,
                  inner_lr_init=0.1, finetuning_lr_init=0.2, num_latents=2,
                  dropout_rate=0.3, kl_weight=0.01, encoder_penalty_weight=0.01,
                  l2_penalty_weight=0.01, orthogonality_penalty_weight=0.01,
                  num_classes=3, embedding_dim=6, dtype="float64", seed=1)
  defaults.update(kwargs)
  return ModelConfig(**defaults)


def class_major_batch(tasks, ways, shots, queries, dim, seed=0,
                      dtype=np.float64):
  """L2-normalised random tasks in LEO's class-major layout."""
  rng = np.random.default_rng(seed)

  def part(count):
    x = rng.normal(size=(tasks, ways * count, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.repeat(np.arange(ways), count)[None].repeat(tasks, 0)
    return x.astype(dtype), y.astype(np.int32)

  return TaskBatch(*part(shots), *part(queries))


class IdentityLEO(LEO):
  """deepmind/leo's ``mockify_everything``: encoder, relation network,
  decoder, averaging, sampling and loss are identities; predict is
  ``x * w^2``."""

  def decoder(self, latents):
    return latents

  def possibly_sample(self, distribution_params, rng, stddev_offset=0.0):
    return distribution_params, tf.zeros([1], self.dtype)

  def predict(self, inputs, weights, rng):
    return inputs * weights**2

  def loss_fn(self, logits, labels):
    return logits


def scalar_problem(x):
  value = tf.constant([[[[x]]]], tf.float64)
  label = tf.zeros([1, 1, 1], tf.int32)
  return ProblemInstance(value, label, value, label)


def test_inner_loop_by_hand():
  leo = IdentityLEO(tiny_config(num_latents=1, embedding_dim=1,
                                num_classes=1))
  data = scalar_problem(4.0)
  # loss = x z^2 with x = 4, so dL/dz = 8 z and z <- z - 0.1 * 8 z = 0.2 z:
  # 4 -> 0.8 -> 0.16 -> 0.032 (model_test.test_inner_loop_adaptation).
  latents = tf.constant([[[[4.0]]]], tf.float64)
  loss, weights, grad, penalty = leo.leo_inner_loop(data, latents, EVAL)
  np.testing.assert_allclose(weights.numpy(), 0.032)
  np.testing.assert_allclose(loss.numpy(), 4 * 0.032**2)
  np.testing.assert_allclose(grad.numpy(), 8 * 0.032)
  np.testing.assert_array_equal(penalty.numpy(), 0.0)
  # Fine-tuning, lr 0.2: w <- w - 0.2 * 8 w = -0.6 w, four times.
  val_loss, _ = leo.finetuning_inner_loop(data, grad, weights, EVAL)
  np.testing.assert_allclose(val_loss.numpy(), 4 * (0.032 * 0.6**4)**2)


def test_inner_loop_gradient_is_of_the_sum_over_examples():
  leo = IdentityLEO(tiny_config(num_latents=1, embedding_dim=1,
                                num_classes=1, inner_unroll_length=1))
  x = tf.constant([[[[1.0], [3.0]]]], tf.float64)  # one class, K = 2
  data = ProblemInstance(x, tf.zeros([1, 1, 2], tf.int32), x,
                         tf.zeros([1, 1, 2], tf.int32))
  latents = tf.constant([[[[1.0], [1.0]]]], tf.float64)
  _, weights, _, _ = leo.leo_inner_loop(data, latents, EVAL)
  # Per-example losses x_i z_i^2 (the identity encoder keeps z per example):
  # each z_i moves by 0.1 * 2 x_i z_i; a mean would divide by 2.
  np.testing.assert_allclose(weights.numpy().ravel(), [0.8, 0.4])


def test_variables_as_in_the_original():
  leo = LEO(ModelConfig())
  shapes = {v.name.split(":")[0]: tuple(v.shape)
            for v in leo.trainable_variables}
  assert shapes == {
      "encoder/w": (640, 64),
      "relation_network/mlp/linear_0/w": (128, 128),
      "relation_network/mlp/linear_1/w": (128, 128),
      "relation_network/mlp/linear_2/w": (128, 128),
      "decoder/w": (64, 1280),
      "leo_inner/lr": (1, 1, 64),
      "finetuning/lr": (1, 1, 640),
  }
  assert sum(int(np.prod(s)) for s in shapes.values()) == 172_736
  assert len(leo.trainable_variables) == 7
  np.testing.assert_array_equal(leo.inner_lr.numpy(), 1.0)
  np.testing.assert_array_equal(leo.finetuning_lr.numpy(), np.float32(0.001))
  # Glorot uniform: |w| <= sqrt(6 / (fan_in + fan_out)).
  assert np.abs(leo.decoder_w.numpy()).max() <= np.sqrt(6 / (64 + 1280))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float32_and_float64_builds(dtype):
  leo = LEO(tiny_config(dtype=dtype))
  batch = class_major_batch(2, 3, 2, 4, 6, dtype=np.float32)
  with tf.GradientTape() as tape:
    loss, metrics = leo.meta_loss(batch, 0)
  grads = tape.gradient(loss, leo.trainable_variables)
  assert loss.dtype == tf.as_dtype(dtype)
  assert all(v.dtype == tf.as_dtype(dtype) for v in leo.trainable_variables)
  assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
  assert all(np.abs(g.numpy()).max() > 0 for g in grads)
  assert set(metrics) == {"query_loss", "query_accuracy", "kl",
                          "encoder_penalty", "l2_penalty",
                          "orthogonality_penalty"}


def test_training_is_stochastic_and_evaluation_deterministic():
  leo = LEO(tiny_config())
  data = leo.problem(class_major_batch(2, 3, 2, 4, 6))
  params = tf.random.stateless_normal([2, 3, 2, 8], [0, 1], dtype=tf.float64)

  def sample(seed, step):
    return leo.possibly_sample(params, StatelessRandom(seed, step))

  train1, kl1 = sample(0, 5)
  train2, kl2 = sample(0, 6)
  again, _ = sample(0, 5)
  assert np.abs(train1.numpy() - train2.numpy()).sum() > 1.0
  np.testing.assert_array_equal(train1.numpy(), again.numpy())  # stateless
  assert np.all(kl1.numpy() != 0) and np.all(kl2.numpy() != 0)
  test1, test_kl = leo.possibly_sample(params, EVAL)
  np.testing.assert_array_equal(test1.numpy(), params.numpy()[..., :4])
  np.testing.assert_array_equal(test_kl.numpy(), 0.0)

  latents, _ = leo.forward_encoder(data, StatelessRandom(0, 1))
  _, _, _, train_penalty = leo.leo_inner_loop(data, latents,
                                              StatelessRandom(0, 1))
  _, _, _, test_penalty = leo.leo_inner_loop(data, latents, EVAL)
  assert np.all(train_penalty.numpy() > 1e-3)
  np.testing.assert_array_equal(test_penalty.numpy(), 0.0)

  batch = class_major_batch(2, 3, 2, 4, 6)
  first, second = leo.evaluate(batch), leo.evaluate(batch)
  for k in first:
    np.testing.assert_array_equal(first[k].numpy(), second[k].numpy())
  loss_a, _ = leo.meta_loss(batch, 3)
  loss_b, _ = leo.meta_loss(batch, 3)
  loss_c, _ = leo.meta_loss(batch, 4)
  assert float(loss_a) == float(loss_b) != float(loss_c)


def test_sampling_formula_and_kl():
  leo = LEO(tiny_config())
  params = tf.random.stateless_normal([2, 3, 2, 8], [3, 4], dtype=tf.float64)
  offset = 0.3
  samples, kl = leo.possibly_sample(params, StatelessRandom(0, 2), offset)
  mu, u = np.split(params.numpy(), 2, axis=-1)
  sigma = np.maximum(np.exp(u) - (1 - offset), 1e-10)
  s = samples.numpy()
  log_q = -0.5 * ((s - mu) / sigma)**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
  log_p = -0.5 * s**2 - 0.5 * np.log(2 * np.pi)
  # (rtol: where sigma is floored at 1e-10, s - mu loses digits.)
  np.testing.assert_allclose(kl.numpy(), (log_q - log_p).mean(axis=(1, 2, 3)),
                             rtol=1e-6)
  # Many draws: the sample standard deviation is sigma.
  big = tf.broadcast_to(params[:1, :1, :1], [1, 200, 200, 8])
  draws, _ = leo.possibly_sample(big, StatelessRandom(0, 3), offset)
  np.testing.assert_allclose(draws.numpy().std(axis=(0, 1, 2)),
                             sigma[0, 0, 0], rtol=0.02)


def test_dropout_is_inverted_and_stateless():
  x = tf.ones([200, 500], tf.float32)
  y = dropout(x, 0.3, StatelessRandom(0, 1)).numpy()
  assert abs((y == 0).mean() - 0.3) < 0.01
  np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(
      y, dropout(x, 0.3, StatelessRandom(0, 1)).numpy())
  assert dropout(x, 0.3, EVAL) is x


def test_stages_match_the_original_formulas():
  leo = LEO(tiny_config())
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(2, 3, 2, 2))
  # Relation network: mean over j of MLP(concat(h_i, h_j)) on all NK pairs.
  h = codes.reshape(2, 6, 2)
  pairs = np.concatenate([np.repeat(h[:, :, None], 6, axis=2),
                          np.repeat(h[:, None, :], 6, axis=1)], axis=-1)
  w0, w1, w2 = (w.numpy() for w in leo.relation_ws)
  out = np.maximum(np.maximum(pairs @ w0, 0) @ w1, 0) @ w2
  expected = out.mean(axis=2).reshape(2, 3, 2, 4)
  np.testing.assert_allclose(leo.relation_network(tf.constant(codes)).numpy(),
                             expected, rtol=1e-10)
  # Classifier: mean over k of x . w_{c,k} (the original's einsum).
  x, w = rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(2, 3, 2, 6))
  original = np.einsum("tijk,tlmk->tijlm", x, w).mean(axis=-1)
  np.testing.assert_allclose(
      leo.predict(tf.constant(x), tf.constant(w), EVAL).numpy(), original,
      rtol=1e-10)


def test_penalties_against_their_formulas():
  leo = LEO(tiny_config(l2_penalty_weight=0.5,
                        orthogonality_penalty_weight=0.25))
  weights = [w.numpy() for w in leo.regularized_weights]
  np.testing.assert_allclose(leo.l2_regularization().numpy(),
                             0.5 * sum((w**2).sum() / 2 for w in weights))
  w = np.array([[1.0, 0.0, 1.0], [2.0, 2.0, 0.0]])
  c = (w @ w.T) / np.outer(np.linalg.norm(w, axis=1),
                           np.linalg.norm(w, axis=1))
  np.testing.assert_allclose(c[0, 1], 0.5)
  np.testing.assert_allclose(orthogonality(tf.constant(w)).numpy(),
                             ((c - np.eye(2))**2).mean())
  d = leo.decoder_w.numpy()
  n = np.linalg.norm(d, axis=1) + 1e-32
  c = (d @ d.T) / np.outer(n, n)
  np.testing.assert_allclose(leo.orthogonality_regularization().numpy(),
                             0.25 * ((c - np.eye(len(d)))**2).mean())


def test_loss_adds_weighted_terms():
  leo = LEO(tiny_config(kl_weight=0.5, encoder_penalty_weight=2.0))
  loss, m = leo.meta_loss(class_major_batch(2, 3, 2, 4, 6), 7)
  expected = (m["query_loss"] + 0.5 * m["kl"] + 2.0 * m["encoder_penalty"] +
              m["l2_penalty"] + m["orthogonality_penalty"])
  np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-12)


def test_fallback_gradients_are_the_l2_pull_not_the_variables():
  leo = LEO(tiny_config(l2_penalty_weight=0.01))
  with tf.GradientTape() as tape:
    penalty = 1e-4 / 0.01 * leo.l2_regularization()
  expected = tape.gradient(penalty, leo.trainable_variables,
                           unconnected_gradients="zero")
  fallback = leo.fallback_gradients()
  assert len(fallback) == 7
  for e, f in zip(expected, fallback):
    np.testing.assert_allclose(f.numpy(), e.numpy(), rtol=1e-12)
  np.testing.assert_array_equal(fallback[-1].numpy(), 0.0)
  np.testing.assert_array_equal(fallback[-2].numpy(), 0.0)


def test_fine_tuning_lowers_the_support_loss():
  leo = LEO(tiny_config(finetuning_lr_init=0.5))
  batch = class_major_batch(3, 3, 2, 2, 6, seed=4)
  data = leo.problem(batch)
  same = ProblemInstance(data.tr_input, data.tr_output, data.tr_input,
                         data.tr_output)
  latents, _ = leo.forward_encoder(same, EVAL)
  tr_loss, weights, grad, _ = leo.leo_inner_loop(same, latents, EVAL)
  tuned_loss, _ = leo.finetuning_inner_loop(same, grad, weights, EVAL)
  before = tr_loss.numpy().mean(axis=(1, 2))
  after = tuned_loss.numpy().mean(axis=(1, 2))
  assert np.all(after < before - 1e-3), (before, after)


def test_every_variable_gets_a_gradient():
  # (The original's test_gradients_dont_flow_through_input asks for the
  # gradient of the inputs with respect to the latents, which no graph can
  # give; it cannot fail, so it is not ported.)
  leo = LEO(tiny_config())
  batch = helpers.to_tensors(class_major_batch(2, 3, 2, 4, 6))
  with tf.GradientTape() as tape:
    loss, _ = leo.meta_loss(batch, 0)
  grads = tape.gradient(loss, leo.trainable_variables)
  assert all(np.abs(g.numpy()).max() > 0 for g in grads)


def test_bad_shapes_are_reported():
  leo = LEO(tiny_config())
  with pytest.raises(ValueError, match="not a multiple of --num_classes=3"):
    leo.meta_loss(class_major_batch(1, 2, 2, 2, 6), 0)
  with pytest.raises(ValueError, match="width 5, but the model expects 6"):
    leo.evaluate(class_major_batch(1, 3, 1, 1, 5))


def test_second_order_meta_gradient_matches_finite_differences():
  # Training mode: dropout and sampling are fixed by (seed, step), so the
  # meta-loss is a deterministic function of the variables. The encoder
  # penalty is off here: its stop_gradient makes its gradient differ from the
  # derivative of its value on purpose (tested below).
  leo = LEO(tiny_config(dropout_rate=0.2, encoder_penalty_weight=0.0))
  batch = helpers.to_tensors(class_major_batch(2, 3, 2, 2, 6, seed=2))
  variables = leo.trainable_variables
  with tf.GradientTape() as tape:
    loss, _ = leo.meta_loss(batch, 11)
  grads = helpers.flat(tape.gradient(loss, variables))
  rng = np.random.default_rng(0)
  for _ in range(3):
    direction = rng.normal(size=grads.shape)
    fd = helpers.directional_fd(lambda: leo.meta_loss(batch, 11)[0],
                                variables, direction, 1e-6)
    np.testing.assert_allclose(grads @ direction, fd, rtol=1e-6)


def test_encoder_penalty_gradient_stops_at_the_adapted_latents():
  # mean((z_0 - stop_gradient(z_U))^2): the inner lr and the decoder only
  # move z_U, so the penalty gives them no gradient; the encoder moves z_0.
  leo = LEO(tiny_config())
  data = leo.problem(class_major_batch(2, 3, 2, 2, 6, seed=2))
  with tf.GradientTape() as tape:
    rng = StatelessRandom(0, 3)
    latents, _ = leo.forward_encoder(data, rng)
    penalty = tf.reduce_sum(leo.leo_inner_loop(data, latents, rng)[3])
  assert float(penalty) > 1e-3
  grads = tape.gradient(penalty, [leo.encoder_w, leo.decoder_w, leo.inner_lr])
  assert np.abs(grads[0].numpy()).max() > 0
  assert grads[1] is None and grads[2] is None


def test_eager_graph_and_xla_agree():
  # The same stateless seeds give the same draws eagerly and in a graph;
  # XLA's Philox lays out its stream differently, so with XLA the comparison
  # is in evaluation mode (deterministic, still differentiated through both
  # inner loops).
  leo = LEO(tiny_config(dtype="float32", dropout_rate=0.2,
                        inner_unroll_length=2, finetuning_unroll_length=2))
  batch = helpers.to_tensors(class_major_batch(2, 3, 2, 3, 6,
                                               dtype=np.float32))

  def step(b, s, training):
    with tf.GradientTape() as tape:
      loss, _ = leo.meta_loss(b, s, training)
    return [loss] + tape.gradient(loss, leo.trainable_variables)

  s = tf.constant(5, tf.int64)
  for training, jit in ((True, False), (False, False), (False, True)):
    eager = step(batch, s, training)
    compiled = tf.function(lambda b, t: step(b, t, training),
                           jit_compile=jit)(batch, s)
    for a, b in zip(eager, compiled):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=1e-6)


def test_problem_from_batch_is_class_major():
  batch = class_major_batch(2, 3, 2, 4, 6)
  data = problem_from_batch(batch, 3, tf.float32)
  assert data.tr_input.shape == (2, 3, 2, 6)
  assert data.val_input.shape == (2, 3, 4, 6)
  np.testing.assert_array_equal(data.tr_output.numpy()[0],
                                [[0, 0], [1, 1], [2, 2]])
