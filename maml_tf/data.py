"""Feeding task batches to compiled meta-steps through ``tf.data``.

A *task source* is any object with ``batch(index, num_tasks) -> TaskBatch``
returning numpy arrays. Batch ``index`` holds the tasks with ids
``index * num_tasks + [0, num_tasks)``, and every task is a pure function of the
source's seed, its split and its id. So the data stream is a function of the
step number (a resumed run sees exactly the batches an uninterrupted run would
have seen; parallel prefetching cannot change the order), and an evaluation over
tasks ``0..n-1`` gives the same tasks whatever its batch size.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from maml_tf.tasks import TaskBatch

SPLITS = ("train", "val", "test")


class TaskSource(Protocol):

  def batch(self, index: int, num_tasks: int) -> TaskBatch:
    """The ``index``-th batch of ``num_tasks`` tasks (numpy, deterministic)."""


def split_seed(seed: int, split: str) -> list[int]:
  """Entropy for ``np.random.default_rng`` that separates the splits."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return [int(seed), SPLITS.index(split)]


def task_ids(index: int, num_tasks: int) -> np.ndarray:
  """Ids of the tasks in batch ``index``: ``[num_tasks]`` uint64."""
  return np.arange(index * num_tasks, (index + 1) * num_tasks, dtype=np.uint64)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  z = x + _GOLDEN
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def task_uniforms(seed: int, split: str, ids: np.ndarray,
                  count: int) -> np.ndarray:
  """``count`` uniform [0, 1) numbers per task id, vectorised.

  A counter-based generator (SplitMix64 of seed, split, task id and position):
  task ``i`` gets the same numbers whatever batch it is drawn in, at numpy
  speed (no generator object per task).

  Returns:
    ``[len(ids), count]`` float64.
  """
  s, k = split_seed(seed, split)
  with np.errstate(over="ignore"):
    key = _splitmix64(_splitmix64(np.uint64(s)) ^ np.uint64(k + 1))
    base = _splitmix64(key ^ np.asarray(ids, np.uint64)[:, None])
    bits = _splitmix64(base + np.arange(count, dtype=np.uint64)[None, :])
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def task_rng(seed: int, split: str, task_id: int) -> np.random.Generator:
  """A numpy generator private to one task (for samplers that need
  ``choice``/``permutation``)."""
  return np.random.default_rng(split_seed(seed, split) + [int(task_id)])


def task_dataset(source: TaskSource, num_tasks: int, start: int = 0,
                 stop: int | None = None, block: int = 1,
                 parallel_calls: int | None = None,
                 prefetch: int = 2):
  """Batches ``start, start+1, ..., stop-1`` of ``source`` as a dataset.

  Args:
    source: a task source.
    num_tasks: tasks per batch (the meta-batch size).
    start: index of the first batch (the step to resume from).
    stop: one past the last index (None: unbounded).
    block: batches per element; with ``block > 1`` elements get a leading
      ``[block]`` axis (several meta-steps per compiled call). The last block
      may be shorter.
    parallel_calls: parallel ``batch`` calls (results stay in order);
      None: the number of CPUs, between 2 and 8.
    prefetch: elements to prefetch.

  Returns:
    A ``tf.data.Dataset`` of ``TaskBatch``.
  """
  import tensorflow as tf  # only here: data preparation needs no TF
  if parallel_calls is None:
    parallel_calls = max(2, min(8, os.cpu_count() or 2))
  probe = source.batch(start, num_tasks)
  dtypes = tuple(tf.as_dtype(np.asarray(t).dtype) for t in probe)
  shapes = tuple(np.asarray(t).shape for t in probe)

  def load(index):
    def fetch(i):
      return tuple(np.asarray(t) for t in source.batch(int(i), num_tasks))

    tensors = tf.numpy_function(fetch, [index], dtypes, stateful=False)
    for t, shape in zip(tensors, shapes):
      t.set_shape(shape)
    return TaskBatch(*tensors)

  indices = tf.data.Dataset.range(start, 2**62 if stop is None else stop)
  ds = indices.map(load, num_parallel_calls=parallel_calls, deterministic=True)
  if block > 1:
    ds = ds.batch(block)
  ds = ds.prefetch(prefetch)
  # Without autotuning: its background thread intermittently blocked the
  # iterator's destruction at the end of training for up to ~40 s.
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)
