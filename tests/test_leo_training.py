"""LEO's training protocol: exact resume, learning, the NaN fallback, the best
checkpoint, evaluation mode and the command line."""

import fcntl
import getpass
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from leo import data, experiment, synthetic
from leo.config import DataConfig, ModelConfig, OuterConfig
from leo.model import LEO
from maml_tf import evaluation, io_utils
from maml_tf.training import Trainer
from tests.conftest import run_python

# Raw 1-shot nearest neighbour: about 38%; an LDA learned on train: 64%.
SMALL = synthetic.SyntheticConfig(num_classes=(16, 6, 8), examples_per_class=30,
                                  embedding_dim=32, nuisance_dim=4,
                                  nuisance_scale=1.0, within_class_std=0.5)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("leo_small"))
  synthetic.write(root, synthetic.generate(SMALL))
  return root


def model_config(**kwargs):
  defaults = dict(inner_unroll_length=2, finetuning_unroll_length=2,
                  num_latents=8, embedding_dim=32, seed=3)
  defaults.update(kwargs)
  return ModelConfig(**defaults)


def outer_config(run_dir, **kwargs):
  defaults = dict(num_steps_limit=6, checkpoint_steps=3,
                  metatrain_batch_size=4, metavalid_batch_size=6,
                  num_metavalid_batches=1, metatest_batch_size=8,
                  num_metatest_tasks=16, eval_batch_size=4,
                  checkpoint_path=str(run_dir))
  defaults.update(kwargs)
  return OuterConfig(**defaults)


def sources(root, outer, splits=("train", "val")):
  return data.task_sources(DataConfig(root, total_examples_per_class=30),
                           outer.num_classes, outer.num_tr_examples_per_class,
                           outer.num_val_examples_per_class, splits=splits)


def train(root, run_dir, steps, jit=False, **kwargs):
  outer = outer_config(run_dir, num_steps_limit=steps, **kwargs)
  trainer = Trainer(LEO(model_config()),
                    experiment.train_config(outer, jit_compile=jit))
  s = sources(root, outer)
  trainer.train(s["train"], s["val"])
  return trainer


