"""Evaluation protocol: statistics, divergence handling, outputs."""

import json

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import evaluation
from maml_tf.tasks import TaskBatch
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks


def test_summary_matches_original_ci_formula():
  values = np.random.default_rng(0).normal(size=(600, 3))
  s = evaluation.summarize(values)
  np.testing.assert_allclose(s["mean"], values.mean(0))
  np.testing.assert_allclose(s["std"], values.std(0))  # ddof 0, as the original
  np.testing.assert_allclose(s["ci95"], 1.96 * values.std(0) / np.sqrt(600))
  np.testing.assert_allclose(s["median"], np.median(values, 0))
  assert not s["nonfinite"].any()


def test_diverged_tasks_are_counted_not_silently_nan():
  values = np.ones((10, 2))
  values[3, 1] = np.nan
  values[4, 1] = np.inf
  values[5, 1] = 5.0
  s = evaluation.summarize(values)
  assert s["nonfinite"].tolist() == [0, 2]
  assert np.isfinite(s["mean"]).all() and np.isfinite(s["ci95"]).all()
  assert s["mean"][1] == 12.0 / 8  # over the 8 finite tasks
  assert s["median"][1] == 1.0  # diverged tasks count as +inf
  result = evaluation.EvalResult({"query_loss": values})
  assert "[2 diverged]" in result.table()


def test_results_written_atomically_as_csv_json_npz(tmp_path):
  result = evaluation.EvalResult({"query_loss": np.arange(12.).reshape(6, 2),
                                  "support_loss": np.arange(6.)})
  paths = result.write(str(tmp_path), "test_ubs5_stepsize0.01")
  assert [p.rsplit(".", 1)[1] for p in paths] == ["csv", "json", "npz"]
  rows = open(paths[0]).read().splitlines()
  assert rows[0].startswith("metric,step,mean,std,ci95,median")
  assert rows[1].startswith("query_loss,0,5,")
  data = json.load(open(paths[1]))
  assert data["num_tasks"] == 6
  assert data["metrics"]["query_loss"]["mean"] == [5.0, 6.0]
  np.testing.assert_array_equal(np.load(paths[2])["support_loss"],
                                np.arange(6.))
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_evaluation_independent_of_batch_size():
  source = SinusoidTasks(SinusoidConfig(num_shots=5, seed=3), "test")

  def fn(batch):
    return {"mean_y": tf.reduce_mean(tf.abs(batch.query_y), axis=[1, 2])}

  a = evaluation.evaluate(fn, source, 50, 50, jit_compile=False)
  b = evaluation.evaluate(fn, source, 50, 7, jit_compile=False)
  np.testing.assert_allclose(a.values["mean_y"], b.values["mean_y"],
                             rtol=1e-6)


class _TwoQueryTasks:
  """Tasks whose two queries are of classes 0 and 1."""

  def batch(self, index, num_tasks):
    return TaskBatch(np.zeros([num_tasks, 1, 1], np.float32),
                     np.zeros([num_tasks, 1], np.int32),
                     np.zeros([num_tasks, 2, 1], np.float32),
                     np.tile(np.int32([[0, 1]]), (num_tasks, 1)))


def test_ensemble_averages_the_members_logits():
  """HTTYM's ensemble: the argmax of the mean logits, not a majority vote.
  Each member alone and a vote get 1 of the 2 queries right; the mean
  logits get neither (member A is very sure of its wrong answer)."""
  logits = tf.Variable(tf.zeros([2, 2]))

  def outputs(batch):
    tasks = tf.shape(batch.query_y)[0]
    return {"query_outputs": tf.tile(logits[None], [tasks, 1, 1]),
            "query_y": batch.query_y}

  members = [[[1.0, 0.0], [5.0, 0.0]],   # query 0 right, query 1 wrong
             [[0.0, 1.0], [0.0, 1.0]],   # query 0 wrong, query 1 right
             [[0.0, 1.0], [0.0, 1.0]]]
  restores = [lambda m=m: logits.assign(m) for m in members]
  for member in restores:
    member()
    alone = evaluation.evaluate(outputs, _TwoQueryTasks(), 3, 2).values
    assert np.mean(np.argmax(alone["query_outputs"], -1)
                   == alone["query_y"]) == 0.5
  result = evaluation.evaluate_ensemble(outputs, restores, _TwoQueryTasks(),
                                        num_tasks=3, batch_size=2)
  np.testing.assert_array_equal(result.values["ensemble_query_accuracy"],
                                [0.0, 0.0, 0.0])
  assert result.table().splitlines()[0].startswith(  # no empty step header
      "ensemble_query_accuracy: 0.0000 ± 0.0000")


def test_an_ensemble_needs_the_same_tasks_for_every_member():
  class Drifting(_TwoQueryTasks):
    calls = 0

    def batch(self, index, num_tasks):
      Drifting.calls += 1
      batch = super().batch(index, num_tasks)
      return batch._replace(query_y=batch.query_y[:, ::(-1) ** self.calls])

  def outputs(batch):
    return {"query_outputs": tf.one_hot(batch.query_y, 2),
            "query_y": batch.query_y}

  with pytest.raises(ValueError, match="gave the ensemble's members "
                     "different tasks"):
    evaluation.evaluate_ensemble(outputs, [lambda: None] * 2, Drifting(), 2, 2)
