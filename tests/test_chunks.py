"""A meta-step in chunks of tasks computes what one over all tasks does."""

from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import layers as L
from maml_tf import models, training
from maml_tf.anil import ANIL
from maml_tf.maml import MAML
from maml_tf.mamlpp import MAMLPlusPlus, MAMLPPConfig
from maml_tf.tasks import TaskBatch
from tests import helpers

TASKS, WAYS = 2, 3


def _learner(kind: str, dtype: str = "float64"):
  if kind == "maml":  # miniImageNet's conv4, small: per-task convolutions
    return MAML(models.build(
        "conv4_miniimagenet", num_classes=WAYS, num_filters=2,
        image_shape=(8, 8, 3), seed=0, dtype=dtype), 0.1, 1)
  model = models.build("mlp_omniglot", num_classes=WAYS, hidden=(8, 6),
                       input_dim=16, norm="batch_norm",
                       norm_scale=True, seed=0, dtype="float64")
  if kind == "anil":
    return ANIL(model, 0.1, 2)
  # Per-step batch-norm weights and running statistics, multi-step loss.
  return MAMLPlusPlus(model, 0.1, 2, config=MAMLPPConfig(
      iterations_per_epoch=10, msl_epochs=1))


def _trainer(tmp_path, kind: str, tasks: int, tasks_per_chunk: int,
             steps_per_call: int = 1, jit: bool = True):
  return training.Trainer(_learner(kind), training.TrainConfig(
      run_dir=str(tmp_path / f"{kind}_{tasks_per_chunk}"), num_iterations=2,
      meta_batch_size=tasks, steps_per_call=steps_per_call, log_every=2,
      print_every=2, save_every=2, val_every=0, log=False,
      tasks_per_chunk=tasks_per_chunk, jit_compile=jit))


def _block(shape, tasks, steps):
  batches = [helpers.classification_batch(tasks, WAYS, 1, 2, shape, seed=s,
                                          dtype=np.float64)
             for s in range(steps)]
  return TaskBatch(*(tf.constant(np.stack([b[f] for b in batches]))
                     for f in range(4)))


