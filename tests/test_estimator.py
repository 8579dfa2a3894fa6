"""The scikit-learn style facade: fit / predict / score."""

import numpy as np
import pytest

from maml_tf import MAML, MetaEstimator, MetaSGD, models
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
from tests import helpers


def test_fit_predict_score_on_sinusoid_learns():
  config = SinusoidConfig(num_shots=10)
  train, test = SinusoidTasks(config, "train"), SinusoidTasks(config, "test")
  learner = MetaSGD(models.build("mlp_sinusoid", seed=0), seed=0)
  estimator = MetaEstimator(learner, steps_per_call=100)
  before, _ = estimator.score(test, num_tasks=200)
  assert estimator.fit(train, num_iterations=600) is estimator
  after, ci95 = estimator.score(test, num_tasks=200)
  assert after < 0.6 * before, (before, after)
  assert 0 < ci95 < 0.5 * after
  assert int(estimator.trainer.step.numpy()) == 600
  # predict agrees with the per-task evaluation's MSE after 1 step.
  task = test.batch(0, 1)
  predictions = estimator.predict(task.support_x[0], task.support_y[0],
                                  task.query_x[0], num_steps=1)
  assert predictions.shape == (10, 1)
  mse = float(np.mean((predictions - task.query_y[0])**2))
  expected = learner.evaluate(helpers.to_tensors(task), num_steps=1)
  assert mse == pytest.approx(float(expected["query_loss"][0, 1]), rel=1e-4)
  # A second fit continues: the step counter and the task stream carry on.
  estimator.fit(train, num_iterations=100)
  assert int(estimator.trainer.step.numpy()) == 700


def test_classification_predict_returns_class_ids():
  model = models.build("conv4_omniglot", num_classes=5, num_filters=4,
                       seed=0)
  estimator = MetaEstimator(MAML(model, 0.4, 1, jit_compile=False))
  batch = helpers.classification_batch(1, 5, 1, 2, (28, 28, 1), seed=0)
  labels = estimator.predict(batch.support_x[0], batch.support_y[0],
                             batch.query_x[0])
  assert labels.shape == (10,) and labels.dtype.kind == "i"
  assert set(labels.tolist()) <= set(range(5))
  logits = estimator.predict_outputs(batch.support_x[0], batch.support_y[0],
                                     batch.query_x[0])
  np.testing.assert_array_equal(logits.argmax(-1), labels)


def test_bad_options_are_named():
  learner = MAML(models.build("mlp_sinusoid", seed=0), 0.01, 1)
  with pytest.raises(ValueError, match="num_iterations is an argument"):
    MetaEstimator(learner, num_iterations=5)
  with pytest.raises(ValueError, match="num_iterations must be >= 1"):
    MetaEstimator(learner).fit(None, 0)
  # Checked when made, not at the first fit.
  with pytest.raises(ValueError, match="meta_batch_size must be >= 1"):
    MetaEstimator(learner, meta_batch_size=0)
  with pytest.raises(TypeError, match="unexpected keyword argument 'metalr'"):
    MetaEstimator(learner, metalr=0.1)
  with pytest.raises(ValueError, match="pass val_every=<n>"):
    MetaEstimator(learner).fit(None, 1, val_source=object())
  with pytest.raises(ValueError, match="num_tasks must be >= 1"):
    MetaEstimator(learner).score(None, num_tasks=0)


def test_a_task_that_does_not_fit_the_model_is_named():
  """These trained on a broadcast loss, or ran with clipped labels, or
  failed deep in TensorFlow."""
  sine = MetaEstimator(MAML(models.build("mlp_sinusoid", seed=0), 0.01, 1,
                            jit_compile=False))
  x, y = np.linspace(-1, 1, 10)[:, None], np.sin(np.linspace(-1, 1, 10))
  # [S] regression targets are [S, 1]: the same predictions.
  np.testing.assert_array_equal(sine.predict(x, y, x),
                                sine.predict(x, y[:, None], x))
  for args, message in [
      ((x, y[:8], x), r"support_y: expected \[10, 1\] targets, got shape "
       r"\(8,\)"),
      ((x[:0], y[:0], x), r"support_x: expected \[S, \*example_shape\] "
       r"with S >= 1"),
      ((x, y, x[:, :, None]), r"query_x: expected \[Q, \(1,\) as support_x"),
      ((np.ones([10, 3]), y, np.ones([4, 3])),
       "support_x: each example must hold 1 values"),
  ]:
    with pytest.raises(ValueError, match=message):
      sine.predict(*args)
  with pytest.raises(ValueError, match="num_steps must be >= 0, got -1"):
    sine.predict(x, y, x, num_steps=-1)

  model = models.build("conv4_omniglot", num_classes=5, num_filters=4, seed=0)
  images = MetaEstimator(MAML(model, 0.4, 1, jit_compile=False))
  batch = helpers.classification_batch(1, 5, 1, 2, (28, 28, 1), seed=0)
  sx, sy, qx = batch.support_x[0], np.asarray(batch.support_y[0]), \
      batch.query_x[0]
  for labels, message in [
      (np.where(sy == 0, 7, sy), r"class ids must be in 0...4, got 1..7"),
      (sy - 1, r"class ids must be in 0...4, got -1..3"),
      (sy + 0.7, r"expected \[5\] integer class ids, got shape \(5,\) of "
       "float64"),
      (np.eye(5)[sy].astype(np.int32), r"got shape \(5, 5\)"),
  ]:
    with pytest.raises(ValueError, match=f"support_y: .*{message}"):
      images.predict(sx, labels, qx)
