"""MAML's inner loop and meta-gradients."""

import numpy as np
import pytest
import tensorflow as tf

import maml_tf
from maml_tf import losses, models
from maml_tf.maml import MAML, inner_update
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
from maml_tf.tasks import TaskBatch
from tests import helpers


def sine_batch(num_tasks=3, shots=4, dtype=np.float64, seed=0):
  batch = SinusoidTasks(SinusoidConfig(num_shots=shots, seed=seed)).batch(
      0, num_tasks)
  return TaskBatch(*(t.astype(dtype) for t in batch))


def small_mlp(norm="None", scale=None):
  """A float64 MLP. With ``scale``, weights and biases are redrawn from
  N(0, scale^2) so that pre-activations sit far from the ReLU kinks (at the
  original 0.01-std init, finite differences cross kinks)."""
  model = models.build("mlp_sinusoid", hidden=(6, 5), norm=norm, seed=1,
                       dtype="float64")
  if scale:
    rng = np.random.default_rng(7)
    for v in model.trainable_variables:
      v.assign(rng.normal(scale=scale, size=v.shape))
  return model


def small_conv():
  return models.build("conv4_omniglot", num_classes=3, num_filters=3,
                      image_shape=(8, 8, 1), seed=2, dtype="float64")


def meta_gradient_vs_fd(learner, batch, directions=4, eps=1e-6, seed=0):
  variables = learner.trainable_variables
  _, grads = learner.meta_gradients(batch)
  g = helpers.flat(grads)
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(directions):
    d = rng.normal(size=g.shape)
    fd = helpers.directional_fd(lambda: learner.meta_loss(batch)[0],
                                variables, d, eps)
    rows.append((float(g @ d), fd))
  return np.array(rows)


@pytest.mark.parametrize("norm", ["None", "batch_norm"])
def test_second_order_meta_gradient_matches_finite_differences_mlp(norm):
  learner = MAML(small_mlp(norm, scale=0.5), inner_lr=0.1, num_inner_steps=2,
                 use_tf_function=False)
  rows = meta_gradient_vs_fd(learner, sine_batch())
  np.testing.assert_allclose(rows[:, 0], rows[:, 1], rtol=1e-5, atol=1e-8)


def test_second_order_meta_gradient_matches_finite_differences_conv_bn():
  learner = MAML(small_conv(), inner_lr=0.4, num_inner_steps=2,
                 use_tf_function=False)
  batch = helpers.classification_batch(2, 3, 1, 2, (8, 8, 1), seed=5,
                                       dtype=np.float64)
  rows = meta_gradient_vs_fd(learner, batch)
  np.testing.assert_allclose(rows[:, 0], rows[:, 1], rtol=1e-5, atol=1e-8)
  # The check can fail: first-order gradients are far from the true ones.
  fo = MAML(learner.model, 0.4, 2, first_order=True, use_tf_function=False)
  _, g_fo = fo.meta_gradients(batch)
  _, g_so = learner.meta_gradients(batch)
  rel = (np.linalg.norm(helpers.flat(g_fo) - helpers.flat(g_so)) /
         np.linalg.norm(helpers.flat(g_so)))
  assert rel > 1e-2


def test_first_order_equals_gradient_with_stopped_inner_gradient():
  """Reference: compute the inner gradient as a constant, then differentiate
  the query loss through theta' = theta - alpha * const."""
  model = small_mlp()
  batch = sine_batch()
  alpha = 0.3
  learner = MAML(model, alpha, 1, first_order=True, use_tf_function=False)
  _, grads = learner.meta_gradients(batch)

  variables = model.trainable_variables
  reference = [np.zeros(v.shape) for v in variables]
  for t in range(batch.num_tasks):
    task = batch.task(t)
    with tf.GradientTape() as tape:
      params = model.tile_params(1)
      loss = tf.reduce_sum(losses.mse(model.forward(params, task.support_x),
                                      task.support_y))
    const = [tf.constant(g.numpy()) for g in tape.gradient(loss, params)]
    with tf.GradientTape() as tape:
      fast = [p - alpha * c for p, c in zip(model.tile_params(1), const)]
      q = tf.reduce_sum(losses.mse(model.forward(fast, task.query_x),
                                   task.query_y))
    for r, g in zip(reference, tape.gradient(q, variables)):
      r += g.numpy() / batch.num_tasks
  for g, r in zip(grads, reference):
    np.testing.assert_allclose(g.numpy(), r, rtol=1e-10, atol=1e-12)


def test_inner_update_hand_computed():
  params = [tf.constant([[1.0, 2.0]]), tf.constant([[3.0]])]
  grads = [tf.constant([[0.5, -1.0]]), None]
  out = inner_update(params, grads, [0.1, None])
  np.testing.assert_allclose(out[0].numpy(), [[0.95, 2.1]])
  assert out[1] is params[1]


@pytest.mark.parametrize("shape", [[32, 3, 3, 64, 64], [32, 64]])
def test_a_learned_scalar_rate_gets_its_gradient_from_a_flat_sum(shape):
  # MAML++'s per-layer rates: d/d lr of sum(c * (p - lr * g)) = -sum(c * g),
  # summed over one flat axis, not as XLA:CPU's multi-axis reduce-windows
  # (which took its classic emitters 1-4 s each to compile).
  p, g, c = (tf.random.stateless_normal(shape, seed=[i, 7]) for i in range(3))
  lr = tf.constant(0.1)

  @tf.function(jit_compile=True)
  def rate_gradient(lr, p, g, c):
    with tf.GradientTape() as tape:
      tape.watch(lr)
      loss = tf.reduce_sum(c * inner_update([p], [g], [lr])[0])
    return tape.gradient(loss, lr)

  hlo = rate_gradient.experimental_get_compiler_ir(lr, p, g, c)(
      stage="optimized_hlo")
  assert not helpers.windowed_reductions(hlo)
  want = -np.sum(c.numpy().astype(np.float64) * g.numpy())
  np.testing.assert_allclose(rate_gradient(lr, p, g, c).numpy(), want,
                             rtol=1e-4)
  np.testing.assert_allclose(inner_update([p], [g], [lr])[0].numpy(),
                             (p - 0.1 * g).numpy(), rtol=1e-6)