def test_resumed_run_is_identical(small_root, tmp_path):
  straight = train(small_root, tmp_path / "a", 6)
  train(small_root, tmp_path / "b", 3)  # "pre-empted" at step 3
  outer = outer_config(tmp_path / "b", num_steps_limit=6)
  resumed = Trainer(LEO(model_config()),
                    experiment.train_config(outer, jit_compile=False))
  # Training is deterministic, so a restart from step 0 would end the same.
  assert resumed.restore() == 3
  s = sources(small_root, outer)
  resumed.train(s["train"], s["val"])
  assert int(resumed.step.numpy()) == 6
  for a, b in zip(straight.variables, resumed.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Dropout and sampling really vary with the step (a constant seed would
  # also resume identically).
  leo = straight.learner
  batch = sources(small_root, outer_config(tmp_path))["train"].batch(0, 4)
  assert float(leo.meta_loss(batch, 1)[0]) != float(leo.meta_loss(batch, 2)[0])


def test_short_run_learns(small_root, tmp_path):
  outer = outer_config(tmp_path, num_steps_limit=300, checkpoint_steps=300,
                       outer_lr=3e-3)
  test = sources(small_root, outer, ("test",))["test"]
  test = data.task_source(test.dataset, "test", 5, 1, 29)
  trainer = Trainer(LEO(model_config()),
                    experiment.train_config(outer, jit_compile=False))

  def accuracy():
    result = evaluation.evaluate(trainer.learner.evaluate, test, 100, 50,
                                 jit_compile=False)
    return result.summary["query_accuracy"]["mean"]

  before = accuracy()
  s = sources(small_root, outer)
  trainer.train(s["train"], s["val"])
  after = accuracy()
  assert after > before + 0.1, (before, after)
  assert after > 0.45, after


class AlwaysNaN(tf.Module):
  """LEO whose meta-loss is NaN: the Trainer must apply the fallback."""

  def __init__(self, leo):
    super().__init__()
    self.leo = leo
    self.fallback_gradients = leo.fallback_gradients
    self.evaluate = leo.evaluate

  @property
  def trainable_variables(self):
    return self.leo.trainable_variables

  def meta_loss(self, batch, step, training=True):
    loss, metrics = self.leo.meta_loss(batch, step, training)
    return loss * np.nan, metrics


def test_nan_step_pulls_weights_to_zero_and_keeps_the_learning_rates(
    small_root, tmp_path):
  outer = outer_config(tmp_path, num_steps_limit=1, checkpoint_steps=1)
  leo = LEO(model_config())
  before = [v.numpy().copy() for v in leo.trainable_variables]
  trainer = Trainer(AlwaysNaN(leo), experiment.train_config(
      outer, jit_compile=False))
  trainer.train(sources(small_root, outer)["train"])
  assert int(trainer.nonfinite_steps.numpy()) == 1
  after = [v.numpy() for v in leo.trainable_variables]
  for b, a in zip(before[:5], after[:5]):
    assert np.all(np.abs(a) < np.abs(b))  # Adam step along +w: shrinks
  for b, a in zip(before[5:], after[5:]):
    np.testing.assert_array_equal(a, b)  # zero gradients: lrs unchanged


def test_find_checkpoint_prefers_the_best(tmp_path):
  assert experiment.find_checkpoint(str(tmp_path)) == (None, "latest")
  trainer = Trainer(LEO(model_config()), experiment.train_config(
      outer_config(tmp_path), jit_compile=False))
  trainer.step.assign(2)
  trainer.save_best(0.5)
  trainer.step.assign(4)
  trainer.save()
  best = os.path.join(str(tmp_path), "best_checkpoint", "model-2")
  assert experiment.find_checkpoint(str(tmp_path)) == (best, "best")
  # The original's habit: --checkpoint_path=<run>/best_checkpoint.
  assert experiment.find_checkpoint(os.path.dirname(best)) == (best, "best")
  # Killed between atomic_replace_dir's two renames: the old one comes back.
  os.rename(os.path.dirname(best), os.path.dirname(best) + ".old")
  assert experiment.find_checkpoint(str(tmp_path)) == (best, "best")
  os.rename(os.path.dirname(best), str(tmp_path / "elsewhere"))
  latest, which = experiment.find_checkpoint(str(tmp_path))
  assert which == "latest" and latest.endswith("model-4")


def test_train_then_test_then_evaluation_mode(small_root, tmp_path):
  dc = DataConfig(small_root, total_examples_per_class=30)
  outer = outer_config(tmp_path, num_steps_limit=4, checkpoint_steps=2)
  results = experiment.run(dc, model_config(), outer, jit_compile=False)
  info = json.loads((tmp_path / "best_checkpoint" / "best.json").read_text())
  test = results["test"]
  assert test["which"] == "best" and test["step"] == info["step"]
  assert test["num_tasks"] == 16
  saved = json.loads((tmp_path / "metatest.json").read_text())
  assert saved["num_tasks"] == 16
  np.testing.assert_allclose(
      saved["metrics"]["query_accuracy"]["mean"], test["accuracy"])
  assert (tmp_path / "checkpoints" / "model-4.index").exists()
  # Evaluation mode restores the same best checkpoint: the same number,
  # from a model whose own initial weights differ (another seed).
  again = experiment.run(dc, model_config(seed=4), outer_config(
      tmp_path, evaluation_mode=True, checkpoint_steps=0), jit_compile=False)
  assert again["train"] is None
  assert again["test"]["accuracy"] == test["accuracy"]
  assert again["test"]["step"] == info["step"]


def test_best_checkpoint_of_step_zero_is_tested(small_root, tmp_path):
  """No validation after step 0 beats it (here: none runs), so the test
  restores the step-0 best checkpoint, written before any regular save."""
  dc = DataConfig(small_root, total_examples_per_class=30)
  outer = outer_config(tmp_path, num_steps_limit=2, checkpoint_steps=4)
  results = experiment.run(dc, model_config(), outer, jit_compile=False)
  assert results["test"]["which"] == "best" and results["test"]["step"] == 0


def test_missing_checkpoint_and_width_mismatch_are_reported(small_root,
                                                            tmp_path):
  dc = DataConfig(small_root, total_examples_per_class=30)
  run_dir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    experiment.run(dc, model_config(), outer_config(
        run_dir, evaluation_mode=True), jit_compile=False)
  with pytest.raises(data.EmbeddingsError, match="embeddings are 32-d, the "
                     "model expects 640"):
    experiment.run(dc, ModelConfig(), outer_config(run_dir),
                   jit_compile=False)
  # Neither left a run directory (it used to get a TensorBoard file).
  assert not run_dir.exists()


# Runs experiment.run in a fresh process, as runner.py does: the XLA cache is
# process-wide configuration, read when TensorFlow starts.
_RUN_IN_PROCESS = """
import sys
from leo import experiment
from leo.config import DataConfig
from maml_tf.training import Trainer
from tests import test_leo_training as t
root, run_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
restore = Trainer.restore
def reporting_restore(self, *args, **kwargs):
  step = restore(self, *args, **kwargs)
  print("restored step", step)
  return step
Trainer.restore = reporting_restore
experiment.run(DataConfig(root, total_examples_per_class=30),
               t.model_config(inner_unroll_length=1, finetuning_unroll_length=1),
               t.outer_config(run_dir, num_steps_limit=steps,
                              checkpoint_steps=2),
               jit_compile=True, test_after_train=False, log=False)
"""


def test_resumed_run_compiles_nothing(small_root, tmp_path):
  """A resumed run finds every program in the XLA cache. The validation
  before the first step used to be traced only by a fresh run, before its
  meta-step, and a resumed run traced it later, under another name."""
  cache = tmp_path / "xla"

  def run(steps):
    proc = run_python(
        ["-c", _RUN_IN_PROCESS, small_root, str(tmp_path / "run"), str(steps)],
        TF_XLA_FLAGS=f"--tf_xla_persistent_cache_directory={cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  assert "restored step 0" in run(2)
  programs = sorted(os.listdir(cache))
  # The validation, the meta-step, and the evaluation of the last training
  # batch (metatrain summaries; another batch shape).
  assert len(programs) == 3
  assert "restored step 2" in run(4)  # resumed, not started again
  assert (tmp_path / "run" / "checkpoints" / "model-4.index").exists()
  assert sorted(os.listdir(cache)) == programs


def run_runner(args, cache, **env_vars):
  return run_python(["runner.py", f"--leo_synthetic_dir={cache}", *args],
                    **env_vars)


def test_runner_demo_mode_and_evaluation_mode(tmp_path):
  # The demo's run directory is the user's own, in the temporary directory.
  run_dir = tmp_path / f"leo_synthetic_demo_{getpass.getuser()}"
  tiny = ["--num_steps_limit=4",
          "--checkpoint_steps=2", "--metatrain_batch_size=2",
          "--metavalid_batch_size=5", "--num_metavalid_batches=1",
          "--metatest_batch_size=10", "--num_metatest_tasks=20",
          "--eval_batch_size=10", "--inner_unroll_length=1",
          "--finetuning_unroll_length=1", "--jit_compile=False"]
  proc = run_runner(tiny, tmp_path / "cache", TMPDIR=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Generating synthetic miniImageNet-format embeddings" in proc.stderr
  assert f"--checkpoint_path={run_dir}" in proc.stderr
  assert "Demo values for flags you did not set" in proc.stderr
  assert "--total_examples_per_class=200" in proc.stderr
  assert "--num_steps_limit" not in proc.stderr.split("did not set")[1].split(
      "\n")[0]  # set explicitly, so not overridden
  assert "Metatest accuracy: " in proc.stdout and "20 tasks" in proc.stdout
  assert "SYNTHETIC" in proc.stdout
  flags = json.loads((run_dir / "flags.json").read_text())
  assert flags["num_steps_limit"] == 4 and flags["model"] == "leo"
  assert flags["total_examples_per_class"] == 200
  for name in ("metatest.json", "metatest.csv", "best_checkpoint/best.json",
               "checkpoints/model-4.index"):
    assert (run_dir / name).exists(), name
  events = [f for f in os.listdir(run_dir) if f.startswith("events")]
  assert events
  # One training series per tag (the last batch's evaluation used to be
  # written under metatrain/query_loss and query_accuracy too).
  tagged = [(event.step, v.tag) for f in events for event in
            tf.compat.v1.train.summary_iterator(str(run_dir / f))
            for v in event.summary.value]
  assert "flags" in {t for _, t in tagged}  # the flags as TensorBoard text
  points = [(s, t) for s, t in tagged if t.startswith("metatrain/")]
  assert (4, "metatrain/query_accuracy") in points
  assert len(points) == len(set(points))
  # The validation before the first step logs its accuracy, as the original.
  assert [t for s, t in tagged if s == 0 and t.startswith("metaval/")] == [
      "metaval/query_accuracy"]

  proc = run_runner([f"--checkpoint_path={run_dir}", "--evaluation_mode",
                     "--checkpoint_steps=0", "--metatest_batch_size=10",
                     "--num_metatest_tasks=20", "--eval_batch_size=10",
                     "--inner_unroll_length=1", "--finetuning_unroll_length=1",
                     "--jit_compile=False"], tmp_path / "cache")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Using the cached synthetic embeddings" in proc.stderr
  assert "best checkpoint" in proc.stdout

  # The run directory holds this run: another configuration may not resume
  # it, nor may --resume=False overwrite it.
  for flags, message in [
      (["--kl_weight=0.5"], "--kl_weight=0.001 there, 0.5 here"),
      (["--resume=False"], f"--resume=False: run directory {run_dir} already "
       "holds a run's checkpoints"),
      # Same configuration, missing data: fails before it writes any flags.
      ([f"--data_path={tmp_path / 'missing'}", f"--checkpoint_path={run_dir}",
        "--total_examples_per_class=200"], "not found"),
  ]:
    proc = run_runner(tiny + flags, tmp_path / "cache", TMPDIR=str(tmp_path))
    assert proc.returncode != 0 and message in proc.stderr, (
        flags, proc.stderr[-2000:])
  saved = json.loads((run_dir / "flags.json").read_text())
  assert saved["kl_weight"] == 1e-3 and saved["data_path"] is None


@pytest.mark.parametrize("flags,message", [
    (["--dataset_name=tieredImageNet", "--embedding_crop=multiview"],
     "--embedding_crop='multiview': expected center for tieredImageNet"),
    (["--dropout_rate=1.0"], "--dropout_rate=1.0"),
    (["--checkpoint_steps=0"], "--checkpoint_steps=0: expected >= 1"),
    # A NaN clip made every step non-finite: training ran and learnt nothing.
    (["--gradient_threshold=nan"], "--gradient_threshold=nan: expected a "
     "finite number"),
])
def test_runner_names_bad_flags(tmp_path, flags, message):
  proc = run_runner([f"--data_path={tmp_path}",
                     f"--checkpoint_path={tmp_path / 'run'}", *flags],
                    tmp_path / "cache")
  assert proc.returncode != 0
  assert message in proc.stderr


def test_runner_flagfile_and_missing_embeddings(tmp_path):
  proc = run_runner(["--flagfile=leo/flagfiles/tiered_5shot.txt",
                     f"--data_path={tmp_path}",
                     f"--checkpoint_path={tmp_path / 'run'}"],
                    tmp_path / "cache")
  assert proc.returncode != 0
  missing = tmp_path / "tieredImageNet" / "center" / "test_embeddings.pkl"
  assert f"{missing} not found" in proc.stderr  # checked before training
  # The flagfile's dataset is the one looked for; a failed start writes no
  # flags into the run directory.
  assert not (tmp_path / "run" / "flags.json").exists()


def test_a_stop_request_ends_training_without_testing(small_root, tmp_path):
  """runner.py's SIGTERM/Ctrl-C handler sets ``stop_requested``: LEO then
  saves the step reached and skips the test, which the next run does."""
  dc = DataConfig(small_root, total_examples_per_class=30)
  outer = outer_config(tmp_path, num_steps_limit=6, checkpoint_steps=6)
  results = experiment.run(
      dc, model_config(), outer, jit_compile=False,
      before_training=lambda trainer: trainer.stop_requested.set())
  assert results["train"]["stopped"] and results["train"]["step"] == 1
  assert results["test"] is None
  assert (tmp_path / "checkpoints" / "model-1.index").exists()
  again = experiment.run(dc, model_config(), outer, jit_compile=False)
  assert again["train"]["step"] == 6 and again["test"] is not None


def test_a_run_directory_in_use_is_refused_and_left_alone(small_root,
                                                          tmp_path):
  """Evaluating a directory that another process trains (here: holds the
  lock through its own open file) is refused before anything is written;
  so is a stop request in the last call's test (left to the next run)."""
  dc = DataConfig(small_root, total_examples_per_class=30)
  outer = outer_config(tmp_path, num_steps_limit=1, checkpoint_steps=1)
  results = experiment.run(
      dc, model_config(), outer, jit_compile=False,
      before_training=lambda trainer: trainer.stop_requested.set())
  assert results["train"]["step"] == 1 and results["test"] is None
  before = sorted(os.listdir(tmp_path))
  fd = os.open(tmp_path / ".lock", os.O_RDWR)
  fcntl.flock(fd, fcntl.LOCK_EX)
  try:
    with pytest.raises(io_utils.RunDirectoryBusyError, match="in use"):
      experiment.run(dc, model_config(), outer_config(
          tmp_path, evaluation_mode=True), jit_compile=False)
  finally:
    os.close(fd)
  assert sorted(os.listdir(tmp_path)) == before  # no new TensorBoard file
  again = experiment.run(dc, model_config(), outer_config(
      tmp_path, evaluation_mode=True), jit_compile=False)
  best = json.loads((tmp_path / "best_checkpoint" / "best.json").read_text())
  assert again["test"]["step"] == best["step"]
