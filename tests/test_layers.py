"""Functional layers against TF's reference ops and hand-computed values."""

import collections
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import layers as L
from maml_tf import models
from maml_tf.maml import MAML
from maml_tf.tasks import TaskBatch


def _plain_matmul(x, w):
  return tf.einsum("tbi,tio->tbo", x, w)


def _derivatives(matmul, x, w, directions, order):
  """The value of ``matmul(x, w)`` and its derivatives up to ``order``: each
  derivative's gradient w.r.t. ``(x, w)``, dotted with ``directions`` to
  give the next scalar; every tape records the ones inside it."""
  variables = [x, w]
  tapes = [tf.GradientTape(persistent=True) for _ in range(order)]
  for tape in tapes:
    tape.__enter__()
    tape.watch(variables)
  value = tf.reduce_sum(tf.sin(matmul(x, w)))
  results = [value]
  for k, tape in enumerate(reversed(tapes)):
    tape.__exit__(None, None, None)
    grads = tape.gradient(value, variables)
    results.extend(grads)
    value = sum(tf.reduce_sum(g * d) for g, d in zip(grads, directions[k]))
  return results


def _xla(fn):
  return tf.function(fn, jit_compile=True, autograph=False)


@pytest.mark.parametrize("examples", [1, 10, 32])
def test_task_matmul_has_the_plain_matmuls_derivatives_to_third_order(examples):
  """Compiled by XLA, task_matmul computes weight gradients as sums of outer
  products, in three custom gradients that differentiate into each other:
  every derivative up to the third must equal a plain matmul's, with the
  final gradient (no tape recording it, a dot) and the recorded ones (fused
  sums)."""
  rng = np.random.default_rng(7)
  x = tf.constant(rng.normal(size=(3, examples, 4)))
  w = tf.constant(rng.normal(size=(3, 4, 5)))
  directions = [[tf.constant(rng.normal(size=t.shape)) for t in (x, w)]
                for _ in range(3)]
  for order, final_sums in [(1, False), (1, True), (2, False), (2, True),
                            (3, False)]:
    with mock.patch.object(L, "_outer_sum", wraps=L._outer_sum) as fused:
      with L.final_weight_gradient_sums(final_sums):
        ours = _xla(lambda a, b: _derivatives(L.task_matmul, a, b,
                                              directions, order))(x, w)
    # Recorded weight gradients (order > 1) are the fused sums, and the
    # final one too where a second-order learner asks for it.
    assert fused.called == (order > 1 or final_sums)
    reference = _derivatives(_plain_matmul, x, w, directions, order)
    assert len(ours) == 1 + 2 * order
    for a, b in zip(ours, reference):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_task_matmul_is_a_plain_matmul_without_xla():
  """Without XLA, TensorFlow would materialise the outer products (slower),
  a long example axis would make XLA's sum a slow reduce-window, and on a
  GPU the sums are not measured."""
  x, w = tf.ones([2, 3, 4]), tf.ones([2, 4, 5])
  with mock.patch.object(L, "_task_matmul", wraps=L._task_matmul) as fused:
    L.task_matmul(x, w)
    tf.function(L.task_matmul, autograph=False)(x, w)
    _xla(L.task_matmul)(tf.ones([2, 33, 4]), w)
    with mock.patch.object(L, "gpu_visible", return_value=True):
      _xla(L.task_matmul)(x, w)  # measured on XLA:CPU only
    assert not fused.called
    _xla(L.task_matmul)(x, w)
    assert fused.called


def _second_derivative_through_cond(op, v):
  """A compiled function of ``(x, w)``: the derivative along ``v`` of the
  gradient w.r.t. ``w`` of ``sum(sin(op(x, 1.5 w)))``, computed inside a
  ``tf.cond`` branch on a fast weight made outside it, as MAML++'s
  multi-step loss does."""
  @_xla
  def run(x, w):
    with tf.GradientTape() as outer:
      outer.watch(w)
      with tf.GradientTape() as inner:
        inner.watch(w)
        fast = w * 1.5
        y = tf.cond(tf.reduce_sum(x) < 1e9,
                    lambda: tf.reduce_sum(tf.sin(op(x, fast))),
                    lambda: tf.constant(0.0, tf.float64))
      g = tf.reduce_sum(inner.gradient(y, w) * v)
    return outer.gradient(g, w)
  return run


