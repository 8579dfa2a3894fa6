"""Loss scaling for float16 layers, exact through second-order meta-gradients.

float16 has 5 exponent bits: gradients below about 6e-8 flush to zero and
below 6e-5 lose precision. Loss scaling (Micikevicius et al. 2018, "Mixed
Precision Training") multiplies the gradients by S while they are in float16
and divides by S when they leave it.

Keras' ``LossScaleOptimizer`` scales only the loss its optimiser minimises,
the outer one. MAML's inner loop takes gradients of its own, and those set the
fast weights, so in float16 they would stay unscaled. Scaling every inner loss
by S and dividing every inner gradient by S would fix that, in each algorithm
and wherever it adapts (meta-training, evaluation, MAML++'s per-step losses).
This module does the equivalent once, at the model's precision boundaries,
where it casts into float16 (``enter``) and back (``leave``): a gradient that
crosses a boundary into float16 is multiplied by S and one that leaves is
divided by S, whichever loss it comes from.

* First order (``tape.gradient`` of a loss, the inner gradient or the outer
  one): every float16 cotangent is S times the true one.
* Second order (the meta-gradient through an inner gradient): the backward
  pass being differentiated holds S-scaled values, so its own cotangents must
  stay at their true scale for the result to be exact. Each boundary's backward
  op therefore has a custom gradient (a plain cast, not the true factor). The
  cotangents that flow from there back into the forward pass's float16
  tensors are products with those S-scaled values, so they arrive S-scaled
  too; only the cotangents of the backward pass's own tensors are unscaled.

Every factor is a power of two, so in float32 the scaled and unscaled
computations give the same values (tested), and the float32 parts of the
model (variables, fast weights, inner updates, losses) never see S. Third and
higher derivatives are not scaled (no algorithm here takes them).

A non-finite meta-gradient (an overflow: S too large) is skipped by the
training loop's non-finite guard, and ``LossScale.update`` halves a dynamic
scale; after ``growth_interval`` finite steps in a row it doubles it
(Keras' dynamic policy: start 2^15, double every 2000 finite steps).
"""

from __future__ import annotations

import math

import tensorflow as tf

DYNAMIC = "dynamic"
INITIAL_DYNAMIC_SCALE = 2.0 ** 15
GROWTH_INTERVAL = 2000


def parse_loss_scale(value: str | float | None) -> str | float | None:
  """``'dynamic'``, a fixed power-of-two scale, or None (no scaling).

  Raises:
    ValueError: naming ``--loss_scale`` and what it accepts.
  """
  if value is None or value == DYNAMIC:
    return value
  try:
    scale = float(value)
  except (TypeError, ValueError):
    scale = math.nan
  if not (scale >= 1 and math.isfinite(scale) and
          math.frexp(scale)[0] == 0.5):
    raise ValueError(f"--loss_scale={value!r}: expected 'dynamic' or a power "
                     "of two >= 1 (a power of two keeps the scaling exact)")
  return None if scale == 1 else scale


class LossScale(tf.Module):
  """The scale S of the float16 gradients, fixed or dynamic.

  Args:
    policy: ``'dynamic'`` or a fixed power of two (see ``parse_loss_scale``).
    growth_interval: finite steps in a row after which a dynamic scale
      doubles.

  Attributes:
    scale: float32 scalar variable, checkpointed with the model.
    good_steps: int64 scalar variable, finite steps since the last change.
  """

  def __init__(self, policy: str | float = DYNAMIC,
               growth_interval: int = GROWTH_INTERVAL, name: str = "loss_scale"):
    super().__init__(name=name)
    self.dynamic = policy == DYNAMIC
    initial = INITIAL_DYNAMIC_SCALE if self.dynamic else float(policy)
    self.growth_interval = int(growth_interval)
    self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False,
                             name="scale")
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="good_steps")

  def update(self, finite: tf.Tensor) -> None:
    """Halves a dynamic scale after a non-finite step (not below 1); doubles
    it after ``growth_interval`` finite steps in a row. A fixed scale stays."""
    if not self.dynamic:
      return
    grown = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
    new_scale = tf.where(
        finite, tf.where(grown, self.scale * 2.0, self.scale),
        tf.maximum(self.scale * 0.5, 1.0))
    self.scale.assign(new_scale)
    self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(
        grown)), self.good_steps + 1, tf.zeros_like(self.good_steps)))


def _scaled_cast(t: tf.Tensor, dtype: tf.DType, factor) -> tf.Tensor:
  """``cast(t) * factor``, multiplied in the wider of the two types."""
  if dtype.size < t.dtype.size:
    return tf.cast(t * tf.cast(factor, t.dtype), dtype)
  return tf.cast(t, dtype) * tf.cast(factor, dtype)


def _rescale(t: tf.Tensor, dtype: tf.DType, factor) -> tf.Tensor:
  """A boundary's backward op: ``cast(t) * factor``, whose own gradient is a
  plain cast, so the cotangents of the scaled backward pass stay at their
  true scale (see the module docstring)."""
  source = t.dtype

  @tf.custom_gradient
  def op(x):
    return _scaled_cast(x, dtype, factor), lambda c: tf.cast(c, source)

  return op(t)


def _boundary(x: tf.Tensor, dtype: tf.DType, grad_factor) -> tf.Tensor:
  """``cast(x)``, whose gradient is ``_rescale(dy, x.dtype, grad_factor)``."""
  source = x.dtype

  @tf.custom_gradient
  def op(t):
    return tf.cast(t, dtype), lambda dy: _rescale(dy, source, grad_factor)

  return op(x)


def enter(x: tf.Tensor, dtype: tf.DType, scale: tf.Tensor | None) -> tf.Tensor:
  """Casts ``x`` into the layers' ``dtype``; gradients leaving through it are
  divided by ``scale`` (None or a same-dtype ``x``: a plain cast)."""
  dtype = tf.as_dtype(dtype)
  if scale is None or x.dtype == dtype:
    return tf.cast(x, dtype)
  return _boundary(x, dtype, 1.0 / scale)


def leave(x: tf.Tensor, dtype: tf.DType, scale: tf.Tensor | None) -> tf.Tensor:
  """Casts the layers' output ``x`` back to ``dtype``; gradients entering the
  layers through it are multiplied by ``scale``."""
  dtype = tf.as_dtype(dtype)
  if scale is None or x.dtype == dtype:
    return tf.cast(x, dtype)
  return _boundary(x, dtype, scale)
