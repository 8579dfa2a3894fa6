"""The meta-training loop shared by every algorithm (MAML family and LEO).

Only this module touches the optimiser, gradient clipping, summaries and
checkpoints; learners just return ``(loss, metrics)``.

A *learner* provides:

* ``trainable_variables``;
* ``meta_loss(batch, step, training=True) -> (loss, {name: scalar})``;
* ``evaluate(batch) -> {name: [T] or [T, S]}`` (per-task metrics; ``[T, S]``
  means one column per inner step);
* optionally ``pretrain_loss(batch, step)`` (``--pretrain_iterations``),
  ``fallback_gradients() -> list`` (what to apply when the loss or a gradient
  is not finite, as LEO does; without it a non-finite step is skipped) and
  ``update_state(finite)``: called after each meta-step's gradients, outside
  the tape, to update non-trainable state from the step just taken (MAML++'s
  per-step batch-norm running statistics, a float16 loss scale); ``finite``
  is a boolean tensor, false when the step was not finite; and
  ``phase(step: int) -> hashable``: the loop then compiles one meta-step per
  phase and calls ``meta_loss(batch, step, phase=phase(step))`` (MAML++'s
  schedules), so the graph need not branch on the step tensor;
  ``default_tasks_per_chunk(num_tasks) -> int``: how many tasks a meta-step
  differentiates at once when ``TrainConfig.tasks_per_chunk`` is None (see
  ``chunked_gradients``; without it, all of them); and
  ``pending_statistics``: a settable nested structure of tensors that
  ``meta_loss`` records for ``update_state``, each a mean over the call's
  tasks (MAML++'s batch moments), which a chunked meta-step averages over its
  chunks.

The loop compiles ``steps_per_call`` meta-steps into one XLA call (a
``tf.while_loop`` with the optimiser inside), so small workloads such as the
sinusoid are not bound by per-call overhead.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import threading
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from maml_tf import data as data_lib
from maml_tf import evaluation
from maml_tf import io_utils
from maml_tf.io_utils import (CheckpointUnreadableError, atomic_replace_dir,
                               atomic_write, recover_replaced_dir)
from maml_tf.tasks import TaskBatch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to meta-train.

  Attributes:
    run_dir: where summaries, checkpoints and results go.
    num_iterations: meta-training iterations (``--metatrain_iterations``).
    pretrain_iterations: iterations of the pre-update-loss baseline that run
      first (``--pretrain_iterations``). As the original's ``pretrain_op``
      they have their own Adam (``meta_lr``, no schedule) and no clipping.
    meta_batch_size: tasks per meta-step (``--meta_batch_size``).
    meta_lr: Adam learning rate (``--meta_lr``).
    lr_schedule: 'constant', or 'cosine' annealing to ``min_meta_lr`` over the
      meta-training iterations (MAML++).
    min_meta_lr: final learning rate of the cosine schedule.
    adam_epsilon: 1e-8, TF1's ``AdamOptimizer`` default (Keras' is 1e-7).
    clip_value: clip every gradient element to ``[-v, v]`` (0: off). The
      original clips MiniImagenet gradients at 10, LEO at 0.1.
    clip_norm: then clip each gradient tensor's L2 norm (0: off; LEO: 0.1).
    log_every: TensorBoard summary interval (the original: 100).
    print_every: progress-line interval (the original: 100, sinusoid 1000).
    val_every: meta-validation interval (0: never).
    val_num_tasks: tasks per meta-validation (default: one meta-batch).
    val_fixed_tasks: validate on the same tasks every time (LEO's protocol
      here, so that best-checkpoint selection compares like with like);
      False: new tasks at each validation, as the original MAML's
      meta-validation queue.
    val_batch_size: tasks per compiled validation call.
    save_every: checkpoint interval (the original: 1000).
    max_to_keep: checkpoints kept (the original: 10).
    keep_best: metric name (e.g. 'query_accuracy') whose meta-validation mean
      (last column) selects a best checkpoint, copied atomically to
      ``run_dir/best_checkpoint`` (LEO's protocol); None: off.
    keep_top: with ``keep_best``, also keep the checkpoints of the
      ``keep_top`` best meta-validations in ``run_dir/top_checkpoints``
      (``top_checkpoints``), for HowToTrainYourMAML's test of an ensemble
      (``evaluation.evaluate_ensemble``); 0: off.
    steps_per_call: meta-steps per compiled call.
    tasks_per_chunk: differentiate each meta-step's objective this many tasks
      at a time, summing the chunks' gradients in a compiled loop
      (``chunked_gradients``): the same meta-gradient, for a program that
      holds one chunk. It must divide ``meta_batch_size``. None: the
      learner's ``default_tasks_per_chunk``, else all tasks at once.
    jit_compile: compile with XLA.
    resume: continue from the latest checkpoint in ``run_dir``.
    seed: the run's seed (initialisation and learner randomness).
    log: write TensorBoard summaries (``--log``).
  """

  run_dir: str
  num_iterations: int
  pretrain_iterations: int = 0
  meta_batch_size: int = 25
  meta_lr: float = 1e-3
  lr_schedule: str = "constant"
  min_meta_lr: float = 0.0
  adam_epsilon: float = 1e-8
  clip_value: float = 0.0
  clip_norm: float = 0.0
  log_every: int = 100
  print_every: int = 100
  val_every: int = 500
  val_num_tasks: int | None = None
  val_fixed_tasks: bool = False
  val_batch_size: int | None = None
  save_every: int = 1000
  max_to_keep: int = 10
  keep_best: str | None = None
  keep_top: int = 0
  steps_per_call: int = 1
  tasks_per_chunk: int | None = None
  jit_compile: bool = True
  resume: bool = True
  seed: int = 0
  log: bool = True

  def __post_init__(self):
    if self.num_iterations < 0 or self.pretrain_iterations < 0:
      raise ValueError("iteration counts must be >= 0")
    if self.meta_batch_size < 1:
      raise ValueError(
          f"--meta_batch_size must be >= 1, got {self.meta_batch_size}")
    if self.lr_schedule not in ("constant", "cosine"):
      raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got "
                       f"{self.lr_schedule!r}")
    if self.keep_top and not (self.keep_best and self.val_every):
      raise ValueError(f"keep_top={self.keep_top} ranks meta-validations: it "
                       "needs keep_best and val_every > 0")
    chunk = self.tasks_per_chunk
    if chunk is not None and (chunk < 1 or self.meta_batch_size % chunk):
      raise ValueError(
          f"tasks_per_chunk={chunk} must be a divisor of meta_batch_size="
          f"{self.meta_batch_size}")
    k = self.steps_per_call
    if k < 1:
      raise ValueError(f"steps_per_call must be >= 1, got {k}")
    minimums = {"log_every": 1, "print_every": 1, "save_every": 1,
                "max_to_keep": 1, "val_every": 0, "pretrain_iterations": 0,
                "keep_top": 0}
    for name, minimum in minimums.items():
      if getattr(self, name) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got "
                         f"{getattr(self, name)}")
    for name in ("log_every", "print_every", "val_every", "save_every",
                 "pretrain_iterations"):
      value = getattr(self, name)
      if value % k:
        raise ValueError(f"{name}={value} must be a multiple of "
                         f"steps_per_call={k}")

  @property
  def total_iterations(self) -> int:
    return self.pretrain_iterations + self.num_iterations


