"""Stateless randomness for LEO's dropout and sampling.

Every draw is a pure function of (run seed, meta-step, draw index), so a
traced meta-step draws the same masks and samples whenever it runs at that
step: a resumed run repeats an uninterrupted one exactly, and the meta-loss at
a fixed step is a deterministic function of the weights (finite differences
work in training mode).

XLA lays out Philox's stream differently from TF's kernels, so the draws (not
their distribution) depend on whether the step is compiled with XLA.
"""

from __future__ import annotations

import tensorflow as tf

# Per-draw seed keys are [seed, step * _DRAWS + draw]: distinct for every draw.
_DRAWS = 2**16
# TF's default stateless algorithm ('auto_select') becomes ThreeFry under
# XLA:CPU, about 100x slower than Philox (0.5 s vs 4 ms for the 576k uniforms
# of one meta-batch's query dropout); tfp's Normal.sample and
# tf.nn.experimental.stateless_dropout use the default, hence explicit Philox.
_ALG = "philox"


class StatelessRandom:
  """Seeds for the random draws of one meta-step, or none (evaluation).

  Every call of ``next`` gives a fresh ``int32[2]`` stateless seed, a pure
  function of (run seed, meta-step, call index), so a traced meta-step draws
  the same masks and samples whenever it runs at that step.

  Args:
    seed: the run's seed (Python int), or None for deterministic evaluation.
    step: the meta-step (scalar integer tensor).
  """

  def __init__(self, seed: int | None = None, step=0):
    self.training = seed is not None
    self._seed = seed
    self._step = step
    self._count = 0

  def next(self) -> tf.Tensor:
    if not self.training:
      raise ValueError("no randomness in evaluation")
    self._count += 1
    if self._count >= _DRAWS:
      raise ValueError(f"more than {_DRAWS} random draws in one meta-step")
    key = tf.stack([tf.constant(self._seed, tf.int64),
                    tf.cast(self._step, tf.int64) * _DRAWS + self._count])
    return tf.random.stateless_uniform([2], seed=key, minval=None,
                                       maxval=None, dtype=tf.int32, alg=_ALG)

  def uniform(self, shape, dtype) -> tf.Tensor:
    """U[0, 1) draws of ``shape`` from a fresh seed."""
    return tf.random.stateless_uniform(shape, self.next(), dtype=dtype,
                                       alg=_ALG)

  def normal(self, shape, dtype) -> tf.Tensor:
    """N(0, 1) draws of ``shape`` from a fresh seed."""
    return tf.random.stateless_normal(shape, self.next(), dtype=dtype,
                                      alg=_ALG)


def dropout(x: tf.Tensor, rate: float, rng: StatelessRandom) -> tf.Tensor:
  """Inverted dropout (``tf.nn.dropout``: zero with probability ``rate``,
  scale the rest by ``1 / (1 - rate)``), in meta-training only."""
  if not rng.training or rate == 0:
    return x
  keep = rng.uniform(tf.shape(x), x.dtype) >= tf.constant(rate, x.dtype)
  return tf.where(keep, x / tf.constant(1.0 - rate, x.dtype), tf.zeros_like(x))
