"""Meta-SGD: element-wise learned inner learning rates."""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import models, training
from maml_tf.metasgd import MetaSGD
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
from tests import helpers
from tests.test_maml import meta_gradient_vs_fd, sine_batch, small_mlp


def test_learning_rates_are_element_wise_and_initialised_in_range():
  model = models.build("conv4_omniglot", num_classes=5, num_filters=4, seed=0)
  learner = MetaSGD(model, seed=3)
  adapted = [v for v, a in zip(model.trainable_variables,
                               learner.adapted_mask) if a]
  assert [tuple(a.shape) for a in learner.learning_rates] == [
      tuple(v.shape) for v in adapted]
  values = helpers.flat(learner.learning_rates)
  assert values.min() >= 0.005 and values.max() <= 0.1
  assert values.std() > 0.01  # random, not one constant per tensor
  again = MetaSGD(models.build("conv4_omniglot", num_classes=5, num_filters=4,
                               seed=0), seed=3)
  np.testing.assert_array_equal(values, helpers.flat(again.learning_rates))
  # Meta-learned with the weights, after them.
  assert learner.trainable_variables[-len(adapted):] == learner.learning_rates
  assert learner.num_inner_steps == 1


def test_inner_step_is_theta_minus_alpha_times_gradient():
  model = small_mlp()
  learner = MetaSGD(model, seed=0, use_tf_function=False)
  batch = helpers.to_tensors(sine_batch(num_tasks=1))
  with tf.GradientTape() as tape:
    params = model.tile_params(1)
    tape.watch(params)
    loss = tf.reduce_sum(learner.task_loss(
        model.forward(params, batch.support_x), batch.support_y, 4))
  grads = tape.gradient(loss, params)
  trajectory, _ = learner.adapt_batch(batch, 1)
  for v, g, a, fast in zip(model.trainable_variables, grads,
                           learner.learning_rates, trajectory[1]):
    expected = v.numpy() - a.numpy() * g.numpy()[0]
    np.testing.assert_allclose(fast.numpy()[0], expected, rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_matches_finite_differences(steps):
  """Directional derivatives over the weights AND alpha."""
  learner = MetaSGD(small_mlp("batch_norm", scale=0.5), steps, seed=0,
                    init_range=(0.02, 0.1), use_tf_function=False)
  rows = meta_gradient_vs_fd(learner, sine_batch())
  np.testing.assert_allclose(rows[:, 0], rows[:, 1], rtol=1e-5, atol=1e-8)


def test_learning_rates_get_meta_gradients_and_change(tmp_path):
  model = models.build("mlp_sinusoid", seed=0)
  learner = MetaSGD(model, seed=0, jit_compile=False)
  batch = SinusoidTasks(SinusoidConfig(num_shots=10)).batch(0, 25)
  _, grads = learner.meta_gradients(batch)
  for g in grads[-len(learner.learning_rates):]:
    assert np.abs(g.numpy()).max() > 0
  before = helpers.flat(learner.learning_rates)
  trainer = training.Trainer(learner, training.TrainConfig(
      run_dir=str(tmp_path), num_iterations=5, meta_batch_size=25, log=False,
      val_every=0, jit_compile=False))
  trainer.train(SinusoidTasks(SinusoidConfig(num_shots=10), "train"))
  after = helpers.flat(learner.learning_rates)
  assert np.abs(after - before).max() > 1e-3  # Adam moves ~1e-3 per step


def test_learning_rates_are_checkpointed(tmp_path):
  learner = MetaSGD(models.build("mlp_sinusoid", seed=0), seed=0)
  checkpoint = tf.train.Checkpoint(learner=learner)
  path = checkpoint.save(str(tmp_path / "ckpt"))
  saved = helpers.flat(learner.learning_rates)
  for a in learner.learning_rates:
    a.assign(tf.zeros_like(a))
  other = MetaSGD(models.build("mlp_sinusoid", seed=5), seed=9)
  tf.train.Checkpoint(learner=other).restore(path).assert_consumed()
  np.testing.assert_array_equal(helpers.flat(other.learning_rates), saved)


def test_eager_graph_and_xla_agree():
  batch = sine_batch(num_tasks=4, dtype=np.float32)
  results = []
  for kwargs in ({"use_tf_function": False}, {"jit_compile": False},
                 {"jit_compile": True}):
    learner = MetaSGD(models.build("mlp_sinusoid", seed=0), 2, seed=0,
                      **kwargs)
    loss, grads = learner.meta_gradients(batch)
    results.append((float(loss), helpers.flat(grads)))
  for loss, grads in results[1:]:
    assert loss == pytest.approx(results[0][0], rel=1e-5)
    np.testing.assert_allclose(grads, results[0][1], rtol=1e-3, atol=1e-6)


def test_bad_init_range_is_named():
  with pytest.raises(ValueError, match="--metasgd_init_range"):
    MetaSGD(models.build("mlp_sinusoid", seed=0), init_range=(0.1, 0.01))