# The norms and checks below reduce each tensor over one flat axis: XLA:CPU
# splits a reduction over a 2-d tensor with axes longer than 32 into 32x32
# reduce-window kernels, which its classic emitters took 12-16 s each to
# compile for LEO's 128x128 weights (the LEO demo's first call with them was
# 42 s, now 17 s).
def _flat(t: tf.Tensor) -> tf.Tensor:
  return tf.reshape(t, [-1])


def clip_gradients(grads: list, clip_value: float, clip_norm: float) -> list:
  """Clips by value, then each tensor by its own L2 norm (LEO's
  ``_clip_gradients``; the original MAML clips by value only)."""
  if clip_value > 0:
    grads = [tf.clip_by_value(g, -clip_value, clip_value) for g in grads]
  if clip_norm > 0:
    grads = [tf.reshape(tf.clip_by_norm(_flat(g), clip_norm), tf.shape(g))
             for g in grads]
  return grads


def all_finite(loss: tf.Tensor, grads: list) -> tf.Tensor:
  checks = [tf.reduce_all(tf.math.is_finite(_flat(t)))
            for t in [loss] + list(grads)]
  return tf.reduce_all(tf.stack(checks))


def chunked_gradients(compute: Callable, batch: TaskBatch,
                      tasks_per_chunk: int):
  """Averages ``compute`` over chunks of a batch's tasks, in a compiled loop.

  ``compute(chunk)`` returns a nested structure of floating tensors, each a
  mean over the chunk's tasks: the objective, its metrics and their
  gradients. Their mean over the chunks is then the whole batch's value (in
  exact arithmetic) whenever the objective is a mean of per-task terms that
  do not interact, as in every MAML-family learner here (batch norm's
  statistics are per task), plus terms that do not depend on the tasks.
  ``compute`` is traced once, for one chunk, and runs in a ``tf.while_loop``,
  so XLA compiles one chunk's program instead of the whole meta-batch's
  unrolled: a shorter first call, less memory, and buffers that stay in the
  caches (README, Performance).

  Args:
    compute: ``TaskBatch`` of ``tasks_per_chunk`` tasks -> nested tensors.
    batch: a ``TaskBatch`` of T tasks, T static and a multiple of
      ``tasks_per_chunk``.
    tasks_per_chunk: C, tasks per chunk.

  Returns:
    ``compute``'s structure, averaged over the T / C chunks.
  """
  tasks = int(batch.support_x.shape[0])
  if tasks % tasks_per_chunk:
    raise ValueError(f"tasks_per_chunk={tasks_per_chunk} must divide the "
                     f"{tasks} tasks of a meta-batch")
  num_chunks = tasks // tasks_per_chunk
  spec = TaskBatch(*(tf.TensorSpec([tasks_per_chunk, *t.shape[1:]], t.dtype)
                     for t in batch))
  # A concrete function gives the outputs' structure for the loop's initial
  # values without tracing ``compute`` a second time.
  fn = tf.function(compute, autograph=False).get_concrete_function(spec)

  def body(i, total):
    begin = i * tasks_per_chunk
    chunk = TaskBatch(*(
        tf.slice(t, [begin] + [0] * (t.shape.rank - 1),
                 [tasks_per_chunk] + t.shape[1:].as_list()) for t in batch))
    return i + 1, tf.nest.map_structure(tf.add, total, fn(chunk))

  zeros = tf.nest.map_structure(lambda t: tf.zeros(t.shape, t.dtype),
                                fn.structured_outputs)
  # No maximum_iterations: its second counter hid the trip count from XLA
  # (and from the benchmark's FLOP count) in the MAML step's program.
  _, total = tf.while_loop(lambda i, _: i < num_chunks, body,
                           (tf.constant(0), zeros), parallel_iterations=1)
  return tf.nest.map_structure(lambda t: t / num_chunks, total)


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
  lr = config.meta_lr
  if config.lr_schedule == "cosine":
    lr = keras.optimizers.schedules.CosineDecay(
        # Over the meta-training iterations: pretraining has its own Adam,
        # and this one's step count starts with meta-training.
        config.meta_lr, max(config.num_iterations, 1),
        alpha=config.min_meta_lr / config.meta_lr if config.meta_lr else 0.0)
  return keras.optimizers.Adam(lr, epsilon=config.adam_epsilon)


