"""Typed task batches shared by every algorithm and data source."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
  import tensorflow as tf


class TaskBatch(NamedTuple):
  """A meta-batch of few-shot tasks, with a leading task axis T.

  Attributes:
    support_x: ``[T, S, *example_shape]`` float support inputs (S = N*K for
      N-way K-shot classification).
    support_y: ``[T, S]`` int32 class ids in ``0..N-1`` (classification) or
      ``[T, S, 1]`` float targets (regression).
    query_x: ``[T, Q, *example_shape]`` query inputs.
    query_y: ``[T, Q]`` int32 or ``[T, Q, 1]`` float, as ``support_y``.

  Classification batches from the image samplers use the original's k-major
  layout: the first N examples are shot 0 of classes 0..N-1, the next N are
  shot 1, and so on; LEO-style batches are class-major (see the sampler).
  """

  support_x: tf.Tensor | np.ndarray
  support_y: tf.Tensor | np.ndarray
  query_x: tf.Tensor | np.ndarray
  query_y: tf.Tensor | np.ndarray

  @property
  def num_tasks(self) -> int:
    return int(self.support_x.shape[0])

  def to_tensors(self) -> "TaskBatch":
    """The same batch with every field a ``tf.Tensor``."""
    import tensorflow as tf  # only here: data preparation needs no TF
    return TaskBatch(*(tf.convert_to_tensor(t) for t in self))

  def task(self, i: int) -> "TaskBatch":
    """The i-th task, keeping a task axis of size 1."""
    return TaskBatch(*(t[i:i + 1] for t in self))


def stack(batches: list[TaskBatch]) -> TaskBatch:
  """Concatenates batches along the task axis (numpy)."""
  return TaskBatch(*(np.concatenate(parts, axis=0) for parts in zip(*batches)))