def test_compiled_chunks_give_the_meta_gradient_of_all_tasks_at_once():
  """``chunked_gradients`` compiled by XLA, one task per chunk, on the conv
  model whose tasks have their own convolutions: the loss, metrics and
  second-order meta-gradient of both tasks at once (float32), from a
  program that holds one task's convolutions in a loop, not both tasks'."""
  learner = _learner("maml", "float32")
  batch = helpers.to_tensors(helpers.classification_batch(
      2, WAYS, 1, 2, learner.model.example_shape))

  def compute(b):
    with tf.GradientTape() as tape:
      loss, metrics = learner.meta_loss(b)
    return loss, metrics, tape.gradient(loss, learner.trainable_variables)

  functions = [tf.function(compute, jit_compile=True),
               tf.function(lambda b: training.chunked_gradients(compute, b, 1),
                           jit_compile=True)]
  at_once, chunked = (fn(batch) for fn in functions)
  convolutions = [
      sum(" convolution(" in line for line in
          fn.experimental_get_compiler_ir(batch)(stage="hlo").splitlines())
      for fn in functions]
  # All at once: each task's own convolutions (42 a task), and a few more in
  # the meta-gradient's final sums over the tasks.
  assert 0 < convolutions[1] < convolutions[0] / 2, convolutions
  for name in at_once[1]:
    np.testing.assert_allclose(chunked[1][name], at_once[1][name], rtol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose(chunked[0], at_once[0], rtol=1e-5)
  difference = helpers.flat(chunked[2]) - helpers.flat(at_once[2])
  assert (np.linalg.norm(difference) <
          1e-5 * np.linalg.norm(helpers.flat(at_once[2])))


@pytest.mark.parametrize("kind, tasks_per_chunk, steps_per_call",
                         [("anil", 2, 1), ("mamlpp", 2, 2)])
def test_chunks_give_the_meta_steps_of_all_tasks_at_once(
    tmp_path, kind, tasks_per_chunk, steps_per_call):
  """The training loop's meta-steps (two per call for MAML++: a loop around
  the chunks' loop), in chunks or over all tasks at once: the same metrics,
  weights, Adam moments and (MAML++) per-step running statistics, in
  float64 (graphs, which build faster than XLA's float64 programs)."""
  tasks = 4
  results = []
  for chunk in (tasks, tasks_per_chunk):
    trainer = _trainer(tmp_path, kind, tasks, chunk, steps_per_call, False)
    learner = trainer.learner
    block = _block(learner.model.example_shape, tasks, steps_per_call)
    fn = trainer.train_function(phase=trainer.phase(0, steps_per_call))
    with mock.patch.object(training, "chunked_gradients",
                           wraps=training.chunked_gradients) as chunked:
      metrics = fn(block, tf.constant(0, tf.int64))
    assert chunked.called == (chunk < tasks)
    state = [v.numpy() for v in [*trainer.variables, *learner.variables,
                                 *trainer.optimizer.variables]]
    results.append(({k: v.numpy() for k, v in metrics.items()}, state))
  (metrics, state), (chunked_metrics, chunked_state) = results
  assert metrics.keys() == chunked_metrics.keys()
  for name in metrics:
    np.testing.assert_allclose(chunked_metrics[name], metrics[name],
                               rtol=1e-6, err_msg=name)  # float32 metrics
  assert len(state) == len(chunked_state) > 2 * len(learner.model.weights)
  for before, after in zip(state, chunked_state):
    # atol: Adam divides the zero gradients of the biases that batch norm
    # follows (float64 rounding) by their root mean square.
    np.testing.assert_allclose(after, before, rtol=1e-10, atol=1e-9)
  if kind == "mamlpp":  # the running statistics moved, as one update
    means = learner.statistics.means[0].numpy()
    assert np.all(means != 0.0)


def test_default_chunks():
  """One task at a time for at most 4 image tasks (their own convolutions
  anyway; not for ANIL), chunks of up to 8 for more, all tasks for the
  sinusoid and on a GPU."""
  conv = _learner("maml")
  assert [conv.default_tasks_per_chunk(t) for t in (1, 2, 4, 5, 8, 25, 32)] == [
      1, 1, 1, 5, 8, 5, 8]
  assert L.MAX_PER_TASK_CONV_TASKS == 4
  assert _learner("anil").default_tasks_per_chunk(32) == 32  # not images
  # ANIL's body is shared: a small meta-batch goes at once.
  anil = ANIL(conv.model, 0.1, 1)
  assert [anil.default_tasks_per_chunk(t) for t in (4, 32)] == [4, 8]
  mlp = MAML(models.build("mlp_sinusoid", seed=0), 0.01, 1)
  assert mlp.default_tasks_per_chunk(25) == 25
  with mock.patch.object(L, "gpu_visible", return_value=True):
    assert conv.default_tasks_per_chunk(32) == 32  # measured on CPUs only


def test_a_chunk_that_does_not_divide_the_meta_batch_is_refused(tmp_path):
  with pytest.raises(ValueError, match="tasks_per_chunk=3 must be a divisor "
                     "of meta_batch_size=4"):
    training.TrainConfig(run_dir=str(tmp_path), num_iterations=1,
                         meta_batch_size=4, tasks_per_chunk=3)
  batch = helpers.to_tensors(helpers.classification_batch(6, WAYS, 1, 1, (2,)))
  with pytest.raises(ValueError, match="tasks_per_chunk=4 must divide the 6 "
                     "tasks"):
    training.chunked_gradients(lambda b: b.support_x, batch, 4)
  with pytest.raises(ValueError, match="tasks_per_chunk=0"):
    training.TrainConfig(run_dir=str(tmp_path), num_iterations=1,
                         meta_batch_size=4, tasks_per_chunk=0)