def test_task_matmul_second_order_through_a_cond_branch():
  """MAML++'s multi-step loss runs forward passes inside ``tf.cond`` on fast
  weights made outside it; the second derivative through the cond must
  build, and equal a plain matmul's."""
  rng = np.random.default_rng(8)
  x = tf.constant(rng.normal(size=(2, 3, 4)))
  w = tf.constant(rng.normal(size=(2, 4, 5)))
  v = tf.constant(rng.normal(size=(2, 4, 5)))
  np.testing.assert_allclose(
      _second_derivative_through_cond(L.task_matmul, v)(x, w),
      _second_derivative_through_cond(_plain_matmul, v)(x, w), rtol=1e-10)


def _example_axis_dots(hlo: str, shape: str) -> list[str]:
  """The dots of XLA's optimised HLO with result ``shape`` that contract axis
  1 of both operands: per-task weight gradients ``x[t]^T dy[t]`` left as
  matmuls."""
  return [line.strip()[:100] for line in hlo.splitlines()
          if f"= {shape}" in line and " dot(" in line and
          "lhs_batch_dims={0}, lhs_contracting_dims={1}, rhs_batch_dims={0}, "
          "rhs_contracting_dims={1}" in line]


def test_maml_weight_gradients_are_fused_sums_but_first_orders_final_one():
  """In the compiled MAML meta-gradient of a 40-40 MLP, the 40x40 layer's
  weight gradients are fused sums, not matmuls over the example axis (3x
  slower on XLA:CPU). Second order: all of them. First order: all but the
  final one, which XLA would merge with the sum over tasks."""
  rng = np.random.default_rng(0)
  batch = TaskBatch(*(tf.constant(rng.normal(size=(4, 10, 1)), tf.float32)
                      for _ in range(4)))
  model = models.build("mlp_sinusoid", seed=0)

  def dots(first_order):
    learner = MAML(model, inner_lr=0.01, num_inner_steps=1,
                   first_order=first_order)
    fn = tf.function(learner._meta_gradients, jit_compile=True)
    hlo = fn.experimental_get_compiler_ir(batch, None)(stage="optimized_hlo")
    return len(_example_axis_dots(hlo, "f32[4,40,40]"))

  assert dots(first_order=False) == 0
  assert dots(first_order=True) == 1
  # The same network with plain matmuls: the check can fail.
  with mock.patch.object(L, "task_matmul", _plain_matmul):
    assert dots(first_order=False) >= 4


def _plain_task_conv(x, w):
  """Per-task 'SAME' convolutions with TensorFlow's own gradients."""
  return tf.stack([tf.nn.conv2d(x[t], w[t], 1, "SAME")
                   for t in range(x.shape[0])])


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_task_conv_has_tf_conv2ds_derivatives_to_third_order(kernel_size):
  """The per-task convolution and its filter gradient differentiate into
  each other; every derivative up to the third, compiled by XLA, must equal
  TensorFlow's own (eager). A non-square image catches a swapped axis."""
  rng = np.random.default_rng(9)
  x = tf.constant(rng.normal(size=(2, 3, 6, 7, 2)))
  w = tf.constant(rng.normal(size=(2, kernel_size, kernel_size, 2, 3)))
  directions = [[tf.constant(rng.normal(size=t.shape)) for t in (x, w)]
                for _ in range(3)]
  ours = _xla(lambda a, b: _derivatives(L._task_conv, a, b, directions,
                                        3))(x, w)
  reference = _derivatives(_plain_task_conv, x, w, directions, 3)
  assert len(ours) == 7
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_task_conv_graph_grows_with_tasks_only_by_their_convolutions():
  """The step's graph is unrolled over tasks and inner steps, and tracing it
  took time in proportion to its op count (miniImageNet MAML: 20k ops and
  6.2 s, of which strided slices of single tasks and their constants were
  7k). The per-task convolution and its derivatives must split the tasks with
  one op per operand: with 3 tasks the graph of a second derivative may only
  have more convolutions than with 1, and no strided slice."""
  rng = np.random.default_rng(11)

  def op_counts(tasks):
    tensors = [tf.constant(rng.normal(size=shape)) for shape in
               [(tasks, 2, 5, 5, 2), (tasks, 3, 3, 2, 4)] * 3]
    fn = _xla(lambda x, w, *d: _derivatives(L._task_conv, x, w,
                                             [d[:2], d[2:]], 2))
    graph = fn.get_concrete_function(*tensors).graph
    return collections.Counter(op.type for op in graph.get_operations())

  one, three = op_counts(1), op_counts(3)
  assert three["Conv2D"] == 3 * one["Conv2D"] == 27
  assert "StridedSlice" not in three
  assert {k: v for k, v in three.items() if k != "Conv2D"} == {
      k: v for k, v in one.items() if k != "Conv2D"}


