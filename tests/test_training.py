"""The shared meta-training loop: resume, learning, safety rails."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import evaluation, models, training
from maml_tf.maml import MAML
from maml_tf.mamlpp import MAMLPlusPlus
from maml_tf.metasgd import MetaSGD
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
from tests import helpers


def sine_sources(shots=10, seed=0):
  config = SinusoidConfig(num_shots=shots, seed=seed)
  return SinusoidTasks(config, "train"), SinusoidTasks(config, "val")


def make_trainer(run_dir, iterations, jit=True, **kwargs):
  model = models.build("mlp_sinusoid", seed=0)
  learner = MAML(model, 0.01, 1, num_inner_steps_eval=2, jit_compile=jit)
  defaults = dict(run_dir=str(run_dir), num_iterations=iterations,
                  meta_batch_size=25, steps_per_call=10, log_every=20,
                  print_every=20, val_every=20, save_every=20,
                  jit_compile=jit)
  defaults.update(kwargs)
  return training.Trainer(learner, training.TrainConfig(**defaults))


def test_resumed_run_ends_with_the_same_weights(tmp_path):
  train, val = sine_sources()
  straight = make_trainer(tmp_path / "a", 60)
  straight.train(train, val)
  first = make_trainer(tmp_path / "b", 40)  # "killed" after 40 steps
  first.train(train, val)
  resumed = make_trainer(tmp_path / "b", 60)
  assert resumed.restore() == 40
  resumed.train(train, val)
  assert int(resumed.step.numpy()) == 60
  assert int(resumed.optimizer.iterations.numpy()) == 60
  for a, b in zip(straight.learner.trainable_variables,
                  resumed.learner.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  ckpts = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
  assert "model-60.index" in ckpts and "model-40.index" in ckpts


def test_a_stop_request_saves_and_the_run_resumes_the_same(tmp_path):
  """``stop_requested`` (runner.py sets it on SIGTERM or Ctrl-C) ends the
  run after the current call with a checkpoint of that step, and the
  resumed run ends as an uninterrupted one."""
  train, val = sine_sources()
  kwargs = dict(jit=False, save_every=40, val_every=0)
  straight = make_trainer(tmp_path / "a", 60, **kwargs)
  straight.train(train, val)
  stopped = make_trainer(tmp_path / "b", 60, **kwargs)
  stopped.stop_requested.set()
  result = stopped.train(train, val)
  assert result["stopped"] and result["step"] == 10  # one call of 10 steps
  assert not straight.stop_requested.is_set() and not stopped.in_training
  # A save killed midway leaves TensorFlow's staging folder, and a kill
  # before the manager's state file is written leaves a checkpoint it does
  # not list.
  checkpoints = tmp_path / "b" / "checkpoints"
  (checkpoints / "model-20_temp").mkdir()
  (checkpoints / "checkpoint").unlink()
  resumed = make_trainer(tmp_path / "b", 60, **kwargs)
  assert resumed.restore() == 10
  assert not resumed.train(train, val)["stopped"]
  assert not (checkpoints / "model-20_temp").exists()
  for a, b in zip(straight.learner.trainable_variables,
                  resumed.learner.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_short_sinusoid_run_learns(tmp_path):
  train, _ = sine_sources()
  trainer = make_trainer(tmp_path, 1500, steps_per_call=100, log_every=500,
                         print_every=500, val_every=0, save_every=1500)
  before = evaluation.evaluate(
      trainer.learner.evaluate, SinusoidTasks(train.config, "test"), 200, 100)
  trainer.train(train)
  after = evaluation.evaluate(
      trainer.learner.evaluate, SinusoidTasks(train.config, "test"), 200, 100)
  pre, post = after.summary["query_loss"]["mean"][:2]
  assert post < 0.6 * pre, (pre, post)
  assert post < 0.7 * before.summary["query_loss"]["mean"][1]
  events = [f for f in os.listdir(tmp_path) if f.startswith("events")]
  assert events


class NaNAtStep:
  """Wraps a learner; its loss and metrics are NaN at one meta-step (as
  after an overflow in the inner loop). With ``metric_value``, the metrics of
  the other steps are that constant, so their logged mean is known."""

  def __init__(self, learner, bad_step, metric_value=None):
    self.learner = learner
    self.bad_step = bad_step
    self.metric_value = metric_value
    self.trainable_variables = learner.trainable_variables
    self.evaluate = learner.evaluate

  def meta_loss(self, batch, step, training=True):
    loss, metrics = self.learner.meta_loss(batch, step)
    bad = step == self.bad_step
    if self.metric_value is not None:
      metrics = {k: tf.fill(tf.shape(v), tf.constant(self.metric_value,
                                                     v.dtype))
                 for k, v in metrics.items()}
    return tf.where(bad, np.nan, loss), {
        k: tf.where(bad, tf.constant(np.nan, v.dtype), v)
        for k, v in metrics.items()}


@pytest.mark.parametrize("steps_per_call", [1, 5])
def test_non_finite_step_is_skipped(tmp_path, steps_per_call, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  train, _ = sine_sources()
  trainer = make_trainer(tmp_path, 5, jit=False, steps_per_call=steps_per_call,
                         log_every=5, print_every=5, val_every=0, save_every=5)
  wrapped = NaNAtStep(trainer.learner, bad_step=2, metric_value=1.0)
  trainer.learner = wrapped
  trainer.train(train)
  assert int(trainer.nonfinite_steps.numpy()) == 1
  assert int(trainer.optimizer.iterations.numpy()) == 4  # one update skipped
  # ... and the log says so, in the progress line and at the end.
  assert "| 1 non-finite steps skipped so far" in caplog.text
  assert "1 of 5 steps were skipped" in caplog.text
  assert all(np.isfinite(v.numpy()).all() for v in trainer.variables)
  # The logged means cover the 4 applied steps (the skipped one's metrics
  # are NaN, not zero and not poisoning the mean).
  logged = {}
  for path in tmp_path.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        logged[v.tag] = float(tf.make_ndarray(v.tensor))
  assert np.isfinite(logged["metatrain/loss"])
  # Exactly 1: a skipped step counted as zero would give 0.8.
  assert logged["metatrain/post_update_loss"] == 1.0


def test_finite_mean_skips_the_skipped_steps():
  assert training.finite_mean([1.0, float("nan"), 3.0, float("inf")]) == 2.0
  assert np.isnan(training.finite_mean([float("nan")]))


def test_clip_by_value_then_per_tensor_norm():
  grads = [tf.constant([3.0, -4.0]), tf.constant([0.05])]
  clipped = training.clip_gradients(grads, clip_value=1.0, clip_norm=0.5)
  # [3, -4] -> [1, -1] by value -> norm sqrt(2) > 0.5 -> scaled to 0.5
  np.testing.assert_allclose(clipped[0].numpy(),
                             [0.5 / np.sqrt(2), -0.5 / np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(clipped[1].numpy(), [0.05])
  # A matrix's norm is over all its elements, and its shape is kept.
  matrix = tf.random.stateless_normal([64, 48], seed=[1, 2])
  np.testing.assert_allclose(
      training.clip_gradients([matrix], 0.0, 0.5)[0].numpy(),
      tf.clip_by_norm(matrix, 0.5).numpy(), rtol=1e-6)


def test_norm_clipping_and_finite_check_compile_as_flat_reductions():
  # XLA:CPU splits a reduction over a 2-d tensor with axes longer than 32
  # into 32x32 reduce-windows, whose kernels took the classic emitters
  # 12-16 s each to compile for LEO's 128x128 weights.
  grads = [tf.random.stateless_normal([128, 128], seed=[3, 4]),
           tf.random.stateless_normal([640, 64], seed=[5, 6])]

  @tf.function(jit_compile=True)
  def update(grads):
    return (training.clip_gradients(grads, 0.1, 0.1),
            training.all_finite(tf.constant(1.0), grads))

  hlo = update.experimental_get_compiler_ir(grads)(stage="optimized_hlo")
  assert not helpers.windowed_reductions(hlo)
  clipped, finite = update(grads)
  assert bool(finite)
  for got, g in zip(clipped, grads):
    want = tf.clip_by_norm(tf.clip_by_value(g, -0.1, 0.1), 0.1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5,
                               atol=1e-9)
  poisoned = [grads[0], tf.tensor_scatter_nd_update(
      grads[1], [[600, 60]], [float("nan")])]
  assert not bool(update(poisoned)[1])


def test_best_checkpoint_is_replaced_atomically(tmp_path):
  trainer = make_trainer(tmp_path, 1, jit=False, keep_best="query_loss")
  trainer.step.assign(10)
  trainer.save_best(0.5)
  trainer.step.assign(20)
  trainer.save_best(0.7)
  best = tmp_path / "best_checkpoint"
  info = json.loads((best / "best.json").read_text())
  assert info["step"] == 20 and info["value"] == 0.7
  assert (best / (info["checkpoint"] + ".index")).exists()
  assert not (tmp_path / "tmp_best_checkpoint").exists()
  assert not (tmp_path / "best_checkpoint.old").exists()


def test_best_checkpoint_written_before_any_save_restores(tmp_path):
  """LEO keeps step 0's weights as the first best, before the first regular
  checkpoint (which is what creates a checkpoint's save counter)."""
  trainer = make_trainer(tmp_path, 1, jit=False, keep_best="query_loss")
  weights = helpers.flat(trainer.learner.trainable_variables)
  trainer.save_best(0.5)
  for v in trainer.learner.trainable_variables:
    v.assign(tf.zeros_like(v))
  info = json.loads((tmp_path / "best_checkpoint" / "best.json").read_text())
  trainer.restore(str(tmp_path / "best_checkpoint" / info["checkpoint"]))
  np.testing.assert_array_equal(
      helpers.flat(trainer.learner.trainable_variables), weights)


def test_config_rejects_misaligned_intervals(tmp_path):
  with pytest.raises(ValueError, match="log_every=30 must be a multiple"):
    training.TrainConfig(run_dir=str(tmp_path), num_iterations=10,
                         steps_per_call=20, log_every=30)
  # A negative interval is named as such, not as misaligned (it was), and
  # keeping no checkpoint is refused (it was a traceback at the first save).
  with pytest.raises(ValueError, match="val_every must be >= 0, got -1"):
    training.TrainConfig(run_dir=str(tmp_path), num_iterations=10,
                         val_every=-1, steps_per_call=20)
  with pytest.raises(ValueError, match="max_to_keep must be >= 1, got 0"):
    training.TrainConfig(run_dir=str(tmp_path), num_iterations=10,
                         max_to_keep=0)


def test_cosine_schedule_reaches_min_lr(tmp_path):
  config = training.TrainConfig(run_dir=str(tmp_path), num_iterations=100,
                                meta_lr=1e-3, lr_schedule="cosine",
                                min_meta_lr=1e-5, pretrain_iterations=50)
  opt = training.make_optimizer(config)
  schedule = opt._learning_rate
  assert float(schedule(0)) == pytest.approx(1e-3)
  assert float(schedule(100)) == pytest.approx(1e-5, rel=1e-3)
  assert float(opt.epsilon) == 1e-8


def test_pretrain_phase_optimises_the_pre_update_support_loss(tmp_path):
  """--pretrain_iterations: the first iterations minimise the support loss at
  theta (the original's multi-task baseline), then MAML takes over."""
  train, _ = sine_sources()
  trainer = make_trainer(tmp_path, 10, jit=False, pretrain_iterations=10,
                         steps_per_call=5, log_every=5, print_every=5,
                         val_every=0, save_every=10)
  calls = []
  learner = trainer.learner
  original_pretrain, original_meta = learner.pretrain_loss, learner.meta_loss
  learner.pretrain_loss = lambda b, s, **k: (calls.append("pre"),
                                             original_pretrain(b, s))[1]
  learner.meta_loss = lambda b, s, **k: (calls.append("meta"),
                                         original_meta(b, s))[1]
  trainer.train(train)
  assert calls[0] == "pre" and calls[-1] == "meta"
  # The original's pretrain_op is its own Adam: meta-training starts fresh.
  assert int(trainer.pretrain_optimizer.iterations.numpy()) == 10
  assert int(trainer.optimizer.iterations.numpy()) == 10
  batch = helpers.to_tensors(train.batch(0, 4))
  loss, metrics = original_pretrain(batch, 0)
  assert float(loss) == pytest.approx(float(metrics["pre_update_loss"]))
  assert float(loss) == pytest.approx(
      float(np.mean(learner.evaluate(batch, 0)["support_loss"])), rel=1e-5)


def test_pretraining_is_not_clipped_and_resumes_exactly(tmp_path):
  """Clipping belongs to the meta-update (the original clips metatrain_op
  only), and a run killed during pretraining resumes with its optimiser."""
  train, _ = sine_sources()
  kwargs = dict(pretrain_iterations=20, steps_per_call=5, log_every=5,
                print_every=5, val_every=0, save_every=10)
  kwargs["jit"] = False  # the loop's logic, not XLA (tested above)
  clipped = make_trainer(tmp_path / "clip", 0, clip_value=1e-12, **kwargs)
  before = helpers.flat(clipped.learner.trainable_variables)
  clipped.train(train)
  moved = np.abs(helpers.flat(clipped.learner.trainable_variables) - before)
  # 20 Adam steps of 1e-3 move weights by up to 2e-2; gradients clipped to
  # 1e-12 would move them by about 1e-4 times that (Adam's epsilon is 1e-8).
  assert moved.max() > 5e-3

  straight = make_trainer(tmp_path / "a", 10, **kwargs)
  straight.train(train)
  make_trainer(tmp_path / "b", 0, **dict(kwargs, pretrain_iterations=10)
               ).train(train)  # "killed" in pretraining, after 10 steps
  resumed = make_trainer(tmp_path / "b", 10, **kwargs)
  assert resumed.restore() == 10  # (a restart from 0 would end the same)
  assert int(resumed.pretrain_optimizer.iterations.numpy()) == 10
  resumed.train(train)
  assert int(resumed.pretrain_optimizer.iterations.numpy()) == 20
  np.testing.assert_array_equal(
      helpers.flat(straight.learner.trainable_variables),
      helpers.flat(resumed.learner.trainable_variables))


def test_validation_draws_new_tasks_unless_fixed(tmp_path):
  """The original MAML's meta-validation takes the next batch of its
  validation queue each time; LEO's protocol here keeps them fixed."""
  _, val = sine_sources()
  seen = {}
  for fixed in (False, True):
    trainer = make_trainer(tmp_path / str(fixed), 0, val_fixed_tasks=fixed)
    results = [trainer.validate(val, i)["support_loss"] for i in range(2)]
    seen[fixed] = results
    again = trainer.validate(val, 1)["support_loss"]
    np.testing.assert_array_equal(again, results[1])  # a function of index
  assert not np.array_equal(seen[False][0], seen[False][1])
  np.testing.assert_array_equal(seen[False][0], seen[True][0])
  np.testing.assert_array_equal(seen[True][0], seen[True][1])


@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("learner_kind", ["maml_conv", "leo"])
def test_tf32_setting_reaches_every_matmul_and_convolution(
    tmp_path, learner_kind, allow_tf32):
  # runner.py --allow_tf32 (README, Performance): TensorFlow's default lets
  # Ampere+ GPUs round float32 matmul and convolution inputs to 10 bits. With
  # it off, every dot and convolution of the compiled meta-step (forward,
  # inner update, both backward passes) must ask XLA for full precision.
  from leo.model import LEO
  from tests.test_leo_model import class_major_batch, tiny_config
  if learner_kind == "leo":
    learner = LEO(tiny_config(dtype="float32", num_classes=2))
    batch = class_major_batch(2, 2, 1, 2, 6, dtype=np.float32)
  else:
    learner = MAML(models.build("conv4_omniglot", num_classes=2, num_filters=4,
                                seed=0), 0.4, 1)
    batch = helpers.classification_batch(2, 2, 1, 1, (28, 28, 1))
  trainer = training.Trainer(learner, training.TrainConfig(
      run_dir=str(tmp_path), num_iterations=1, meta_batch_size=2,
      log_every=1, print_every=1, val_every=0, save_every=1))
  block = type(batch)(*(tf.constant(np.asarray(t)[None]) for t in batch))
  previous = tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
  try:
    hlo = trainer.train_function().experimental_get_compiler_ir(
        block, tf.constant(0, tf.int64))(stage="hlo")
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(previous)
  ops = [line for line in hlo.splitlines()
         if " dot(" in line or " convolution(" in line]
  assert len(ops) >= 20, hlo[:2000]
  exact = ["operand_precision={highest,highest}" in line for line in ops]
  assert (not any(exact)) if allow_tf32 else all(exact)


def _learners(seed):
  """One learner of each kind, every model architecture among them."""
  omniglot = dict(num_classes=5, seed=seed)
  return [
      MAML(models.build("conv4_omniglot", **omniglot), 0.4, 1),
      MAML(models.build("conv4_miniimagenet", **omniglot), 0.01, 1),
      MAML(models.build("mlp_omniglot", **omniglot), 0.4, 1),
      MetaSGD(models.build("mlp_sinusoid", seed=seed), seed=seed),
      MAMLPlusPlus(models.build("mlp_sinusoid", seed=seed, norm="batch_norm",
                                norm_scale=True), 0.01, 2),
  ]


def _all_variables(learner):
  """Meta-parameters, then any other state (MAML++'s running statistics)."""
  found = {id(v): v for v in learner.trainable_variables}
  for v in learner.variables:  # tf.Module's walk, which skips Keras models
    found.setdefault(id(v), v)
  return list(found.values())


def test_learner_checkpoint_holds_every_weight(tmp_path):
  """A checkpoint of the learner alone restores every meta-parameter and
  statistic, without the optimiser (whose references to the variables used
  to be the only route to the layers Keras 3 keeps in lists)."""
  for i, (saved, fresh) in enumerate(zip(_learners(0), _learners(7))):
    saved_variables = _all_variables(saved)
    for v in saved_variables:  # make every value distinctive
      v.assign(v + tf.cast(1 + i, v.dtype))
    path = tf.train.Checkpoint(learner=saved).write(str(tmp_path / f"c{i}"))
    tf.train.Checkpoint(learner=fresh).read(path).assert_consumed()
    fresh_variables = _all_variables(fresh)
    assert len(fresh_variables) == len(saved_variables)
    for a, b in zip(saved_variables, fresh_variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_weights_only_restore_reads_every_model_weight(tmp_path):
  trained = make_trainer(tmp_path, 20, jit=False)
  trained.train(sine_sources()[0])
  fresh = make_trainer(tmp_path, 20, jit=False)
  fresh.learner.model.set_weights([np.zeros_like(w) for w in
                                   fresh.learner.model.get_weights()])
  assert fresh.restore(weights_only=True) == 20
  assert int(fresh.optimizer.iterations.numpy()) == 0  # not restored
  for a, b in zip(trained.learner.trainable_variables,
                  fresh.learner.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
  train, val = sine_sources()
  make_trainer(tmp_path, 40, jit=False).train(train, val)  # saves 20, 40
  directory = tmp_path / "checkpoints"
  (data,) = directory.glob("model-40.data-*")
  data.write_bytes(data.read_bytes()[:100])  # a copy cut short
  resumed = make_trainer(tmp_path, 60, jit=False)
  assert resumed.restore() == 20
  resumed.train(train, val)  # which writes model-40 again, whole
  assert int(resumed.step.numpy()) == 60
  assert make_trainer(tmp_path, 60).restore(str(directory / "model-40")) == 40
  # Asked for by name, a damaged checkpoint is an error that names it; with
  # every checkpoint damaged, so is resuming.
  for data in directory.glob("model-*.data-*"):
    data.write_bytes(b"")
  with pytest.raises(training.CheckpointUnreadableError,
                     match="checkpoint .*model-40 is unreadable"):
    make_trainer(tmp_path, 60).restore(str(directory / "model-40"))
  with pytest.raises(training.CheckpointUnreadableError,
                     match="model-20 is unreadable .*, and .*checkpoints "
                     "holds no readable checkpoint before it"):
    make_trainer(tmp_path, 80).restore()


def test_top_checkpoints_keep_the_best_validations(tmp_path):
  """keep_top: the weights of the best meta-validations, best first (a tie
  keeps the earlier; a repeated step is replaced), each restorable."""
  trainer = make_trainer(tmp_path, 1, jit=False, keep_best="query_accuracy",
                         keep_top=2)
  variables = trainer.learner.trainable_variables

  def validate(step, value):
    trainer.step.assign(step)
    for v in variables:
      v.assign(tf.fill(v.shape, float(step)))
    trainer.save_top(value)
    return [(e["step"], e["value"]) for e in
            training.top_checkpoints(str(tmp_path))]

  for step, value in [(10, 0.5), (20, 0.7), (30, 0.6)]:
    validate(step, value)
  assert validate(40, 0.6) == [(20, 0.7), (30, 0.6)]  # a tie: the earlier
  assert validate(50, float("nan")) == [(20, 0.7), (30, 0.6)]
  assert validate(30, 0.65) == [(20, 0.7), (30, 0.65)]  # one entry a step
  assert validate(50, 0.4) == [(20, 0.7), (30, 0.65)]
  top = training.top_checkpoints(str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "top_checkpoints").iterdir()
                if p.suffix == ".index") == ["model-20.index",
                                             "model-30.index"]
  assert not (tmp_path / "tmp_top_checkpoints").exists()
  for entry in top:
    # Weights only: no optimiser state is kept for an ensemble member.
    assert not [name for name, _ in tf.train.list_variables(entry["path"])
                if "optimizer" in name]
    trainer.restore(entry["path"], weights_only=True)
    assert int(trainer.step.numpy()) == entry["step"]
    np.testing.assert_array_equal(helpers.flat(variables),
                                  float(entry["step"]))
  # A resumed run ranks its validations against the kept ones.
  resumed = make_trainer(tmp_path, 0, jit=False, keep_best="query_accuracy",
                         keep_top=2)
  resumed.train(sine_sources()[0])
  assert resumed.top == [{k: e[k] for k in ("step", "value", "checkpoint")}
                         for e in top]
  with pytest.raises(ValueError, match="keep_top=2 ranks meta-validations"):
    make_trainer(tmp_path, 1, keep_top=2)


@pytest.mark.parametrize("entries, message", [
    ('{"checkpoints": [{"step": 1}]}', "KeyError"),
    ('{"checkpoints": [1, 2]}', "TypeError"),
    ('{"checkpoints": [{"step": 1, "value": "high", "checkpoint": "model-1"}]}',
     "malformed entry"),
    ('{"checkpoints": [{"step": 1, "value": 0.5, "checkpoint": "../model-1"}]}',
     "malformed entry"),
    ('{"checkpoints": [{"step": 1, "value": 0.5, "checkpoint": "model-1"}]}',
     "it lists model-1, which is not there"),
    ('{"checkpoints": ', "JSONDecodeError"),
])
def test_a_damaged_top_json_is_named(tmp_path, entries, message):
  (tmp_path / "top_checkpoints").mkdir()
  (tmp_path / "top_checkpoints" / "top.json").write_text(entries)
  with pytest.raises(training.CheckpointUnreadableError,
                     match=f"top_checkpoints/top.json is unreadable .*{message}"):
    training.top_checkpoints(str(tmp_path))
