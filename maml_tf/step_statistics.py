"""Per-step batch-norm running statistics (MAML++'s BNRS).

Antoniou et al. (2019), section 4: every inner step gets its own batch-norm
running mean and variance. ``StepStatistics`` keeps them as ``[U, C]``
non-trainable variables per ``BatchNorm`` layer of a model and plugs into the
layers through ``maml_tf.layers.batch_norm_statistics``:

* in evaluation mode (``training=False``) step j's forward passes normalise
  with row j;
* while a meta-loss is traced inside ``recording()``, the batch moments of
  every forward pass are collected (stop-gradient), per layer and step.

Nothing is assigned while the meta-loss runs (it runs inside gradient tapes):
``summarise`` turns the recording into fixed-shape tensors, which the learner
hands to ``update`` after the gradients. Inside ``tf.cond`` branches,
recorded tensors cannot leave the branch graph on the side, so ``select``
returns them as branch outputs, with weight 0 from the branch that skips the
forward pass.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import tensorflow as tf

from maml_tf import layers as L
from maml_tf.models import MetaModel


def select(pred, true_fn: Callable, false_fn: Callable):
  """``true_fn() if pred else false_fn()`` for a bool or a bool tensor."""
  if isinstance(pred, bool):
    return true_fn() if pred else false_fn()
  return tf.cond(pred, true_fn, false_fn)


class _Scratch:
  """Trace-time bookkeeping kept out of ``tf.Module`` attribute tracking."""

  def __init__(self):
    self.recording = None  # {(layer, row): [(mean, var[, weight])]} or None


class StepStatistics(tf.Module):
  """Running mean and variance ``[U, C]`` of every ``BatchNorm`` of a model.

  Args:
    model: the network.
    num_steps: U, rows per statistic; inner steps >= U use row U - 1.
    momentum: weight of a new batch's statistics (PyTorch's 0.1).

  Attributes:
    means, variances: one ``[U, C]`` variable per batch-norm layer
      (initialised to 0 and 1, as PyTorch's running statistics).
  """

  def __init__(self, model: MetaModel, num_steps: int,
               momentum: float = 0.1, name: str | None = None):
    super().__init__(name=name)
    layers = [l for l in model.layers if isinstance(l, L.BatchNorm)]
    dtype = model.trainable_variables[0].dtype
    self.num_steps = int(num_steps)
    self.momentum = float(momentum)
    self.means = [
        tf.Variable(tf.zeros([num_steps, l.trainable_weights[0].shape[-1]],
                             dtype), trainable=False, name=f"mean_{l.name}")
        for l in layers]
    self.variances = [tf.Variable(tf.ones_like(m), trainable=False,
                                  name=f"variance_{l.name}")
                      for l, m in zip(layers, self.means)]
    self._names = tuple(l.name for l in layers)
    self._scratch = _Scratch()

  @property
  def num_layers(self) -> int:
    return len(self._names)

  def row(self, step: int) -> int:
    return min(int(step), self.num_steps - 1)

  # ---------------------------------------------------------------- forward
  def hook(self, training: bool) -> Callable:
    """The ``layers.batch_norm_statistics`` hook for one forward mode."""
    return functools.partial(self._statistics, training)

  def _statistics(self, training: bool, layer, step, mean, variance, count):
    if layer.name not in self._names:
      return mean, variance
    k, s = self._names.index(layer.name), self.row(step)
    recording = self._scratch.recording
    if recording is not None:
      count = tf.cast(count, mean.dtype)
      unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
      axes = list(range(len(mean.shape) - 1))  # tasks, then broadcast axes
      recording.setdefault((k, s), []).append(
          (tf.stop_gradient(tf.reduce_mean(mean, axes)),
           tf.stop_gradient(tf.reduce_mean(unbiased, axes))))
    if training:
      return mean, variance
    shape = [1] * (len(mean.shape) - 1) + [-1]
    return (tf.reshape(tf.cast(self.means[k][s], mean.dtype), shape),
            tf.reshape(tf.cast(self.variances[k][s], mean.dtype), shape))

  # --------------------------------------------------------------- recording
  @contextlib.contextmanager
  def recording(self, enabled: bool = True):
    """Collects the batch moments of the forward passes in the block.

    Yields:
      The recording dict (None when not ``enabled``); read it after the
      block, within the same graph.
    """
    outer = self._scratch.recording
    self._scratch.recording = {} if enabled else None
    try:
      yield self._scratch.recording
    finally:
      self._scratch.recording = outer

  def select(self, pred, fn: Callable, zero: Callable, step: int):
    """``fn()`` if ``pred`` else ``zero()``, where ``fn`` runs one forward
    pass at inner step ``step``; its recorded moments leave a ``tf.cond`` as
    branch outputs (weight 0 when skipped)."""
    outer = self._scratch.recording

    def run():
      with self.recording(outer is not None) as recorded:
        value = fn()
      stats = [recorded[key][0] for key in sorted(recorded or {})]
      return value, stats, tf.constant(1.0)

    def skip():
      stats = ([(tf.zeros_like(m[0]), tf.zeros_like(m[0]))
                for m in self.means] if outer is not None else [])
      return zero(), stats, tf.constant(0.0)

    value, stats, weight = select(pred, run, skip)
    if outer is not None:
      for k, (mean, variance) in enumerate(stats):
        outer.setdefault((k, self.row(step)), []).append(
            (mean, variance, weight))
    return value

  def summarise(self, recording: dict | None) -> list:
    """Per layer ``(mean_sum [U, C], var_sum [U, C], count [U])``: fixed
    shapes, so both branches of a ``tf.cond`` return the same structure."""
    recording = recording or {}
    summary = []
    for k, running in enumerate(self.means):
      dtype = running.dtype
      rows = []
      for s in range(self.num_steps):
        entries = [(tf.cast(e[0], dtype), tf.cast(e[1], dtype),
                    tf.cast(e[2] if len(e) == 3 else 1.0, dtype))
                   for e in recording.get((k, s), [])]
        if not entries:
          zero = tf.zeros(running.shape[-1:], dtype)
          rows.append((zero, zero, tf.zeros([], dtype)))
          continue
        rows.append((tf.add_n([w * m for m, _, w in entries]),
                     tf.add_n([w * v for _, v, w in entries]),
                     tf.add_n([w for _, _, w in entries])))
      summary.append(tuple(tf.stack(part) for part in zip(*rows)))
    return summary

  # ------------------------------------------------------------------ update
  def update(self, summary: list, finite=True) -> None:
    """Blends the mean recorded moments into the running statistics with
    ``momentum``; rows without records, or a non-finite step, keep theirs."""
    m = self.momentum
    for (sums, squares, counts), means, variances in zip(
        summary, self.means, self.variances):
      seen = (counts > 0)[:, None] & tf.cast(finite, tf.bool)
      denominator = tf.maximum(counts, 1.0)[:, None]
      means.assign(tf.where(seen, (1 - m) * means + m * sums / denominator,
                            means))
      variances.assign(tf.where(
          seen, (1 - m) * variances + m * squares / denominator, variances))