def _conv_labels(hlo: str) -> set[str]:
  """The dimension labels of every convolution in XLA's optimised HLO."""
  return {line.split("dim_labels=")[1].split(",")[0]
          for line in hlo.splitlines() if " convolution(" in line}


def test_task_conv_through_a_cond_branch_stays_canonical():
  """MAML++'s multi-step loss differentiates convolutions inside ``tf.cond``
  branches. There XLA:CPU left TensorFlow's filter gradient in a
  non-canonical layout and ran it as a naive loop (MAML++'s miniImageNet
  step: 109 instead of 7 s). Ours must be canonical everywhere (the layout
  XLA:CPU hands to its convolution library) and give the same second
  derivative."""
  rng = np.random.default_rng(10)
  x = tf.constant(rng.normal(size=(2, 3, 6, 6, 2)))
  w = tf.constant(rng.normal(size=(2, 3, 3, 2, 4)))
  v = tf.constant(rng.normal(size=(2, 3, 3, 2, 4)))

  def second_derivative(conv):
    run = _second_derivative_through_cond(conv, v)
    return (run(x, w).numpy(),
            _conv_labels(run.experimental_get_compiler_ir(x, w)(
                stage="optimized_hlo")))

  ours, labels = second_derivative(L._task_conv)
  reference, plain_labels = second_derivative(_plain_task_conv)
  np.testing.assert_allclose(ours, reference, rtol=1e-10)
  assert labels == {"b01f_01io->b01f"}
  # TensorFlow's own gradients: the check can fail.
  assert plain_labels != {"b01f_01io->b01f"}


def test_conv_runs_one_convolution_per_task_for_few_tasks_under_xla():
  """Conv2D's routing: per-task convolutions only when compiled by XLA for
  the CPU, with at most ``MAX_PER_TASK_CONV_TASKS`` tasks, stride 1 and an
  odd kernel; im2col otherwise. Both give the same layer output."""
  rng = np.random.default_rng(11)
  conv, strided = L.Conv2D(4, 3), L.Conv2D(4, 3, stride=2)
  conv.build((None, 6, 6, 2))
  strided.build((None, 6, 6, 2))

  def inputs(tasks):
    return [tf.constant(rng.normal(size=s), tf.float32)
            for s in [(tasks, 3, 6, 6, 2), (tasks, 3, 3, 2, 4), (tasks, 4)]]

  def forward(layer, x, kernel, bias):
    return layer.forward([kernel, bias], x)

  few = inputs(L.MAX_PER_TASK_CONV_TASKS)
  many = inputs(L.MAX_PER_TASK_CONV_TASKS + 1)
  with mock.patch.object(L, "_task_conv", wraps=L._task_conv) as per_task:
    eager = forward(conv, *few)
    tf.function(forward, autograph=False)(conv, *few)
    _xla(forward)(conv, *many)
    _xla(forward)(strided, *few)
    with mock.patch.object(L, "gpu_visible", return_value=True):
      _xla(forward)(conv, *few)  # measured on XLA:CPU only
    assert not per_task.called
    compiled = _xla(forward)(conv, *few)
    assert per_task.called
  np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,size,cin", [(1, 7, 3), (2, 7, 1), (2, 8, 4),
                                             (2, 28, 1)])