def test_one_inner_step_lowers_support_loss():
  model = models.build("conv4_omniglot", num_classes=5, num_filters=8, seed=0)
  learner = MAML(model, 0.01, 1, use_tf_function=False)
  batch = helpers.classification_batch(4, 5, 1, 1, (28, 28, 1), seed=1)
  before = learner.evaluate(batch, num_steps=0)["support_loss"].numpy()
  fast_batch = TaskBatch(batch.support_x, batch.support_y, batch.support_x,
                         batch.support_y)
  after = learner.evaluate(fast_batch, num_steps=1)["query_loss"].numpy()[:, 1]
  assert np.all(after < before)


def test_tasks_are_independent_in_a_vectorised_batch():
  """Task i's result must not depend on the other tasks of its meta-batch
  (per-task batch norm, per-task gradients)."""
  model = models.build("conv4_omniglot", num_classes=5, num_filters=8, seed=0)
  learner = MAML(model, 0.4, 2, use_tf_function=False)
  batch = helpers.classification_batch(3, 5, 1, 2, (28, 28, 1), seed=2)
  together = learner.evaluate(batch, num_steps=2)["query_loss"].numpy()
  for t in range(3):
    alone = learner.evaluate(batch.task(t), num_steps=2)["query_loss"].numpy()
    np.testing.assert_allclose(together[t], alone[0], rtol=2e-5)


def test_eager_graph_and_xla_agree():
  batch = helpers.classification_batch(4, 5, 1, 1, (28, 28, 1), seed=3)
  results = []
  for kwargs in ({"use_tf_function": False}, {"jit_compile": False},
                 {"jit_compile": True}):
    model = models.build("conv4_omniglot", num_classes=5, num_filters=8,
                         seed=0)
    learner = MAML(model, 0.4, 1, **kwargs)
    loss, grads = learner.meta_gradients(batch)
    results.append((float(loss), helpers.flat(grads)))
  for loss, grads in results[1:]:
    assert loss == pytest.approx(results[0][0], rel=1e-5)
    np.testing.assert_allclose(grads, results[0][1], rtol=1e-3, atol=1e-5)


def test_adapt_and_predict_match_evaluate():
  model = models.build("mlp_sinusoid", seed=0)
  learner = maml_tf.MAML(model, inner_lr=0.01, num_inner_steps=1)
  batch = sine_batch(num_tasks=1, dtype=np.float32)
  fast = learner.adapt(batch.support_x[0], batch.support_y[0], num_steps=3)
  assert [tuple(f.shape) for f in fast] == [tuple(v.shape) for v in
                                            model.trainable_variables]
  out = learner.adapt_and_predict(batch.support_x[0], batch.support_y[0],
                                  batch.query_x[0], num_steps=3)
  mse = float(np.mean((out.numpy() - batch.query_y[0])**2))
  ref = learner.evaluate(batch, num_steps=3)["query_loss"].numpy()[0, 3]
  assert mse == pytest.approx(float(ref), rel=1e-4)
  direct = model.forward([f[None] for f in fast], batch.query_x[:1])[0]
  np.testing.assert_allclose(direct.numpy(), out.numpy(), rtol=1e-5)
  # The outputs an ensemble averages are the last step's.
  results = learner.evaluate(batch, num_steps=3, return_outputs=True)
  np.testing.assert_allclose(results["query_outputs"].numpy()[0], out.numpy(),
                             rtol=1e-5)
  np.testing.assert_array_equal(results["query_y"], batch.query_y)


def test_meta_gradients_aligned_with_model_variables():
  model = models.build("mlp_sinusoid", seed=0)
  learner = maml_tf.MAML(model, 0.01, 1)
  loss, grads = learner.meta_gradients(sine_batch(dtype=np.float32))
  assert len(grads) == len(model.trainable_variables)
  for g, v in zip(grads, model.trainable_variables):
    assert g.shape == v.shape
  assert all(np.abs(g.numpy()).sum() > 0 for g in grads)
  assert np.isfinite(float(loss))


def test_norm_offsets_are_meta_learned_but_not_adapted():
  model = models.build("conv4_omniglot", num_classes=5, num_filters=8, seed=0)
  learner = MAML(model, 0.4, 1, use_tf_function=False)
  batch = helpers.classification_batch(2, 5, 1, 1, (28, 28, 1), seed=4)
  trajectory, _ = learner.adapt_batch(helpers.to_tensors(batch), 1)
  for role, before, after in zip(model.param_roles, trajectory[0],
                                 trajectory[1]):
    changed = not np.allclose(before.numpy(), after.numpy())
    assert changed == (role != "norm"), role
  _, grads = learner.meta_gradients(batch)
  for role, g in zip(model.param_roles, grads):
    if role == "norm":
      assert np.abs(g.numpy()).sum() > 0


def test_classification_loss_scaling_is_sum_over_k():
  logits = tf.constant(np.random.default_rng(0).normal(size=(1, 10, 5)))
  labels = tf.constant(np.tile(np.arange(5), 2)[None])
  ce = losses.cross_entropy(logits, labels).numpy()
  np.testing.assert_allclose(
      losses.scaled_cross_entropy(logits, labels, shots=2).numpy(),
      [ce.sum() / 2])
