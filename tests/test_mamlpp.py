"""MAML++: each switch changes what it claims."""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import layers as L
from maml_tf import models, training
from maml_tf.maml import support_gradients
from maml_tf.mamlpp import MAMLPlusPlus, MAMLPPConfig, per_step_loss_weights
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks
from tests import helpers
from tests.test_maml import meta_gradient_vs_fd, sine_batch

EPOCH = 10  # iterations per epoch in these tests


def bn_mlp(scale=0.5, dtype="float64", seed=1):
  """A small MLP with per-step-capable batch norm (gamma and beta); weights
  redrawn large so finite differences avoid ReLU kinks."""
  model = models.build("mlp_sinusoid", hidden=(6, 5), norm="batch_norm",
                       norm_scale=True, seed=seed, dtype=dtype)
  if scale:
    rng = np.random.default_rng(7)
    for v in model.trainable_variables:
      v.assign(rng.normal(scale=scale, size=v.shape) +
               (1.0 if v.path.endswith("gamma") else 0.0))
  return model


def learner_for(model=None, steps=3, inner_lr=0.1, **config):
  defaults = dict(iterations_per_epoch=EPOCH, msl_epochs=3)
  defaults.update(config)
  return MAMLPlusPlus(model if model is not None else bn_mlp(), inner_lr,
                      steps, config=MAMLPPConfig(**defaults),
                      use_tf_function=False)


def httym_importance_vector(steps, msl_epochs, epoch):
  """HowToTrainYourMAMLPytorch's get_per_step_loss_importance_vector."""
  weights = np.ones(steps) / steps
  decay = 1.0 / steps / msl_epochs
  floor = 0.03 / steps
  for i in range(steps - 1):
    weights[i] = max(weights[i] - epoch * decay, floor)
  weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay,
                    1.0 - (steps - 1) * floor)
  return weights


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_per_step_loss_weights_match_httym(steps):
  for epoch in range(0, 14):
    np.testing.assert_allclose(
        per_step_loss_weights(steps, 10, epoch, tf.float64).numpy(),
        httym_importance_vector(steps, 10, epoch), rtol=1e-12)