def test_conv_matches_tf_conv2d_per_task(stride, size, cin):
  rng = np.random.default_rng(0)
  conv = L.Conv2D(5, 3, stride=stride)
  conv.build((None, size, size, cin))
  x = rng.normal(size=(3, 2, size, size, cin)).astype(np.float32)
  kernels = rng.normal(size=(3, 3, 3, cin, 5)).astype(np.float32)
  biases = rng.normal(size=(3, 5)).astype(np.float32)
  out = conv.forward([kernels, biases], x).numpy()
  for t in range(3):
    ref = tf.nn.conv2d(x[t], kernels[t], stride, "SAME") + biases[t]
    np.testing.assert_allclose(out[t], ref.numpy(), rtol=1e-4, atol=1e-4)


def test_max_pool_matches_tf():
  x = np.random.default_rng(1).normal(size=(2, 3, 21, 21, 4)).astype(np.float32)
  out = L.max_pool_2x2(tf.constant(x)).numpy()
  ref = tf.nn.max_pool2d(x.reshape(6, 21, 21, 4), 2, 2, "VALID").numpy()
  np.testing.assert_allclose(out.reshape(ref.shape), ref)


# The second shape has an axis longer than 32, which BatchNorm flattens.
@pytest.mark.parametrize("shape", [(2, 5, 3, 3, 4), (2, 3, 33, 3, 4)])
def test_batch_norm_uses_each_tasks_own_statistics(shape):
  bn = L.BatchNorm()
  bn.build((None, 4))
  rng = np.random.default_rng(2)
  x = rng.normal(size=shape).astype(np.float32)
  beta = rng.normal(size=(2, 4)).astype(np.float32)
  out = bn.forward([beta], x).numpy()
  # Hand formula, task by task, statistics over (B, H, W), eps 1e-3.
  for t in range(2):
    mean = x[t].mean(axis=(0, 1, 2))
    var = x[t].var(axis=(0, 1, 2))
    np.testing.assert_allclose(out[t], (x[t] - mean) / np.sqrt(var + 1e-3) +
                               beta[t], rtol=1e-4, atol=1e-5)
  # Changing task 1's inputs leaves task 0 untouched.
  x2 = x.copy()
  x2[1] *= 7.0
  np.testing.assert_allclose(bn.forward([beta], x2).numpy()[0], out[0],
                             rtol=1e-6)
  assert bn.roles == (L.NORM,)  # offset only, as tf.contrib's default


def _second_order(norm, x0, params0, v):
  """First derivatives of ``sum(sin(norm(x, *params)) * v)`` with respect to
  ``x`` and the params, then the derivatives of a function of those."""
  x, params = tf.identity(x0), [tf.identity(p) for p in params0]
  with tf.GradientTape() as outer:
    outer.watch([x, *params])
    with tf.GradientTape() as inner:
      inner.watch([x, *params])
      y = tf.reduce_sum(tf.sin(norm(x, *params)) * v)
    gx, *gparams = inner.gradient(y, [x, *params])
    z = tf.reduce_sum(tf.cos(gx)) + sum(tf.reduce_sum(g ** 2)
                                        for g in gparams)
  return [t.numpy() for t in [gx, *gparams, *outer.gradient(z, [x, *params])]]


def _plain_batch_norm(x, *params):
  """Batch norm written directly: statistics over (B, H, W), no reshapes,
  ``(x - mean) / sqrt(var + eps) * gamma + beta`` for params
  ``[gamma, beta]`` or ``[beta]``."""
  mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
  var = tf.reduce_mean(tf.square(x - mean), axis=[1, 2, 3], keepdims=True)
  y = (x - mean) * tf.math.rsqrt(var + 1e-3)
  if len(params) == 2:
    y = y * params[0][:, None, None, None, :]
  return y + params[-1][:, None, None, None, :]