class Trainer:
  """Owns the optimiser, the compiled meta-step, summaries and checkpoints.

  Args:
    learner: see the module docstring.
    config: a ``TrainConfig``.
  """

  def __init__(self, learner, config: TrainConfig):
    self.learner = learner
    self.config = config
    self.variables = list(learner.trainable_variables)
    self.optimizer = make_optimizer(config)
    self.optimizer.build(self.variables)
    # The original's pretrain_op is a separate AdamOptimizer, so meta-training
    # starts with fresh moments; only runs that pretrain checkpoint it.
    self.pretrain_optimizer = None
    if config.pretrain_iterations:
      self.pretrain_optimizer = keras.optimizers.Adam(
          config.meta_lr, epsilon=config.adam_epsilon)
      self.pretrain_optimizer.build(self.variables)
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.nonfinite_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                       name="nonfinite_steps")
    self.checkpoint = tf.train.Checkpoint(**self._checkpointed())
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(config.run_dir, "checkpoints"),
        max_to_keep=config.max_to_keep, checkpoint_name="model")
    self._functions: dict = {}
    self.best_value = -math.inf
    self.top: list[dict] = []  # keep_top's entries, best first
    # Set (by a signal handler, say) to end ``train`` after the current
    # call, with a checkpoint of the step reached; it stays set (a later
    # ``train`` stops after one call) until cleared.
    self.stop_requested = threading.Event()
    self.in_training = False  # inside train's loop of compiled calls
    if config.log:
      os.makedirs(config.run_dir, exist_ok=True)
      self.writer = tf.summary.create_file_writer(config.run_dir)
    else:
      self.writer = tf.summary.create_noop_writer()

  def write_text(self, tag: str, text: str) -> None:
    """A text summary (e.g. the flags) at the current step."""
    with self.writer.as_default():
      tf.summary.text(tag, text, step=int(self.step.numpy()))

  # ------------------------------------------------------------ compiled step
  def _objective(self, pretrain: bool) -> Callable:
    return self.learner.pretrain_loss if pretrain else self.learner.meta_loss

  def tasks_per_chunk(self, num_tasks: int) -> int:
    """C: tasks a meta-step of ``num_tasks`` tasks differentiates at once
    (``TrainConfig.tasks_per_chunk``, else the learner's default)."""
    chunk = self.config.tasks_per_chunk
    if chunk is None:
      default = getattr(self.learner, "default_tasks_per_chunk", None)
      chunk = num_tasks if default is None else default(num_tasks)
    return chunk

  def _gradients(self, batch: TaskBatch, step, pretrain: bool, phase=None):
    """``(loss, metrics, grads)`` of the objective on ``batch``."""
    objective = self._objective(pretrain)
    with tf.GradientTape() as tape:
      loss, metrics = (objective(batch, step) if phase is None else
                       objective(batch, step, phase=phase))
    grads = tape.gradient(loss, self.variables,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, metrics, grads

  def _chunked_gradients(self, batch: TaskBatch, step, pretrain: bool,
                         phase, tasks_per_chunk: int):
    """``_gradients`` averaged over chunks of tasks (``chunked_gradients``),
    with the learner's ``pending_statistics`` carried out of the loop."""
    learner = self.learner

    def compute(chunk):
      loss, metrics, grads = self._gradients(chunk, step, pretrain, phase)
      pending = getattr(learner, "pending_statistics", None) or []
      return loss, metrics, grads, pending

    loss, metrics, grads, pending = chunked_gradients(compute, batch,
                                                      tasks_per_chunk)
    if pending:
      learner.pending_statistics = pending
    return loss, metrics, grads

  def _single_step(self, batch: TaskBatch, step, pretrain: bool, phase=None):
    num_tasks = int(batch.support_x.shape[0])
    chunk = self.tasks_per_chunk(num_tasks)
    loss, metrics, grads = (
        self._gradients(batch, step, pretrain, phase) if chunk == num_tasks
        else self._chunked_gradients(batch, step, pretrain, phase, chunk))
    finite = all_finite(loss, grads)
    fallback = getattr(self.learner, "fallback_gradients", None)

    def apply(gradients):
      if pretrain:  # the original's pretrain_op: plain Adam, no clipping
        self.pretrain_optimizer.apply(gradients, self.variables)
        return tf.constant(0)
      gradients = clip_gradients(gradients, self.config.clip_value,
                                 self.config.clip_norm)
      self.optimizer.apply(gradients, self.variables)
      return tf.constant(0)

    if fallback is not None:
      apply([tf.where(finite, g, r) for g, r in zip(grads, fallback())])
    else:  # skip the update: Adam with zero gradients would still move
      tf.cond(finite, lambda: apply(grads), lambda: tf.constant(0))
    self.nonfinite_steps.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
    update_state = getattr(self.learner, "update_state", None)
    if update_state is not None:
      update_state(finite)
    metrics = dict(metrics, loss=loss)
    # A skipped (or replaced) step reports NaN for every metric, and the
    # logged means cover the other steps only: with a dynamic float16 loss
    # scale, overflowing steps are routine and would otherwise turn a whole
    # summary interval's means into NaN.
    return {k: tf.where(finite, tf.cast(v, tf.float32), float("nan"))
            for k, v in metrics.items()}

  def _block(self, block: TaskBatch, start_step, pretrain: bool, phase=None):
    """Runs the meta-steps of one block; returns per-step metrics ``[k]``."""
    k = int(block.support_x.shape[0])
    if k == 1:
      metrics = self._single_step(TaskBatch(*(t[0] for t in block)),
                                  start_step, pretrain, phase)
      return {n: v[None] for n, v in metrics.items()}
    names = self._metric_names(TaskBatch(*(t[0] for t in block)), pretrain)

    def body(i, arrays):
      batch = TaskBatch(*(t[i] for t in block))
      metrics = self._single_step(batch, start_step + tf.cast(i, tf.int64),
                                  pretrain, phase)
      return i + 1, {n: arrays[n].write(i, metrics[n]) for n in names}

    arrays = {n: tf.TensorArray(tf.float32, size=k) for n in names}
    # One iteration at a time: each step reads the variables the previous
    # one updated. (Without XLA, TensorFlow's executor would otherwise start
    # up to 10 iterations concurrently; XLA runs them in order anyway.)
    _, arrays = tf.while_loop(lambda i, _: i < k, body, (tf.constant(0), arrays),
                              parallel_iterations=1)
    return {n: a.stack() for n, a in arrays.items()}

  def _metric_names(self, batch: TaskBatch, pretrain: bool) -> list[str]:
    """Names of the objective's metrics, found by tracing it (no execution):
    the step loop needs them to allocate its per-step outputs."""
    key = ("names", pretrain)
    if key not in self._functions:
      spec = TaskBatch(*(tf.TensorSpec(t.shape, t.dtype) for t in batch))
      fn = tf.function(
          lambda b: self._objective(pretrain)(b, tf.constant(0, tf.int64))[1],
          autograph=False)
      outputs = fn.get_concrete_function(spec).structured_outputs
      self._functions[key] = sorted(list(outputs) + ["loss"])
    return self._functions[key]

  def train_function(self, pretrain: bool = False,
                     phase=None) -> Callable:
    """The compiled meta-step: ``(block, start_step) -> per-step metrics``.

    ``block`` is a ``TaskBatch`` whose fields have a leading ``[k]`` axis (k
    meta-steps per call); ``start_step`` is an int64 scalar. Each call updates
    the variables and the optimiser. ``phase``: the learner's ``phase(step)``
    for every step of the calls (see the module docstring). (Benchmarks call
    it directly.)
    """
    key = ("train", pretrain, phase)
    if key not in self._functions:
      # No autograph: the learners' Python loops run over static ranges and
      # their loops/conditionals are explicit tf.while_loop/tf.cond, so
      # converting the code would only cost tracing time.
      self._functions[key] = tf.function(
          lambda block, step: self._block(block, step, pretrain, phase),
          jit_compile=self.config.jit_compile, autograph=False)
    return self._functions[key]

  def phase(self, start: int, steps: int):
    """The learner's phase for meta-steps ``start .. start + steps - 1``
    (None: it has none).

    Raises:
      ValueError: the phase changes inside those steps (one compiled call).
    """
    phase_of = getattr(self.learner, "phase", None)
    if phase_of is None:
      return None
    phase, last = phase_of(start), phase_of(start + steps - 1)
    if last != phase:
      raise ValueError(
          f"meta-steps {start}-{start + steps - 1} run in one call "
          f"(steps_per_call={steps}) but span two phases of "
          f"{type(self.learner).__name__} ({phase} and {last}); choose a "
          "steps_per_call that divides the phases' lengths")
    return phase

  def _evaluate_function(self) -> Callable:
    if "evaluate" not in self._functions:
      self._functions["evaluate"] = tf.function(
          self.learner.evaluate, jit_compile=self.config.jit_compile,
          autograph=False)
    return self._functions["evaluate"]

  # ---------------------------------------------------------- checkpointing
  def _checkpointed(self, weights_only: bool = False) -> dict:
    """The objects a checkpoint holds (the learner and the step alone for
    ``weights_only``)."""
    objects = {"learner": self.learner, "step": self.step}
    if not weights_only:
      objects.update(optimizer=self.optimizer,
                     nonfinite_steps=self.nonfinite_steps)
      if self.pretrain_optimizer is not None:
        objects["pretrain_optimizer"] = self.pretrain_optimizer
    return objects

  def restore(self, checkpoint_path: str | None = None,
              weights_only: bool = False) -> int:
    """Restores a checkpoint (default: the latest); returns the step.

    Args:
      checkpoint_path: a checkpoint prefix, e.g. from ``best_checkpoint/``.
      weights_only: restore the learner and the step only (evaluation), not
        the optimiser state.
    """
    if checkpoint_path:
      self._read(checkpoint_path, weights_only)
      return int(self.step.numpy())
    # The latest readable checkpoint: a damaged file (a full disk, a copy
    # cut short) costs the steps since the one before it, not the run.
    checkpoints = checkpoints_in(self.manager.directory)
    for i in reversed(range(len(checkpoints))):
      try:
        self._read(checkpoints[i], weights_only)
        break
      except CheckpointUnreadableError as e:
        if not i:
          raise CheckpointUnreadableError(
              f"{e}, and {self.manager.directory} holds no readable "
              "checkpoint before it") from e
        logging.warning("%s; resuming from %s instead.", e,
                        checkpoints[i - 1])
    return int(self.step.numpy())

  def using_run_directory(self, exclusive: bool):
    """The run directory's lock (``io_utils.run_directory_lock``): exclusive
    to train, shared to evaluate; re-entrant within the process.

    Raises:
      io_utils.RunDirectoryBusyError: another process holds it.
    """
    return io_utils.run_directory_lock(self.config.run_dir, exclusive)

  def _read(self, path: str, weights_only: bool) -> None:
    """Reads checkpoint ``path`` into the learner (and optimiser)."""
    # ``read``, not ``restore``: best checkpoints are written with
    # ``Checkpoint.write``, which stores no save counter (none at all
    # before the first regular save), and ``restore`` would demand one.
    try:
      status = tf.train.Checkpoint(**self._checkpointed(weights_only)).read(
          path)
    except (tf.errors.OpError, IndexError) as e:  # truncated or missing
      raise CheckpointUnreadableError(
          f"checkpoint {path} is unreadable ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    status.assert_existing_objects_matched()
    if weights_only:
      status.expect_partial()
    logging.info("Restored %s (step %d).", path, int(self.step.numpy()))

  def save(self) -> str:
    path = self.manager.save(checkpoint_number=int(self.step.numpy()))
    logging.info("Saved checkpoint %s", path)
    return path

  def _replace_directory(self, name: str,
                         fill: Callable[[str], None]) -> str:
    """Replaces ``run_dir/<name>`` atomically with what ``fill(tmp_dir)``
    writes into a fresh temporary directory; returns the directory."""
    directory = os.path.join(self.config.run_dir, name)
    tmp_dir = os.path.join(self.config.run_dir, "tmp_" + name)
    if os.path.exists(tmp_dir):
      shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir)
    fill(tmp_dir)
    atomic_replace_dir(tmp_dir, directory)
    return directory

  def save_best(self, value: float) -> None:
    """Copies the current weights to ``run_dir/best_checkpoint`` atomically
    (written to a temporary directory, then renamed), with the value."""
    step = int(self.step.numpy())

    def fill(tmp_dir):
      prefix = self.checkpoint.write(os.path.join(tmp_dir, f"model-{step}"))
      atomic_write(os.path.join(tmp_dir, "best.json"), json.dumps(
          {"step": step, "metric": self.config.keep_best, "value": value,
           "checkpoint": os.path.basename(prefix)}))

    best_dir = self._replace_directory("best_checkpoint", fill)
    logging.info("New best meta-validation %s = %.4f at step %d -> %s",
                 self.config.keep_best, value, step, best_dir)

  def save_top(self, value: float) -> None:
    """Keeps the current weights among the ``keep_top`` best in
    ``run_dir/top_checkpoints`` when ``value`` ranks there (a tie keeps the
    earlier), replacing the directory atomically with its ``top.json``.
    They are weights-only checkpoints: ``restore(path, weights_only=True)``
    reads them."""
    c = self.config
    if not math.isfinite(value):  # (as save_best's ">" never keeps one)
      return
    step = int(self.step.numpy())
    entry = {"step": step, "value": value, "checkpoint": f"model-{step}"}
    # (A run resumed from before a validation it already made repeats it.)
    ranked = sorted([e for e in self.top if e["step"] != step] + [entry],
                    key=lambda e: -e["value"])[:c.keep_top]
    if entry not in ranked:
      return
    old_dir = os.path.join(c.run_dir, TOP_DIR)

    def fill(tmp_dir):
      for kept in ranked:
        if kept is not entry:
          for path in glob.glob(os.path.join(glob.escape(old_dir),
                                             kept["checkpoint"] + ".*")):
            shutil.copy2(path, tmp_dir)
      # The weights alone (a third of a checkpoint with Adam's moments): an
      # ensemble member is only ever restored to be evaluated.
      tf.train.Checkpoint(**self._checkpointed(weights_only=True)).write(
          os.path.join(tmp_dir, entry["checkpoint"]))
      atomic_write(os.path.join(tmp_dir, "top.json"), json.dumps(
          {"metric": c.keep_best, "checkpoints": ranked}, indent=1))

    top_dir = self._replace_directory(TOP_DIR, fill)
    self.top = ranked
    logging.info("Meta-validation %s = %.4f at step %d is number %d of the "
                 "%d best -> %s", c.keep_best, value, step,
                 ranked.index(entry) + 1, c.keep_top, top_dir)

  # ------------------------------------------------------------------ loop
  def write_eval_summaries(self, prefix: str, results: dict, step: int,
                           exclude=()) -> None:
    """Writes the means of per-task evaluation results (``evaluate``'s
    dict) as ``prefix/...`` scalars at ``step``, except the tags in
    ``exclude``; a ``[T, S]`` result gives one scalar per inner step."""
    scalars = {}
    for name, values in results.items():
      values = np.asarray(values, np.float64)
      mean = np.atleast_1d(evaluation.summarize(values)["mean"])
      if values.ndim == 2:
        for j, m in enumerate(mean):
          scalars[f"{prefix}/pre_update_{name}" if j == 0 else
                  f"{prefix}/post_update_{name}_step_{j}"] = m
      else:
        scalars[f"{prefix}/{name}"] = mean[0]
    with self.writer.as_default():
      for tag, value in scalars.items():
        if tag not in exclude:
          tf.summary.scalar(tag, value, step=step)

  def _validation_sizes(self) -> tuple[int, int]:
    """``(tasks, tasks per call)`` of a meta-validation."""
    c = self.config
    num_tasks = c.val_num_tasks or c.meta_batch_size
    return num_tasks, c.val_batch_size or min(num_tasks, c.meta_batch_size)

  def validate(self, val_source, index: int = 0) -> dict:
    """Meta-validation number ``index`` (0, 1, ...): ``val_num_tasks`` tasks
    of ``val_source``, the first ones for every index with
    ``val_fixed_tasks``, else the index-th block of them."""
    num_tasks, batch_size = self._validation_sizes()
    first_batch = (0 if self.config.val_fixed_tasks else
                   index * -(-num_tasks // batch_size))
    result = evaluation.evaluate(
        self._evaluate_function(), val_source, num_tasks, batch_size,
        start_index=first_batch, jit_compile=None)  # already compiled
    return result.values

  def trace_validation(self, val_source) -> None:
    """Traces the evaluation for validation batches now, at a name aligned
    by ``align_trace_names``.

    A run that validates before its first meta-step (LEO) calls this before
    it, fresh or resumed, so both trace the same functions in the same order
    and a resumed run finds every program in the XLA cache.
    """
    evaluation.align_trace_names()
    self._evaluate_function().get_concrete_function(evaluation.tensor_batch(
        val_source, 0, self._validation_sizes()[1]))

  def train(self, train_source, val_source=None) -> dict:
    """Runs (or resumes) meta-training to ``total_iterations``, holding the
    run directory's exclusive lock (``using_run_directory``).

    ``stop_requested`` ends it early, after the current call, with a
    checkpoint of the step reached.

    Returns:
      ``{"step", "seconds", "first_call_seconds", "nonfinite_steps",
      "stopped"}``: the final step, the wall time, the first compiled call's
      time, the number of steps skipped as non-finite and whether
      ``stop_requested`` ended it; only ``{"step"}`` when the run had already
      reached ``total_iterations``.
    """
    with self.using_run_directory(exclusive=True):
      self.in_training = True
      try:
        return self._train(train_source, val_source)
      finally:
        self.in_training = False

  def _train(self, train_source, val_source) -> dict:
    c = self.config
    os.makedirs(c.run_dir, exist_ok=True)
    # A save or a results file killed midway leaves TensorFlow's staging
    # folder or a temporary file; nothing else writes here while the lock
    # is held.
    for staging in glob.glob(os.path.join(
        glob.escape(self.manager.directory), "*_temp")):
      shutil.rmtree(staging, ignore_errors=True)
    io_utils.remove_stale_temporary_files(c.run_dir)
    if c.resume:
      self.restore()
    evaluation.align_trace_names()
    recover_replaced_dir(os.path.join(c.run_dir, "best_checkpoint"))
    best_file = os.path.join(c.run_dir, "best_checkpoint", "best.json")
    if c.keep_best and os.path.exists(best_file):
      with open(best_file) as f:  # never overwrite a better earlier best
        self.best_value = float(json.load(f)["value"])
    if c.keep_top:
      self.top = [{k: e[k] for k in ("step", "value", "checkpoint")}
                  for e in top_checkpoints(c.run_dir)]
    start = int(self.step.numpy())
    total = c.total_iterations
    writer = self.writer
    if start >= total:
      logging.info("Nothing to train: step %d >= %d.", start, total)
      return {"step": start}
    # Before any step: a call may not span two of the learner's phases.
    for first in range(max(start, c.pretrain_iterations), total,
                       c.steps_per_call):
      self.phase(first, min(c.steps_per_call, total - first))
    chunk = self.tasks_per_chunk(c.meta_batch_size)
    logging.info("Meta-training from step %d to %d (%d tasks/step%s, %d "
                 "steps per call, XLA %s).", start, total, c.meta_batch_size,
                 f" in chunks of {chunk}" if chunk < c.meta_batch_size else "",
                 c.steps_per_call, c.jit_compile)
    dataset = data_lib.task_dataset(train_source, c.meta_batch_size, start,
                                    total, block=c.steps_per_call)
    window: dict[str, list] = {}
    first_call = None
    wall_start = time.time()
    window_start, window_steps = time.time(), 0
    input_seconds = 0.0
    last_batch = None
    step = start
    fetch_start = time.time()
    for block in dataset:
      input_seconds += time.time() - fetch_start
      if c.steps_per_call == 1:
        block = TaskBatch(*(t[None] for t in block))
      k_block = int(block.support_x.shape[0])
      pretrain = step < c.pretrain_iterations
      call_start = time.time()
      if first_call is None:
        logging.info("Compiling the meta-step%s (first call)...",
                     " with XLA" if c.jit_compile else "")
      phase = None if pretrain else self.phase(step, k_block)
      metrics = self.train_function(pretrain, phase)(
          block, tf.constant(step, tf.int64))
      metrics = {k: v.numpy() for k, v in metrics.items()}
      if first_call is None:
        first_call = time.time() - call_start
        logging.info("First meta-step call (trace + compile) took %.1f s.",
                     first_call)
        with writer.as_default():
          tf.summary.scalar("metatrain/first_call_seconds", first_call,
                            step=step)
        window_start, window_steps, input_seconds = time.time(), 0, 0.0
      else:
        window_steps += len(next(iter(metrics.values())))
      k = len(next(iter(metrics.values())))
      step += k
      self.step.assign(step)
      for name, values in metrics.items():
        window.setdefault(name, []).extend(values.tolist())
      last_batch = TaskBatch(*(t[-1] for t in block))

      if step % c.log_every == 0 or step == total:
        elapsed = max(time.time() - window_start, 1e-9)
        rate = window_steps / elapsed if window_steps else float("nan")
        with writer.as_default():
          for name, values in window.items():
            tf.summary.scalar(f"metatrain/{name}", finite_mean(values),
                              step=step)
          if window_steps:
            tf.summary.scalar("metatrain/steps_per_sec", rate, step=step)
            tf.summary.scalar("metatrain/input_seconds_per_step",
                              input_seconds / window_steps, step=step)
          lr = self.optimizer.learning_rate
          tf.summary.scalar("metatrain/meta_lr", float(np.asarray(lr)),
                            step=step)
          tf.summary.scalar("metatrain/nonfinite_steps",
                            int(self.nonfinite_steps.numpy()), step=step)
          if not pretrain:
            results = self._evaluate_function()(last_batch)
            # The training means above keep their tags (LEO's training
            # metrics and its evaluation share the names query_loss and
            # query_accuracy).
            self.write_eval_summaries("metatrain", results, step,
                                      {f"metatrain/{n}" for n in window})
        if step % c.print_every == 0 or step == total:
          eta = (total - step) / rate if window_steps else float("nan")
          parts = " ".join(f"{n}={finite_mean(v):.4f}"
                           for n, v in sorted(window.items()))
          skipped = int(self.nonfinite_steps.numpy())
          if skipped:  # else a diverged run would only show NaN means
            parts += f" | {skipped} non-finite steps skipped so far"
          logging.info("%sstep %d/%d | %s | %.1f steps/s | ETA %s",
                       "pretrain " if pretrain else "", step - (
                           0 if pretrain else c.pretrain_iterations),
                       c.pretrain_iterations if pretrain else c.num_iterations,
                       parts, rate, _format_seconds(eta))
        window = {}
        window_start, window_steps, input_seconds = time.time(), 0, 0.0

      if (val_source is not None and c.val_every and step % c.val_every == 0
          and step > c.pretrain_iterations):
        # Numbered by step, so a resumed run validates on the same tasks.
        results = self.validate(val_source, step // c.val_every - 1)
        self.write_eval_summaries("metaval", results, step)
        summary = {n: float(np.atleast_1d(evaluation.summarize(v)["mean"])[-1])
                   for n, v in results.items()}
        logging.info("Validation at step %d: %s", step,
                     " ".join(f"{n}={v:.4f}" for n, v in sorted(summary.items())))
        if c.keep_best and summary[c.keep_best] > self.best_value:
          self.best_value = summary[c.keep_best]
          self.save_best(self.best_value)
        if c.keep_top:
          self.save_top(summary[c.keep_best])
        window_start = time.time()
      saved = step % c.save_every == 0 or step == total
      if saved:
        self.save()
        window_start = time.time()
      if self.stop_requested.is_set() and step < total:
        if not saved:
          self.save()
        logging.warning("Stopped at step %d of %d, as requested; the same "
                        "command resumes from this checkpoint.", step, total)
        break
      fetch_start = time.time()
    writer.flush()
    wall = time.time() - wall_start
    skipped = int(self.nonfinite_steps.numpy())
    if skipped:
      logging.warning(
          "%d of %d steps were skipped: their loss or gradients were not "
          "finite (metatrain/nonfinite_steps in TensorBoard).", skipped, step)
    return {"step": step, "seconds": wall, "first_call_seconds": first_call,
            "nonfinite_steps": skipped, "stopped": step < total}


TOP_DIR = "top_checkpoints"


def top_checkpoints(run_dir: str) -> list[dict]:
  """``TrainConfig.keep_top``'s checkpoints of a run, best first: dicts of
  ``step``, ``value`` (the meta-validation mean) and ``checkpoint`` (a name
  in ``run_dir/top_checkpoints``) plus ``path`` (its prefix); empty when the
  run kept none. Call it under the run directory's lock: it first puts back
  a version that a kill left set aside (``io_utils.recover_replaced_dir``).

  Raises:
    CheckpointUnreadableError: ``top.json`` is damaged.
  """
  directory = os.path.join(run_dir, TOP_DIR)
  recover_replaced_dir(directory)
  info = os.path.join(directory, "top.json")
  try:
    with open(info) as f:
      entries = json.load(f)["checkpoints"]
    for e in entries:
      if not (isinstance(e["step"], int) and
              isinstance(e["value"], (int, float)) and
              math.isfinite(e["value"]) and isinstance(e["checkpoint"], str)
              and os.path.basename(e["checkpoint"]) == e["checkpoint"]):
        raise ValueError(f"malformed entry {e!r}")
      if not os.path.exists(os.path.join(directory,
                                         e["checkpoint"] + ".index")):
        raise ValueError(f"it lists {e['checkpoint']}, which is not there")
  except FileNotFoundError:
    return []
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointUnreadableError(
        f"{info} is unreadable ({type(e).__name__}: {e})") from e
  return [dict(e, path=os.path.join(directory, e["checkpoint"]))
          for e in entries]


def checkpoints_in(directory: str) -> list[str]:
  """The checkpoint prefixes in ``directory``, oldest first: those its
  ``checkpoint`` state file lists, and any complete one it does not (a run
  killed between writing a checkpoint and the state file); none when the
  directory does not exist."""
  state = tf.train.get_checkpoint_state(directory)
  listed = list(state.all_model_checkpoint_paths) if state else []
  listed = [p if os.path.isabs(p) else os.path.join(directory, p)
            for p in listed]
  for index in glob.glob(os.path.join(glob.escape(directory), "*.index")):
    prefix = index[:-len(".index")]
    if prefix not in listed:
      listed.append(prefix)

  def number(prefix):
    found = re.search(r"-(\d+)$", prefix)
    return int(found.group(1)) if found else -1
  return sorted(listed, key=number)


def finite_mean(values: list) -> float:
  """The mean over the steps that were applied (NaN if there were none)."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  return float(finite.mean()) if finite.size else float("nan")


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
