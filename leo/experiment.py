"""LEO's training and evaluation protocol (deepmind/leo ``runner.py``).

* Meta-training: ``num_steps_limit`` Adam steps on batches of 12 tasks with 15
  queries per class; gradients clipped by value, then each tensor by norm; the
  NaN fallback of ``LEO.fallback_gradients``.
* Every ``checkpoint_steps``: a checkpoint, and meta-validation accuracy over
  ``10 x metavalid_batch_size`` tasks (the same tasks every time, all
  remaining images of each class as queries); the best one is copied
  atomically to ``<checkpoint_path>/best_checkpoint``.
* Test (``evaluation_mode``, or after training): the best checkpoint (the
  original restores the latest one unless pointed at ``best_checkpoint``,
  deepmind/leo issue #9) over 10,000 tasks, with a 95% CI.

Evaluation runs ``eval_batch_size`` tasks per compiled call: a 200-task batch
with 599 queries per class would hold 1.5 GB of embeddings at once.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from absl import logging

from leo import data as data_lib
from leo.config import DataConfig, ModelConfig, OuterConfig
from leo.model import LEO
from maml_tf import evaluation, io_utils
from maml_tf.io_utils import recover_replaced_dir
from maml_tf.training import Trainer, TrainConfig, checkpoints_in

BEST_DIR = "best_checkpoint"
# Errors caused by the data or the flags, reported without a traceback.
DATA_ERRORS = (data_lib.EmbeddingsError, data_lib.UnsafePickleError,
               FileNotFoundError)
RESULTS_BASENAME = "metatest"


def train_config(outer: OuterConfig, seed: int = 0, jit_compile: bool = True,
                 steps_per_call: int = 1, log: bool = True) -> TrainConfig:
  """The Trainer settings of the original's loop (``log``: write
  TensorBoard summaries)."""
  log_every = max(outer.checkpoint_steps // 2, steps_per_call)
  save_every = max(outer.checkpoint_steps, steps_per_call)
  return TrainConfig(
      run_dir=outer.checkpoint_path,
      num_iterations=outer.num_steps_limit,
      meta_batch_size=outer.metatrain_batch_size,
      meta_lr=outer.outer_lr,
      adam_epsilon=1e-8,  # TF1's AdamOptimizer
      clip_value=max(outer.gradient_threshold, 0.0),
      clip_norm=max(outer.gradient_norm_threshold, 0.0),
      log_every=log_every,
      print_every=log_every,
      val_every=0 if outer.evaluation_mode else save_every,
      val_num_tasks=outer.num_metavalid_tasks,
      val_fixed_tasks=True,
      val_batch_size=outer.eval_batch_size,
      save_every=save_every,
      max_to_keep=5,  # tf.train.Saver's default
      keep_best="query_accuracy",
      steps_per_call=steps_per_call,
      jit_compile=jit_compile,
      resume=True,
      seed=seed,
      log=log)


def find_checkpoint(run_dir: str, recover: bool = True
                    ) -> tuple[str | None, str]:
  """The checkpoint to test: ``best_checkpoint`` when there is one (also when
  ``run_dir`` is itself a best-checkpoint directory), else the latest.

  Args:
    run_dir: the run directory.
    recover: first put back a best checkpoint that a kill left set aside
      (``io_utils.recover_replaced_dir``); only under the run directory's
      lock, lest it race a training process's replacement.

  Returns:
    ``(path or None, 'best' | 'latest')``.
  """
  if recover:
    recover_replaced_dir(os.path.join(run_dir, BEST_DIR))
  for directory in (os.path.join(run_dir, BEST_DIR), run_dir):
    info_file = os.path.join(directory, "best.json")
    if os.path.exists(info_file):
      with open(info_file) as f:
        info = json.load(f)
      return os.path.join(directory, info["checkpoint"]), "best"
  paths = checkpoints_in(os.path.join(run_dir, "checkpoints"))
  return (paths[-1] if paths else None), "latest"


def checkpoint_to_test(run_dir: str) -> tuple[str, str]:
  """``find_checkpoint``'s ``(path, 'best' or 'latest')``.

  Raises:
    FileNotFoundError: if the run directory holds no checkpoint.
  """
  path, which = find_checkpoint(run_dir)
  if path is None:
    raise FileNotFoundError(
        f"--checkpoint_path={run_dir}: no checkpoint (neither {BEST_DIR}/ "
        "nor checkpoints/); train first or point --checkpoint_path at a run "
        "directory.")
  return path, which


def evaluate_test(learner: LEO, trainer: Trainer, test_source,
                  outer: OuterConfig, jit_compile: bool = True) -> dict:
  """Restores the best checkpoint and evaluates the test tasks, holding the
  run directory's shared lock (no training process writes it meanwhile).

  Writes ``metatest.{csv,json,npz}`` into the run directory (atomically) and
  ``metatest/query_accuracy`` to TensorBoard.

  Returns:
    ``{"accuracy", "ci95", "num_tasks", "step", "checkpoint", "which",
    "seconds", "paths"}``.

  Raises:
    FileNotFoundError: if the run directory holds no checkpoint.
    io_utils.RunDirectoryBusyError: if another process is training there.
  """
  run_dir = outer.checkpoint_path
  with trainer.using_run_directory(exclusive=False):
    path, which = checkpoint_to_test(run_dir)
    if which == "latest":
      logging.warning("No %s in %s: testing the latest checkpoint %s.",
                      BEST_DIR, run_dir, path)
    step = trainer.restore(path, weights_only=True)
    num_tasks = outer.num_metatest_tasks_rounded
    logging.info("Meta-testing the %s checkpoint (step %d) on %d tasks, %d "
                 "per call...", which, step, num_tasks, outer.eval_batch_size)
    result = evaluation.evaluate(learner.evaluate, test_source, num_tasks,
                                 outer.eval_batch_size,
                                 jit_compile=jit_compile)
    result.warn_nonfinite()
    paths = result.write(run_dir, RESULTS_BASENAME)
    summary = result.summary["query_accuracy"]
    trainer.write_eval_summaries("metatest", result.values, step)
    trainer.writer.flush()
  return {"accuracy": float(summary["mean"]), "ci95": float(summary["ci95"]),
          "num_tasks": num_tasks, "step": step, "checkpoint": path,
          "which": which, "seconds": result.seconds, "paths": paths}


def validate_at_start(trainer: Trainer, val_source) -> float:
  """Meta-validation before the first step, as the original's loop does at
  step 0 (it also keeps that checkpoint if it is the best so far)."""
  results = trainer.validate(val_source)
  value = float(evaluation.summarize(results["query_accuracy"])["mean"])
  logging.info("Validation at step 0: query_accuracy=%.4f", value)
  # The accuracy only: the original's step-0 validation logs nothing else.
  trainer.write_eval_summaries(
      "metaval", {"query_accuracy": results["query_accuracy"]}, 0)
  info = os.path.join(trainer.config.run_dir, BEST_DIR, "best.json")
  if not os.path.exists(info):
    trainer.best_value = value
    trainer.save_best(value)
  return value


def run(data_config: DataConfig, model_config: ModelConfig,
        outer: OuterConfig, *, seed: int = 0, jit_compile: bool = True,
        steps_per_call: int = 1, test_after_train: bool = True,
        log: bool = True,
        before_training: Callable[[Trainer], None] | None = None
        ) -> dict:
  """Meta-trains (resuming if possible) and/or tests, as ``runner.py``.

  ``before_training(trainer)`` is called once the training data has loaded
  (the runner records the run's flags then, in files and in TensorBoard).

  Returns:
    ``{"train": Trainer.train's dict or None, "test": evaluate_test's dict or
    None}``.
  """
  def load(splits):
    sources = data_lib.task_sources(
        data_config, outer.num_classes, outer.num_tr_examples_per_class,
        outer.num_val_examples_per_class, seed=seed, splits=splits)
    for source in sources.values():
      (width,) = source.dataset.example_shape
      if width != model_config.embedding_dim:
        raise data_lib.EmbeddingsError(
            f"{source.dataset.name}: embeddings are {width}-d, the model "
            f"expects {model_config.embedding_dim}")
    return sources

  learner = LEO(model_config)
  config = train_config(outer, seed, jit_compile, steps_per_call, log)
  run_dir = outer.checkpoint_path
  # The run directory gets its lock, then the Trainer's TensorBoard file,
  # only once the data (and, to evaluate, a checkpoint) is known to be
  # there: a command that fails on its input, or is refused the lock, leaves
  # nothing behind. Exclusive to train (the step-0 best checkpoint and the
  # test after training included), shared to evaluate.
  results = {"train": None, "test": None}
  if outer.evaluation_mode:
    if find_checkpoint(run_dir, recover=False)[0] is None:
      checkpoint_to_test(run_dir)  # raises (unless one was set aside)
    test_source = load(("test",))["test"]
    with io_utils.run_directory_lock(run_dir, exclusive=False):
      checkpoint_to_test(run_dir)  # raises before the Trainer writes
      results["test"] = evaluate_test(learner, Trainer(learner, config),
                                      test_source, outer, jit_compile)
    return results
  if test_after_train:  # fail now, not after training, if it is missing
    data_lib.embeddings_file(data_config, "test")
  sources = load(("train", "val"))
  with io_utils.run_directory_lock(run_dir, exclusive=True):
    trainer = Trainer(learner, config)
    if before_training is not None:
      before_training(trainer)
    start = trainer.restore()
    # Fresh or resumed, the validation is traced first (the XLA cache
    # matches programs by name, and names follow the order of tracing).
    trainer.trace_validation(sources["val"])
    if start == 0:
      validate_at_start(trainer, sources["val"])
    results["train"] = trainer.train(sources["train"], sources["val"])
    logging.info("Meta-training done: %s", results["train"])
    del sources  # the test split is loaded after the train split is freed
    # A stop request (runner.py: SIGTERM, Ctrl-C) leaves the test to the
    # next run, also when it came during the last call.
    if test_after_train and not trainer.stop_requested.is_set():
      results["test"] = evaluate_test(learner, trainer, load(("test",))["test"],
                                      outer, jit_compile)
  return results