# An axis longer than 32 makes BatchNorm flatten (B, H, W); a scale makes it
# fold gamma into the multiplier of (x - mean).
@pytest.mark.parametrize("length,scale", [(34, False), (34, True), (4, True)])
def test_batch_norm_has_the_plain_formulas_second_derivatives(length, scale):
  """Second-order MAML needs every derivative of BatchNorm to equal the
  plain formula's, with respect to the inputs and to gamma and beta."""
  rng = np.random.default_rng(5)
  x0 = tf.constant(rng.normal(size=(2, 3, length, 2, 3)))
  params0 = [tf.constant(rng.normal(size=(2, 3)))
             for _ in range(2 if scale else 1)]
  v = tf.constant(rng.normal(size=(2, 3, length, 2, 3)))
  bn = L.BatchNorm(scale=scale, dtype="float64")
  bn.build((None, 3))

  ours = _second_order(lambda x, *params: bn.forward(params, x), x0, params0,
                       v)
  plain = _second_order(_plain_batch_norm, x0, params0, v)
  assert len(ours) == 2 * (len(params0) + 1)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  if length > 32:
    # The statistics hook sees the flattened moments and the full count.
    seen = []
    with L.batch_norm_statistics(
        lambda layer, step, m, var, count: seen.append((m.shape, count)) or
        (m, var)):
      bn.forward(params0, x0)
    assert seen == [((2, 1, 3), 3 * length * 2)]


def test_layer_norm_formula():
  ln = L.LayerNorm()
  ln.build((None, 6))
  x = np.random.default_rng(3).normal(size=(2, 4, 6))
  gamma, beta = np.full((2, 6), 2.0), np.full((2, 6), 0.5)
  out = ln.forward([gamma, beta], x).numpy()
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-12) * 2 + 0.5,
                             rtol=1e-8)


def test_layer_norm_has_the_plain_formulas_second_derivatives():
  """As for batch norm: LayerNorm folds gamma into its multiplier, and every
  first and second derivative must still equal the plain formula's."""
  rng = np.random.default_rng(6)
  x0 = tf.constant(rng.normal(size=(2, 3, 4, 2, 3)))
  params0 = [tf.constant(rng.normal(size=(2, 3))) for _ in range(2)]
  v = tf.constant(rng.normal(size=(2, 3, 4, 2, 3)))
  ln = L.LayerNorm(dtype="float64")
  ln.build((None, 3))

  def plain(x, gamma, beta):
    mean = tf.reduce_mean(x, axis=[2, 3, 4], keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), axis=[2, 3, 4], keepdims=True)
    y = (x - mean) * tf.math.rsqrt(var + 1e-12)
    return y * gamma[:, None, None, None, :] + beta[:, None, None, None, :]

  ours = _second_order(lambda x, *params: ln.forward(params, x), x0, params0,
                       v)
  for a, b in zip(ours, _second_order(plain, x0, params0, v)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_exact_moments_second_derivative_matches_finite_differences():
  """d/dx [grad_x var(x) . v] from nested tapes vs finite differences of the
  first derivative. ``tf.nn.moments`` stops the gradient through the mean in
  the variance, which is what makes stock Keras batch norm wrong for MAML."""
  rng = np.random.default_rng(4)
  x0 = rng.normal(size=(7,))
  v = rng.normal(size=(7,))

  def grad_dot_v(x, moments):
    x = tf.constant(x)
    with tf.GradientTape() as outer:
      outer.watch(x)
      with tf.GradientTape() as inner:
        inner.watch(x)
        _, var = moments(x)
        y = tf.reduce_sum(tf.sin(var))
      g = inner.gradient(y, x)
      gv = tf.reduce_sum(g * v)
    return float(gv), outer.gradient(gv, x).numpy()

  exact = lambda x: L.exact_moments(x, [0])
  _, hv = grad_dot_v(x0, exact)
  eps = 1e-6
  fd = np.array([(grad_dot_v(x0 + eps * e, exact)[0] -
                  grad_dot_v(x0 - eps * e, exact)[0]) / (2 * eps)
                 for e in np.eye(7)])
  np.testing.assert_allclose(hv, fd, rtol=1e-5, atol=1e-8)
  _, hv_tf = grad_dot_v(x0, lambda x: tf.nn.moments(x, [0]))
  assert not np.allclose(hv_tf, fd, rtol=1e-3), "tf.nn.moments became exact?"


def test_make_norm_rejects_unknown_option():
  with pytest.raises(ValueError, match="--norm='batchnorm'"):
    L.make_norm("batchnorm", "n")
