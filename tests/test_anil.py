"""ANIL: only the head adapts; the body is meta-learned; cached features."""

import numpy as np
import pytest

from maml_tf import layers as L
from maml_tf import models
from maml_tf.anil import ANIL
from tests import helpers
from tests.test_maml import meta_gradient_vs_fd, sine_batch, small_mlp


def conv_batch(dtype=np.float64):
  return helpers.classification_batch(2, 3, 1, 2, (8, 8, 1), seed=5,
                                      dtype=dtype)


def small_conv():
  return models.build("conv4_omniglot", num_classes=3, num_filters=3,
                      image_shape=(8, 8, 1), seed=2, dtype="float64")


@pytest.mark.parametrize("cache", [True, False])
def test_second_order_meta_gradient_matches_finite_differences(cache):
  learner = ANIL(small_mlp("batch_norm", scale=0.5), inner_lr=0.3,
                 num_inner_steps=2, cache_features=cache,
                 use_tf_function=False)
  rows = meta_gradient_vs_fd(learner, sine_batch())
  np.testing.assert_allclose(rows[:, 0], rows[:, 1], rtol=1e-5, atol=1e-8)


def test_inner_loop_leaves_the_body_untouched_and_meta_gradients_reach_it():
  model = small_conv()
  learner = ANIL(model, 0.4, 2, use_tf_function=False)
  trajectory, _ = learner.adapt_batch(helpers.to_tensors(conv_batch()), 2)
  for role, before, after in zip(model.param_roles, trajectory[0],
                                 trajectory[-1]):
    changed = not np.array_equal(before.numpy(), after.numpy())
    assert changed == (role == L.HEAD), role
  _, grads = learner.meta_gradients(conv_batch())
  for role, g in zip(model.param_roles, grads):
    assert np.abs(g.numpy()).sum() > 0, role


def test_body_meta_gradient_has_second_order_terms():
  """The body's meta-gradient flows through the head's inner updates too,
  so first-order ANIL must differ from second-order ANIL on the body."""
  model = small_conv()
  so = ANIL(model, 0.4, 2, use_tf_function=False)
  fo = ANIL(model, 0.4, 2, first_order=True, use_tf_function=False)
  _, g_so = so.meta_gradients(conv_batch())
  _, g_fo = fo.meta_gradients(conv_batch())
  body = [i for i, r in enumerate(model.param_roles) if r != L.HEAD]
  diff = max(np.abs(g_so[i].numpy() - g_fo[i].numpy()).max() for i in body)
  assert diff > 1e-6


def test_cached_features_give_identical_results():
  model = small_conv()
  cached = ANIL(model, 0.4, 3, cache_features=True, use_tf_function=False)
  plain = ANIL(model, 0.4, 3, cache_features=False, use_tf_function=False)
  batch = conv_batch()
  loss_c, grads_c = cached.meta_gradients(batch)
  loss_p, grads_p = plain.meta_gradients(batch)
  assert float(loss_c) == pytest.approx(float(loss_p), rel=1e-12)
  np.testing.assert_allclose(helpers.flat(grads_c), helpers.flat(grads_p),
                             rtol=1e-9, atol=1e-12)
  eval_c = cached.evaluate(helpers.to_tensors(batch), num_steps=4)
  eval_p = plain.evaluate(helpers.to_tensors(batch), num_steps=4)
  for name in eval_c:
    np.testing.assert_allclose(eval_c[name].numpy(), eval_p[name].numpy(),
                               rtol=1e-10)
  support_x, support_y, query_x = batch.support_x[0], batch.support_y[0], \
      batch.query_x[0]
  np.testing.assert_allclose(
      cached.adapt_and_predict(support_x, support_y, query_x, 2).numpy(),
      plain.adapt_and_predict(support_x, support_y, query_x, 2).numpy(),
      rtol=1e-10)


class CountingBody:
  """Counts body evaluations of a model (at trace time)."""

  def __init__(self, model):
    self.count = 0
    self.model = model
    self.original = model.body

  def __enter__(self):
    def body(*args, **kwargs):
      self.count += 1
      return self.original(*args, **kwargs)
    self.model.body = body
    return self

  def __exit__(self, *exc):
    del self.model.body


def test_cached_features_run_the_body_once_per_set():
  """Caching is where the speed comes from: the uncached inner loop runs the
  body at every step (and the second-order backward pass through each)."""
  model = small_conv()
  batch = helpers.to_tensors(conv_batch())
  counts = {}
  for cache in (True, False):
    learner = ANIL(model, 0.4, 5, cache_features=cache, use_tf_function=False)
    with CountingBody(model) as counter:
      learner.meta_loss(batch)
    counts[cache] = counter.count
  assert counts == {True: 2, False: 6}


def test_adapted_roles_cannot_be_overridden():
  with pytest.raises(ValueError, match="adapts only the head"):
    ANIL(small_conv(), 0.4, 1, adapted_roles=("weight",))


def test_meta_training_changes_the_body(tmp_path):
  """A couple of optimiser steps through the training loop move the body's
  weights (meta-learned) although the inner loop never adapts them."""
  from maml_tf import training
  from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
  model = models.build("mlp_sinusoid", seed=0)
  learner = ANIL(model, 0.01, 1, jit_compile=False)
  before = [v.numpy().copy() for v in model.trainable_variables]
  trainer = training.Trainer(learner, training.TrainConfig(
      run_dir=str(tmp_path), num_iterations=3, meta_batch_size=4,
      log=False, val_every=0, jit_compile=False))
  trainer.train(SinusoidTasks(SinusoidConfig(num_shots=5), "train"))
  for role, b, v in zip(model.param_roles, before, model.trainable_variables):
    assert not np.array_equal(b, v.numpy()), role
