"""Shared test utilities."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from maml_tf.tasks import TaskBatch


def classification_batch(num_tasks, ways, shots, queries, shape, seed=0,
                         dtype=np.float32) -> TaskBatch:
  """Random N-way tasks in the k-major layout with labels 0..N-1."""
  rng = np.random.default_rng(seed)
  labels_s = np.tile(np.arange(ways), shots)
  labels_q = np.tile(np.arange(ways), queries)
  return TaskBatch(
      rng.normal(size=(num_tasks, ways * shots) + shape).astype(dtype),
      np.tile(labels_s, (num_tasks, 1)).astype(np.int32),
      rng.normal(size=(num_tasks, ways * queries) + shape).astype(dtype),
      np.tile(labels_q, (num_tasks, 1)).astype(np.int32))


def flat(tensors) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(t)) for t in tensors])


def windowed_reductions(hlo: str) -> list[str]:
  """The reduce-windows of XLA's optimised HLO whose window spans more than
  one axis: what XLA:CPU makes of a sum over several axes longer than 32,
  and what its classic emitters take seconds each to compile."""
  found = []
  for line in hlo.splitlines():
    if " reduce-window(" in line:
      window = line.split("window={size=")[1].split()[0]
      if sum(int(n) > 1 for n in window.split("x")) > 1:
        found.append(line.strip()[:120])
  return found


def directional_fd(loss_fn, variables, direction, eps):
  """Central finite difference of ``loss_fn()`` along ``direction``
  (a flat vector over ``variables``); restores the variables."""
  originals = [np.array(v.numpy()) for v in variables]
  sizes = [o.size for o in originals]
  parts = np.split(direction, np.cumsum(sizes)[:-1])

  def at(scale):
    for v, o, d in zip(variables, originals, parts):
      v.assign(o + scale * d.reshape(o.shape))
    return float(loss_fn())

  try:
    return (at(eps) - at(-eps)) / (2 * eps)
  finally:
    for v, o in zip(variables, originals):
      v.assign(o)


def assign_all(variables, values):
  for v, x in zip(variables, values):
    v.assign(x)


def to_tensors(batch: TaskBatch) -> TaskBatch:
  return TaskBatch(*(tf.convert_to_tensor(t) for t in batch))
