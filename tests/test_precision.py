"""float16 loss scaling: exact meta-gradients, recovered underflow, policy."""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import models, precision, training
from maml_tf.maml import MAML
from maml_tf.mamlpp import MAMLPlusPlus
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
from maml_tf.tasks import TaskBatch


def _sine_batch(num_tasks=4, dtype=np.float64):
  batch = SinusoidTasks(SinusoidConfig(num_shots=10), "train").batch(0,
                                                                     num_tasks)
  return TaskBatch(batch.support_x.astype(dtype), batch.support_y.astype(dtype),
                   batch.query_x.astype(dtype), batch.query_y.astype(dtype))


def _image_batch(num_tasks=3, dtype=np.float64):
  rng = np.random.default_rng(0)
  x = rng.random((2, num_tasks, 5, 28, 28, 1)).astype(dtype)
  y = np.tile(np.arange(5, dtype=np.int32), (num_tasks, 1))
  return TaskBatch(x[0], y, x[1], y)


@pytest.mark.parametrize("name,kwargs,batch,lr,jit", [
    ("mlp_sinusoid", {}, _sine_batch, 0.01, True),
    # A graph, not XLA: XLA takes 20 s per float64 conv4 program here.
    ("conv4_omniglot", {"num_filters": 8, "num_classes": 5}, _image_batch, 0.4,
     False),
])
def test_scaling_leaves_second_order_meta_gradients_unchanged(name, kwargs,
                                                              batch, lr, jit):
  """With float64 variables and float32 layers, a power-of-two scale must not
  change any value: the meta-gradient through two inner steps is the same
  with and without it, eagerly and compiled (XLA for the MLP). (A scale that
  leaked into the second-order term would be off by a factor of 1024.)"""
  data = batch()

  def meta_gradients(scale, first_order=False, **options):
    model = models.build(name, seed=0, dtype="float64",
                         compute_dtype="float32", loss_scale=scale, **kwargs)
    learner = MAML(model, lr, 2, first_order=first_order, **options)
    return [g.numpy() for g in learner.meta_gradients(data)[1]]

  for options in ({"use_tf_function": False}, {"jit_compile": jit}):
    plain = meta_gradients(None, **options)
    scaled = meta_gradients(2.0 ** 10, **options)
    for a, b in zip(plain, scaled):
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12)
  # The second-order term is a sizeable part of the meta-gradient here.
  first = meta_gradients(None, first_order=True, use_tf_function=False)
  assert max(np.abs(a - f).max() / np.abs(a).max()
             for a, f in zip(plain, first)) > 0.05


def test_scaling_recovers_float16_gradients_that_underflow():
  """A loss of order 1e-5 through the sinusoid MLP (weights of order 0.01)
  has float16 gradients below the smallest subnormal: without scaling almost
  all of them flush to zero; scaled by 2^15 none does, and each matches the
  float32 network's to float16 precision."""
  x = np.random.default_rng(0).normal(size=(1, 10, 1)).astype(np.float32)

  def grads(**kwargs):
    model = models.build("mlp_sinusoid", seed=0, **kwargs)
    params = model.tile_params(1)
    with tf.GradientTape() as tape:
      tape.watch(params)
      loss = 1e-5 * tf.reduce_sum(model.forward(params, x))
    return np.concatenate([g.numpy().ravel() for g in
                           tape.gradient(loss, params)])

  exact = grads()
  unscaled = grads(compute_dtype="float16")
  scaled = grads(compute_dtype="float16", loss_scale=2.0 ** 15)
  nonzero = exact != 0
  assert (unscaled[nonzero] == 0).mean() > 0.9
  assert not (scaled[nonzero] == 0).any()
  error = np.abs(scaled - exact)[nonzero] / np.abs(exact)[nonzero]
  assert np.median(error) < 2e-3


def test_dynamic_policy_halves_on_overflow_and_grows_after_interval():
  scale = precision.LossScale(precision.DYNAMIC, growth_interval=3)
  assert float(scale.scale.numpy()) == 2.0 ** 15
  scale.update(tf.constant(False))
  assert float(scale.scale.numpy()) == 2.0 ** 14
  for expected in (2.0 ** 14, 2.0 ** 14, 2.0 ** 15, 2.0 ** 15):
    scale.update(tf.constant(True))
    assert float(scale.scale.numpy()) == expected
  scale.scale.assign(1.0)
  scale.update(tf.constant(False))
  assert float(scale.scale.numpy()) == 1.0  # never below 1
  fixed = precision.LossScale(256.0)
  fixed.update(tf.constant(False))
  assert float(fixed.scale.numpy()) == 256.0


@pytest.mark.parametrize("value,message", [
    ("3", "power of two"), ("0.5", "power of two"), ("inf", "power of two"),
    ("dynmic", "'dynmic'")])
def test_bad_loss_scale_is_named(value, message):
  with pytest.raises(ValueError, match=message):
    precision.parse_loss_scale(value)
  assert precision.parse_loss_scale("1") is None
  assert precision.parse_loss_scale("1024") == 1024.0


def test_loss_scale_needs_low_precision_layers():
  with pytest.raises(ValueError, match="--precision=float16"):
    models.build("mlp_sinusoid", loss_scale="dynamic")


def test_overflowing_step_is_skipped_and_the_scale_halved(tmp_path):
  """A scale so large that the float16 gradients overflow: the step is
  skipped (weights unchanged), counted, and the scale halves; the scale is
  reported and checkpointed with the model."""
  model = models.build("mlp_sinusoid", seed=0, compute_dtype="float16",
                       loss_scale=precision.DYNAMIC)
  learner = MAML(model, 0.01, 1, jit_compile=True)
  model.loss_scale.scale.assign(2.0 ** 40)  # overflows float16 (max 65504)
  trainer = training.Trainer(learner, training.TrainConfig(
      run_dir=str(tmp_path), num_iterations=1, meta_batch_size=5,
      steps_per_call=1, log_every=1, print_every=1, save_every=1,
      val_every=0, jit_compile=True))
  before = [v.numpy() for v in learner.trainable_variables]
  trainer.train(SinusoidTasks(SinusoidConfig(num_shots=10), "train"))
  assert int(trainer.nonfinite_steps.numpy()) == 1
  for a, v in zip(before, learner.trainable_variables):
    np.testing.assert_array_equal(a, v.numpy())
  assert float(model.loss_scale.scale.numpy()) == 2.0 ** 39
  assert "loss_scale" in learner.meta_loss(_sine_batch(2, np.float32))[1]
  fresh = models.build("mlp_sinusoid", seed=1, compute_dtype="float16",
                       loss_scale=precision.DYNAMIC)
  restored = training.Trainer(MAML(fresh, 0.01, 1), trainer.config)
  assert restored.restore() == 1
  assert float(fresh.loss_scale.scale.numpy()) == 2.0 ** 39


def test_mamlpp_passes_the_step_outcome_to_the_loss_scale():
  model = models.build("mlp_sinusoid", seed=0, norm="batch_norm",
                       compute_dtype="float16", loss_scale=precision.DYNAMIC)
  learner = MAMLPlusPlus(model, 0.01, 1)
  learner.meta_loss(_sine_batch(2, np.float32), tf.constant(0, tf.int64))
  learner.update_state(tf.constant(False))
  assert float(model.loss_scale.scale.numpy()) == 2.0 ** 14