def test_multi_step_loss_is_the_weighted_sum_over_steps():
  learner = learner_for()
  batch = helpers.to_tensors(sine_batch())
  # Query losses after 1..U steps, computed independently by evaluate().
  per_step = learner.evaluate(batch, num_steps=3, training=True)[
      "query_loss"].numpy().mean(axis=0)[1:]
  for step in (0, 15, 25):
    weights = httym_importance_vector(3, 3, step // EPOCH)
    loss, metrics = learner.meta_loss(batch, step)
    assert float(loss) == pytest.approx(float(weights @ per_step), rel=1e-12)
    assert float(metrics["final_step_weight"]) == pytest.approx(weights[-1])
  # After msl_epochs only the final step counts.
  loss, metrics = learner.meta_loss(batch, 3 * EPOCH)
  assert float(loss) == pytest.approx(float(per_step[-1]), rel=1e-12)
  assert float(metrics["final_step_weight"]) == 1.0
  # The same through tf.function with a tensor step (tf.cond / tf.where).
  graph = tf.function(lambda b, s: learner.meta_loss(b, s)[0])
  for step in (15, 3 * EPOCH):
    eager = float(learner.meta_loss(batch, step)[0])
    assert float(graph(batch, tf.constant(step, tf.int64))) == pytest.approx(
        eager, rel=1e-12)
  without = learner_for(learner.model, multi_step_loss=False)
  assert float(without.meta_loss(batch, 0)[0]) == pytest.approx(
      float(per_step[-1]), rel=1e-12)


def test_learned_per_layer_per_step_learning_rates():
  learner = learner_for(steps=3, inner_lr=0.1)
  adapted = sum(learner.adapted_mask)
  assert len(learner.step_sizes) == adapted
  for rates in learner.step_sizes:
    np.testing.assert_array_equal(rates.numpy(), [0.1, 0.1, 0.1])
    rates.assign([0.05, 0.2, 0.3])
  batch = helpers.to_tensors(sine_batch())
  trajectory, _ = learner.adapt_batch(batch, 3)
  # Step 2 (index 1) moves the weights by rate[1] * gradient at theta_1.
  _, _, grads = support_gradients(
      lambda p, x: learner.forward(p, x, 1, True), trajectory[1],
      learner.adapted_mask, batch.support_x, batch.support_y,
      lambda out, y: learner.task_loss(out, y, 4))
  for p1, p2, g, adapted_weight in zip(trajectory[1], trajectory[2], grads,
                                       learner.adapted_mask):
    if adapted_weight:
      np.testing.assert_allclose(p2.numpy(), p1.numpy() - 0.2 * g.numpy(),
                                 rtol=1e-12)
  _, grads = learner.meta_gradients(sine_batch(), 3 * EPOCH)
  for g in grads[-len(learner.extra_variables):][:adapted]:
    assert np.all(np.abs(g.numpy()) > 0), g.numpy()  # every step's rate


def test_per_step_norm_weights():
  model = bn_mlp()
  learner = learner_for(model, steps=2)
  norm = [i for i, r in enumerate(model.param_roles) if r == L.NORM]
  assert len(learner.norm_weights) == len(norm) == 4  # 2 layers x (gamma, beta)
  trainable = {id(v) for v in learner.trainable_variables}
  for i, weights in zip(norm, learner.norm_weights):
    assert id(model.trainable_variables[i]) not in trainable
    np.testing.assert_array_equal(
        weights.numpy(), np.stack([model.trainable_variables[i].numpy()] * 2))
  rng = np.random.default_rng(0)
  for weights in learner.norm_weights:
    weights.assign(weights.numpy() + rng.normal(size=weights.shape))
  batch = helpers.to_tensors(sine_batch())
  params = model.tile_params(3)
  out = [learner.forward(params, batch.support_x, s, True).numpy()
         for s in (0, 1, 5)]
  assert not np.allclose(out[0], out[1])
  np.testing.assert_array_equal(out[1], out[2])  # steps >= U use row U-1
  # Step 1 is the model with its norm parameters replaced by row 1.
  manual = list(params)
  for i, weights in zip(norm, learner.norm_weights):
    manual[i] = tf.broadcast_to(weights[1], params[i].shape)
  np.testing.assert_allclose(out[1], model.forward(manual, batch.support_x),
                             rtol=1e-12)
  _, grads = learner.meta_gradients(sine_batch(), 0)
  for g in grads[-len(norm):]:
    assert np.all(np.abs(g.numpy()).sum(axis=1) > 0)  # every step's row


def test_meta_gradient_matches_finite_differences():
  """Every switch on, second order, inside the multi-step-loss phase; the
  directional derivatives cover weights, LSLR rates and per-step norms."""
  learner = learner_for(steps=2)
  batch = sine_batch()
  rows = []
  _, grads = learner.meta_gradients(batch, 5)
  g = helpers.flat(grads)
  rng = np.random.default_rng(0)
  for _ in range(4):
    d = rng.normal(size=g.shape)
    fd = helpers.directional_fd(lambda: learner.meta_loss(batch, 5)[0],
                                learner.trainable_variables, d, 1e-6)
    rows.append((g @ d, fd))
  rows = np.array(rows)
  np.testing.assert_allclose(rows[:, 0], rows[:, 1], rtol=1e-5, atol=1e-8)


def test_derivative_order_annealing():
  model = bn_mlp()
  annealed = MAMLPlusPlus(model, 0.1, 2, config=MAMLPPConfig(
      first_order_epochs=2, iterations_per_epoch=EPOCH,
      multi_step_loss=False), jit_compile=False)
  first = MAMLPlusPlus(model, 0.1, 2, first_order=True, config=MAMLPPConfig(
      iterations_per_epoch=EPOCH, multi_step_loss=False), jit_compile=False)
  batch = sine_batch()
  # tf.function with a tensor step: the derivative order is a tf.cond.
  _, g_before = annealed.meta_gradients(batch, 2 * EPOCH - 1)
  _, g_first = first.meta_gradients(batch, 0)
  np.testing.assert_allclose(helpers.flat(g_before), helpers.flat(g_first),
                             rtol=1e-10, atol=1e-12)
  _, g_after = annealed.meta_gradients(batch, 2 * EPOCH)
  assert np.linalg.norm(helpers.flat(g_after) - helpers.flat(g_first)) > (
      1e-3 * np.linalg.norm(helpers.flat(g_first)))
  eager = MAMLPlusPlus(model, 0.1, 2, config=annealed.config,
                       use_tf_function=False)
  rows = meta_gradient_vs_fd(_AtStep(eager, 2 * EPOCH), batch)
  np.testing.assert_allclose(rows[:, 0], rows[:, 1], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(helpers.flat(g_after), helpers.flat(
      eager.meta_gradients(batch, 2 * EPOCH)[1]), rtol=1e-10, atol=1e-12)


class _AtStep:
  """A learner whose meta_loss/meta_gradients are taken at a fixed step."""

  def __init__(self, learner, step):
    self.learner, self.step = learner, step
    self.trainable_variables = learner.trainable_variables

  def meta_loss(self, batch, step=None):
    return self.learner.meta_loss(batch, self.step)

  def meta_gradients(self, batch):
    return self.learner.meta_gradients(batch, self.step)


def test_running_statistics_follow_the_recorded_batch_moments():
  """With alpha = 0 the fast weights stay at theta, so the first batch-norm
  layer sees ``x W1 + b1`` on the support and query sets: its step-0 running
  statistics must move 10% of the way to their moments."""
  model = bn_mlp()
  learner = learner_for(model, steps=1, inner_lr=0.0)
  batch = helpers.to_tensors(sine_batch())
  w1, b1 = (v.numpy() for v in model.trainable_variables[:2])
  means, variances = [], []
  for x in (batch.support_x.numpy(), batch.query_x.numpy()):
    h = x @ w1 + b1  # [T, B, 6]
    means.append(h.mean(axis=1).mean(axis=0))
    variances.append(h.var(axis=1, ddof=1).mean(axis=0))
  loss_before = learner.meta_loss(batch, 0)
  np.testing.assert_array_equal(learner.statistics.means[0].numpy(), 0.0)
  learner.update_state(tf.constant(False))  # a non-finite step: no update
  np.testing.assert_array_equal(learner.statistics.variances[0].numpy(), 1.0)
  del loss_before
  learner.meta_loss(batch, 0)
  learner.update_state(tf.constant(True))
  np.testing.assert_allclose(learner.statistics.means[0].numpy()[0],
                             0.1 * np.mean(means, axis=0), rtol=1e-10)
  np.testing.assert_allclose(learner.statistics.variances[0].numpy()[0],
                             0.9 + 0.1 * np.mean(variances, axis=0),
                             rtol=1e-10)


def test_training_loop_updates_per_step_running_statistics(tmp_path):
  """Compiled meta-steps, two per call (a tf.while_loop), with the multi-step
  loss switching off after the first call (one compiled step per phase):
  every step's row of every batch-norm layer moves, and stays finite."""
  model = models.build("mlp_sinusoid", hidden=(8, 8), norm="batch_norm",
                       norm_scale=True, seed=0)
  learner = MAMLPlusPlus(model, 0.01, 2, config=MAMLPPConfig(
      iterations_per_epoch=2, msl_epochs=1), jit_compile=False)
  trainer = training.Trainer(learner, training.TrainConfig(
      run_dir=str(tmp_path), num_iterations=4, meta_batch_size=5,
      steps_per_call=2, log_every=4, print_every=4, save_every=4,
      val_every=0, log=False, jit_compile=False))
  trainer.train(SinusoidTasks(SinusoidConfig(num_shots=5), "train"))
  # One compiled meta-step per phase: (first order, multi-step loss).
  assert {key[2] for key in trainer._functions if key[0] == "train"} == {
      (False, True), (False, False)}
  statistics = learner.statistics
  for means, variances in zip(statistics.means, statistics.variances):
    assert means.shape == (2, 8)
    assert np.all(means.numpy() != 0.0) and np.all(variances.numpy() != 1.0)
    assert np.all(np.isfinite(variances.numpy()))


def test_evaluation_normalises_with_running_statistics():
  model = bn_mlp()
  learner = learner_for(model, steps=2, eval_with_running_stats=True)
  rng = np.random.default_rng(0)
  for v in learner.statistics.means + learner.statistics.variances:
    v.assign(np.abs(rng.normal(size=v.shape)) + 0.5)
  batch = sine_batch(num_tasks=1)
  support_x, support_y, query_x = (batch.support_x[0], batch.support_y[0],
                                   batch.query_x[0])
  other = query_x.copy()
  other[1:] += 3.0  # change every query example but the first
  out = learner.adapt_and_predict(support_x, support_y, query_x).numpy()
  out_other = learner.adapt_and_predict(support_x, support_y, other).numpy()
  np.testing.assert_allclose(out[0], out_other[0], rtol=1e-12)  # inductive
  for v in learner.statistics.means:
    v.assign(v + 1.0)
  moved = learner.adapt_and_predict(support_x, support_y, query_x).numpy()
  assert not np.allclose(moved, out)
  # By default evaluation is transductive, as HTTYM's code and the original.
  plain = learner_for(model, steps=2)
  assert plain.eval_training and plain.statistics is not None
  a = plain.adapt_and_predict(support_x, support_y, query_x).numpy()
  b = plain.adapt_and_predict(support_x, support_y, other).numpy()
  assert not np.allclose(a[0], b[0])


def test_more_evaluation_steps_than_training_steps():
  """HTTYM issue #28: steps >= U reuse the last step's rates and norms."""
  learner = learner_for(steps=2)
  for rates in learner.step_sizes:
    rates.assign([0.05, 0.2])
  assert [float(r) for r in learner.inner_learning_rates(7) if r is not None
          ] == [0.2] * len(learner.step_sizes)
  results = learner.evaluate(helpers.to_tensors(sine_batch()), num_steps=6)
  assert results["query_loss"].shape == (3, 7)
  assert np.all(np.isfinite(results["query_loss"].numpy()))


def test_eager_and_xla_agree():
  batch = sine_batch(num_tasks=4, dtype=np.float32)
  config = MAMLPPConfig(iterations_per_epoch=EPOCH, msl_epochs=3,
                        first_order_epochs=1)
  results = []
  # (Graph mode without XLA is covered by test_derivative_order_annealing.)
  for kwargs in ({"use_tf_function": False}, {"jit_compile": True}):
    learner = MAMLPlusPlus(bn_mlp(scale=None, dtype="float32", seed=0), 0.1,
                           2, config=config, **kwargs)
    for step in (5, 15):  # first order + MSL, then second order + MSL
      loss, grads = learner.meta_gradients(batch, step)
      results.append((kwargs, step, float(loss), helpers.flat(grads)))
  reference = {r[1]: r for r in results[:2]}
  for kwargs, step, loss, grads in results[2:]:
    assert loss == pytest.approx(reference[step][2], rel=1e-5), kwargs
    # Biases before batch norm have a zero true gradient: float32 noise there.
    np.testing.assert_allclose(grads, reference[step][3], rtol=1e-3,
                               atol=1e-5 * np.abs(grads).max())


@pytest.mark.parametrize("field,value,flag", [
    ("msl_epochs", -1, "--mamlpp_msl_epochs"),
    ("first_order_epochs", -2, "--mamlpp_first_order_epochs"),
    ("iterations_per_epoch", 0, "--mamlpp_iterations_per_epoch"),
    ("per_step_running_stats", False, "--mamlpp_bnrs_eval needs"),
])
def test_bad_config_is_named(field, value, flag):
  extra = ({"eval_with_running_stats": True}
           if field == "per_step_running_stats" else {})
  with pytest.raises(ValueError, match=flag):
    MAMLPPConfig(**{field: value}, **extra)


def test_a_phase_fixed_in_python_computes_what_the_branches_do():
  """The training loop passes ``phase(step)``: no tf.cond in the graph, and
  the same loss, metrics and meta-gradients as branching on the step."""
  learner = learner_for(steps=3, first_order_epochs=1, msl_epochs=2)
  batch = helpers.to_tensors(sine_batch(num_tasks=2))
  variables = learner.trainable_variables

  def objective(step, phase):
    with tf.GradientTape() as tape:
      loss, metrics = learner.meta_loss(batch, step, phase=phase)
    return loss, metrics, tape.gradient(loss, variables)

  def traced(fixed):
    fn = tf.function(lambda s: objective(s, fixed), autograph=False)
    graph = fn.get_concrete_function(tf.TensorSpec([], tf.int64)).graph
    return fn, sum(op.type in ("If", "StatelessIf")
                   for op in graph.get_operations())

  # One graph branches on the step for every phase; tracing it once keeps
  # the test to four traces of a second-order MAML++ objective.
  branching, conds = traced(None)
  assert conds > 0
  for step, phase in [(5, (True, True)), (15, (False, True)),
                      (25, (False, False))]:
    assert learner.phase(step) == phase
    fixed, conds = traced(phase)
    assert conds == 0, step
    step_tensor = tf.constant(step, tf.int64)
    loss, metrics, grads = fixed(step_tensor)
    loss_b, metrics_b, grads_b = branching(step_tensor)
    np.testing.assert_allclose(loss, loss_b, rtol=1e-12)
    for name in metrics:
      np.testing.assert_allclose(metrics[name], metrics_b[name], rtol=1e-12)
    for g, g_b in zip(grads, grads_b):
      np.testing.assert_allclose(g, g_b, rtol=1e-10, atol=1e-14)


def test_a_call_may_not_span_two_phases(tmp_path):
  learner = learner_for(iterations_per_epoch=3, msl_epochs=1)
  trainer = training.Trainer(learner, training.TrainConfig(
      run_dir=str(tmp_path), num_iterations=6, meta_batch_size=2,
      steps_per_call=2, log_every=2, print_every=2, save_every=2,
      val_every=0, log=False, jit_compile=False))
  with pytest.raises(ValueError, match=r"meta-steps 2-3 run in one call "
                     r"\(steps_per_call=2\) but span two phases"):
    trainer.train(SinusoidTasks(SinusoidConfig(num_shots=5), "train"))
  assert int(trainer.step.numpy()) == 0  # refused before the first step
