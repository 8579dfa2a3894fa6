"""A scikit-learn style facade over any MAML-family learner.

As hoyeoplee/pytorch-maml's "MAML in sklearn style": ``fit`` meta-trains on a
task source, ``predict`` adapts to one task's support set and labels its
query inputs, ``score`` evaluates on many tasks. Training goes through
``maml_tf.training.Trainer`` (the same loop as ``runner.py``: compiled
meta-steps, checkpoints, optional TensorBoard logs), evaluation through
``maml_tf.evaluation`` (mean and 95% confidence interval over tasks).

Example (sinusoid regression, a few seconds on a CPU):

  >>> from maml_tf import MAML, MetaEstimator, models
  >>> from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
  >>> config = SinusoidConfig(num_shots=10)
  >>> train = SinusoidTasks(config, "train")
  >>> test = SinusoidTasks(config, "test")
  >>> learner = MAML(models.build("mlp_sinusoid", seed=0), inner_lr=0.01,
  ...                num_inner_steps=1)
  >>> estimator = MetaEstimator(learner, steps_per_call=100).fit(
  ...     train, num_iterations=1000)
  >>> mse, ci95 = estimator.score(test, num_tasks=600)
  >>> task = test.batch(0, 1)
  >>> estimator.predict(task.support_x[0], task.support_y[0],
  ...                   task.query_x[0]).shape
  (10, 1)

Any learner works: ``ANIL``, ``MetaSGD``, ``MAMLPlusPlus`` or ``MAML``.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
from absl import logging

from maml_tf import evaluation, training
from maml_tf.models import CLASSIFICATION


class MetaEstimator:
  """``fit`` / ``predict`` / ``score`` around a meta-learner.

  Args:
    learner: a learner of the MAML family (``maml_tf.MAML`` or a subclass).
    run_dir: where checkpoints (and, with ``log=True``, TensorBoard summaries)
      go; default: a temporary directory removed with the estimator.
    **train_options: ``maml_tf.training.TrainConfig`` fields other than
      ``run_dir`` and ``num_iterations`` (e.g. ``meta_batch_size``,
      ``meta_lr``, ``steps_per_call``, ``lr_schedule``). Defaults here: no
      TensorBoard logs and no checkpoints before the end of ``fit``.
  """

  def __init__(self, learner, run_dir: str | None = None, **train_options):
    for name in ("run_dir", "num_iterations"):
      if name in train_options:
        raise ValueError(f"{name} is an argument of MetaEstimator/fit, not a "
                         "train option")
    self.learner = learner
    self._tmp = None
    if run_dir is None:
      self._tmp = tempfile.TemporaryDirectory(prefix="maml_tf_estimator_")
      run_dir = self._tmp.name
    self.run_dir = run_dir
    options = {"log": False, "save_every": None, "val_every": 0,
               "log_every": None, "print_every": None, "resume": False}
    options.update(train_options)
    self.train_options = options
    self._config(1)  # an unknown or invalid option fails here, not in fit
    self.trainer: training.Trainer | None = None

  def _config(self, num_iterations: int) -> training.TrainConfig:
    options = dict(self.train_options)
    k = options.get("steps_per_call", 1)
    # Intervals default to the whole run, rounded to the steps per call.
    whole = max(k, -(-num_iterations // k) * k)
    for name in ("log_every", "print_every", "save_every"):
      if options[name] is None:
        options[name] = whole
    return training.TrainConfig(run_dir=self.run_dir,
                                num_iterations=num_iterations, **options)

  def fit(self, task_source, num_iterations: int, val_source=None):
    """Meta-trains for ``num_iterations`` meta-iterations.

    A second call continues training (weights, optimiser state and the task
    stream carry on); a learning-rate schedule spans the first call.

    Args:
      task_source: training tasks (``batch(index, num_tasks) -> TaskBatch``).
      num_iterations: meta-iterations to run in this call.
      val_source: optional meta-validation tasks (with ``val_every``).

    Returns:
      ``self``.
    """
    if num_iterations < 1:
      raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if val_source is not None and not self.train_options["val_every"]:
      raise ValueError("val_source is used every val_every meta-iterations; "
                       "pass val_every=<n> to MetaEstimator")
    if self.trainer is None:
      self.trainer = training.Trainer(self.learner,
                                      self._config(num_iterations))
    else:
      if self.train_options.get("lr_schedule") == "cosine":
        logging.warning(
            "fit again with lr_schedule='cosine': the schedule spanned the "
            "first fit, so training continues at its final rate min_meta_lr="
            "%s.", self.trainer.config.min_meta_lr)
      done = int(self.trainer.step.numpy())
      self.trainer.config = dataclasses.replace(
          self._config(num_iterations),
          num_iterations=done + num_iterations -
          self.trainer.config.pretrain_iterations)
    self.trainer.train(task_source, val_source)
    return self

  def predict_outputs(self, support_x, support_y, query_x,
                      num_steps: int | None = None) -> np.ndarray:
    """Adapts to one task; returns raw query outputs ``[Q, num_outputs]``
    (logits for classification). Arguments as ``predict``.

    Raises:
      ValueError: naming the argument whose shape, type or values do not
        fit the model.
    """
    support_x, support_y, query_x = self._checked_task(
        support_x, support_y, query_x, num_steps)
    return np.asarray(self.learner.adapt_and_predict(
        support_x, support_y, query_x, num_steps))

  def _checked_task(self, support_x, support_y, query_x,
                    num_steps: int | None):
    """One task's arrays, checked against the model (a wrong label or shape
    would otherwise train on a broadcast loss, or fail deep in TensorFlow)."""
    model = self.learner.model
    support_x, support_y = np.asarray(support_x), np.asarray(support_y)
    query_x = np.asarray(query_x)
    if num_steps is not None and num_steps < 0:
      raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if support_x.ndim < 1 or not len(support_x):
      raise ValueError("support_x: expected [S, *example_shape] with S >= 1, "
                       f"got shape {support_x.shape}")
    if query_x.ndim < 1 or query_x.shape[1:] != support_x.shape[1:]:
      raise ValueError(f"query_x: expected [Q, {support_x.shape[1:]} as "
                       f"support_x], got shape {query_x.shape}")
    size = int(np.prod(model.example_shape))
    if int(np.prod(support_x.shape[1:])) != size:
      raise ValueError(f"support_x: each example must hold {size} values "
                       f"(the model's {model.example_shape}), got shape "
                       f"{support_x.shape}")
    s = len(support_x)
    if model.task_type == CLASSIFICATION:
      if (support_y.shape != (s,) or
          not np.issubdtype(support_y.dtype, np.integer)):
        raise ValueError(f"support_y: expected [{s}] integer class ids, got "
                         f"shape {support_y.shape} of {support_y.dtype}")
      if support_y.min() < 0 or support_y.max() >= model.num_outputs:
        raise ValueError(f"support_y: class ids must be in 0..."
                         f"{model.num_outputs - 1}, got "
                         f"{support_y.min()}..{support_y.max()}")
      return support_x, support_y.astype(np.int32), query_x
    if support_y.shape == (s,) and model.num_outputs == 1:
      support_y = support_y[:, None]
    if support_y.shape != (s, model.num_outputs):
      raise ValueError(f"support_y: expected [{s}, {model.num_outputs}] "
                       f"targets, got shape {support_y.shape}")
    return support_x, support_y, query_x  # (the learner casts them)

  def predict(self, support_x, support_y, query_x,
              num_steps: int | None = None) -> np.ndarray:
    """Adapts to one task and predicts its query set.

    The query set is one batch: with batch norm, which normalises with the
    current batch's statistics as the original MAML does, a query's
    prediction depends on the other queries passed with it. Pass a task's
    whole query set together.

    Args:
      support_x: ``[S, *example_shape]`` support inputs.
      support_y: ``[S]`` integer class ids in ``0..N-1``, or ``[S, 1]`` (or
        ``[S]``) regression targets.
      query_x: ``[Q, *example_shape]``.
      num_steps: inner steps (default: the learner's evaluation steps).

    Returns:
      Class ids ``[Q]`` (classification) or predictions ``[Q, 1]``.

    Raises:
      ValueError: naming the argument whose shape, type or values do not
        fit the model.
    """
    outputs = self.predict_outputs(support_x, support_y, query_x, num_steps)
    if self.learner.model.task_type == CLASSIFICATION:
      return outputs.argmax(axis=-1)
    return outputs

  def score(self, task_source, num_tasks: int = 600,
            batch_size: int | None = None,
            num_steps: int | None = None) -> tuple[float, float]:
    """Mean query metric over tasks ``0..num_tasks-1`` and its 95% CI.

    The metric is the query accuracy for classification (higher is better)
    and the query MSE for regression (lower is better; the papers' metric,
    where scikit-learn regressors report R^2), after ``num_steps`` inner
    steps.

    Returns:
      ``(mean, ci95)`` with ``ci95 = 1.96 std / sqrt(num_tasks)``.
    """
    if num_tasks < 1:
      raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    steps = (self.learner.num_inner_steps_eval if num_steps is None
             else num_steps)
    name = ("query_accuracy" if self.learner.model.task_type == CLASSIFICATION
            else "query_loss")
    result = evaluation.evaluate(
        lambda batch: self.learner.evaluate(batch, num_steps=steps),
        task_source, num_tasks, batch_size or min(num_tasks, 100),
        jit_compile=self.learner.jit_compile)
    stats = result.summary[name]
    return float(stats["mean"][-1]), float(stats["ci95"][-1])

