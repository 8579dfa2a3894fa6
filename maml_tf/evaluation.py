"""The evaluation protocol: per-task metrics over many tasks, mean and 95% CI.

As cbfinn/maml's ``test()``: every task gives one row of metrics after
0..U inner steps; the summary is the mean, the standard deviation (ddof 0) and
``ci95 = 1.96 std / sqrt(n)``. We add the median and a count of tasks whose
value is not finite: a task that diverges (possible at large step counts) is
reported, never allowed to turn the whole table into NaN silently. Mean, std and
CI are then taken over the finite tasks, and the median counts diverged tasks as
``+inf`` (for losses) so it stays an honest order statistic.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import io
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from maml_tf.io_utils import atomic_write_files
from maml_tf.tasks import TaskBatch

Z95 = 1.96


def summarize(values: np.ndarray) -> dict[str, np.ndarray]:
  """Column statistics of ``values`` ``[n]`` or ``[n, S]``.

  Returns:
    ``mean``, ``std``, ``ci95``, ``median`` and ``nonfinite`` (count), each of
    shape ``values.shape[1:]``.
  """
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  count = finite.sum(axis=0)
  safe = np.where(finite, values, 0.0)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = safe.sum(axis=0) / count
    std = np.sqrt((np.where(finite, values - mean, 0.0)**2).sum(axis=0) / count)
    ci95 = Z95 * std / np.sqrt(count)
  median = np.median(np.where(finite, values, np.inf), axis=0)
  return {"mean": mean, "std": std, "ci95": ci95, "median": median,
          "nonfinite": values.shape[0] - count}


class EvalResult:
  """Per-task metrics of an evaluation and their summaries.

  Attributes:
    values: metric name -> ``[num_tasks]`` or ``[num_tasks, S]`` array.
    seconds: wall time of the evaluation.
  """

  def __init__(self, values: dict[str, np.ndarray], seconds: float = 0.0):
    self.values = values
    self.seconds = seconds
    self.summary = {k: summarize(v) for k, v in values.items()}

  @property
  def num_tasks(self) -> int:
    return int(next(iter(self.values.values())).shape[0])

  def to_json(self) -> dict:
    return {
        "num_tasks": self.num_tasks,
        "seconds": self.seconds,
        "metrics": {
            name: {k: np.asarray(v).tolist() for k, v in stats.items()}
            for name, stats in self.summary.items()
        },
    }

  def to_csv(self) -> str:
    """One row per (metric, step): mean, std, ci95, median, nonfinite."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", "step", "mean", "std", "ci95", "median",
                     "nonfinite", "num_tasks"])
    for name, stats in self.summary.items():
      for step, row in enumerate(zip(*(np.atleast_1d(stats[k]) for k in
                                        ("mean", "std", "ci95", "median",
                                         "nonfinite")))):
        writer.writerow([name, step if np.ndim(stats["mean"]) else ""] +
                        [f"{v:.6g}" for v in row[:4]] + [int(row[4]),
                                                         self.num_tasks])
    return out.getvalue()

  def table(self) -> str:
    """A human-readable table of the per-step metrics."""
    per_step = [k for k, v in self.summary.items() if np.ndim(v["mean"]) == 1]
    lines = []
    if per_step:  # (an ensemble's test has none)
      header = "step " + "".join(f"| {k:^34} " for k in per_step)
      lines += [header, "-" * len(header)]
    num_steps = len(self.summary[per_step[0]]["mean"]) if per_step else 0
    for j in range(num_steps):
      cells = []
      for k in per_step:
        s = self.summary[k]
        cell = f"{s['mean'][j]:.4f} ± {s['ci95'][j]:.4f} (med {s['median'][j]:.4f})"
        if s["nonfinite"][j]:
          cell += f" [{int(s['nonfinite'][j])} diverged]"
        cells.append(f"| {cell:^34} ")
      lines.append(f"{j:>4} " + "".join(cells))
    for k, s in self.summary.items():
      if np.ndim(s["mean"]) == 0:
        lines.append(f"{k}: {s['mean']:.4f} ± {s['ci95']:.4f} "
                     f"(median {s['median']:.4f})")
    lines.append(f"{self.num_tasks} tasks, 95% CI = 1.96 std / sqrt(n)")
    return "\n".join(lines)

  def write(self, directory: str, basename: str) -> list[str]:
    """Writes ``<basename>.csv``, ``.json`` and ``.npz`` (per-task values)
    atomically. Returns the paths."""
    paths = [os.path.join(directory, basename + ext)
             for ext in (".csv", ".json", ".npz")]
    buffer = io.BytesIO()
    np.savez(buffer, **self.values)
    atomic_write_files(dict(zip(paths, (
        self.to_csv(), json.dumps(self.to_json(), indent=1),
        buffer.getvalue()))))
    return paths

  def warn_nonfinite(self) -> None:
    for name, stats in self.summary.items():
      bad = np.atleast_1d(stats["nonfinite"])
      if bad.any():
        logging.warning(
            "%s: %d of %d tasks gave non-finite values (worst step %d); "
            "mean/CI exclude them, the median counts them as +inf.", name,
            int(bad.max()), self.num_tasks, int(np.argmax(bad)))


def align_trace_names(multiple: int = 1 << 16) -> None:
  """Advances TensorFlow's process-wide naming counter to a multiple of
  ``multiple`` (at most 65,535 steps, about 30 ms).

  Traced functions, and so the XLA programs compiled from them, are named
  with this counter, and the on-disk XLA cache (``--xla_cache_dir``) keys
  programs by those names. Restoring a checkpoint advances the counter, so
  without this a resumed run finds none of its programs in the cache. Called
  before a run traces its functions, so that the names depend only on what
  is traced from there on.
  """
  from tensorflow.python.framework import ops  # no public API for it
  while ops.uid() % multiple:
    pass


def tensor_batch(source, index: int, batch_size: int) -> TaskBatch:
  """Batch ``index`` of ``source`` as TF tensors, as ``evaluate`` feeds it."""
  if hasattr(source, "tensor_batch"):
    return source.tensor_batch(index, batch_size)
  return source.batch(index, batch_size).to_tensors()


def evaluate(evaluate_fn: Callable, source, num_tasks: int, batch_size: int,
             start_index: int = 0,
             jit_compile: bool | None = True) -> EvalResult:
  """Runs ``evaluate_fn`` over ``num_tasks`` tasks of ``source``.

  Args:
    evaluate_fn: ``TaskBatch -> {name: [T] or [T, S] tensor}``, typically a
      learner's ``evaluate``.
    source: a task source (``batch(index, num_tasks)``).
    num_tasks: tasks to evaluate (600 in the original protocol).
    batch_size: tasks per compiled call; results do not depend on it.
    start_index: index of the first batch of ``source``.
    jit_compile: compile ``evaluate_fn`` with XLA (True), as a graph (False),
      or use it as given (None: it is already a ``tf.function``).

  Returns:
    An ``EvalResult``. The last batch is drawn full and truncated, so every
    call has the same shape (one compilation).
  """
  if jit_compile is not None:  # a new function: see align_trace_names
    align_trace_names()
  fn = (evaluate_fn if jit_compile is None else
        tf.function(evaluate_fn, jit_compile=jit_compile, autograph=False))
  parts: dict[str, list] = {}
  start = time.time()
  num_batches = -(-num_tasks // batch_size)

  def sample(i):
    # Runs on a thread while the current batch is evaluated: sampling and
    # the copy into TF (LEO's test batches hold 77 MB of embeddings).
    return tensor_batch(source, start_index + i, batch_size)

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = collections.deque(
        pool.submit(sample, i) for i in range(min(2, num_batches)))
    for i in range(num_batches):
      batch = pending.popleft().result()
      if i + 2 < num_batches:
        pending.append(pool.submit(sample, i + 2))
      out = fn(batch)
      keep = min(batch_size, num_tasks - i * batch_size)
      for k, v in out.items():
        parts.setdefault(k, []).append(np.asarray(v)[:keep])
  values = {k: np.concatenate(v, axis=0) for k, v in parts.items()}
  return EvalResult(values, time.time() - start)


def evaluate_ensemble(outputs_fn: Callable,
                      restore_fns: Sequence[Callable[[], object]], source,
                      num_tasks: int, batch_size: int,
                      jit_compile: bool = True) -> EvalResult:
  """Tests an ensemble of models on the same tasks, as HowToTrainYourMAML
  reports MAML++ (Antoniou et al. 2019): each model adapts to every task on
  its own, their query logits after the last inner step are averaged, and
  the class with the largest mean logit is the ensemble's prediction.

  Args:
    outputs_fn: ``TaskBatch -> {"query_outputs": [T, Q, N], "query_y":
      [T, Q], ...}`` for the weights in place (a learner's ``evaluate`` with
      ``return_outputs=True``).
    restore_fns: one per model, each putting its weights in place.
    source, num_tasks, batch_size: as ``evaluate``.
    jit_compile: as ``evaluate``; ``outputs_fn`` is compiled once for all
      the models.

  Returns:
    An ``EvalResult`` with ``ensemble_query_accuracy`` ``[num_tasks]``: the
    fraction of each task's queries the ensemble classifies correctly.
    HTTYM reports the mean of the same correct/incorrect array, with its
    standard deviation over all predictions (logged here), not a per-task
    95% interval.
  """
  align_trace_names()
  fn = tf.function(outputs_fn, jit_compile=jit_compile, autograph=False)
  start, total, labels = time.time(), None, None
  for i, restore in enumerate(restore_fns):
    restore()
    values = evaluate(fn, source, num_tasks, batch_size,
                      jit_compile=None).values
    outputs = values["query_outputs"].astype(np.float64)
    total = outputs if total is None else total + outputs
    if labels is not None and not np.array_equal(labels, values["query_y"]):
      raise ValueError("the task source gave the ensemble's members "
                       "different tasks; it must be deterministic")
    labels = values["query_y"]
    logging.info("Ensemble member %d of %d: query accuracy %.4f alone.",
                 i + 1, len(restore_fns),
                 float(np.mean(np.argmax(outputs, -1) == labels)))
  correct = np.argmax(total, -1) == labels
  logging.info("Ensemble of %d: query accuracy %.4f, std over all %d "
               "predictions %.4f (HTTYM's figures).", len(restore_fns),
               float(correct.mean()), correct.size, float(correct.std()))
  return EvalResult({"ensemble_query_accuracy": correct.mean(-1)},
                    time.time() - start)
