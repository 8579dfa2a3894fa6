"""Keras layers whose forward pass takes its weights as arguments.

MAML's inner loop needs the same network evaluated at *fast weights*: tensors
derived from the variables by gradient steps, different for every task. These
layers keep their variables like any Keras layer (for checkpoints, summaries and
the optimiser) but compute with whatever weights they are handed, so fast
weights stay on the tape and second-order meta-gradients are exact. Nothing is
ever assigned into a variable inside a tape (that breaks nested tapes in TF2:
tensorflow#34335).

Every forward pass is *task-vectorised*: inputs carry a leading task axis and
every weight carries the same axis, so a meta-batch of T tasks is one batched
computation, not T unrolled copies of the graph. Convolutions are written as
im2col followed by a batched matmul, because per-task weights rule out one big
convolution; under XLA this is as fast as unrolling the tasks and compiles in a
time independent of the meta-batch size (measurements in the README). Only a
meta-batch of at most 4 tasks, compiled by XLA, runs one convolution per task
(``_task_conv``): faster and lighter there, and its graph is still small.

Shapes: ``x`` is ``[T, B, ...]`` (T tasks, B examples each) and a weight of
variable shape ``S`` is passed as ``[T, *S]``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import keras
import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.ops import control_flow_util

# XLA:CPU's TreeReductionRewriter turns a sum over an axis longer than this
# into a reduce-window, unless YNNPACK takes the sum.
_TREE_REDUCTION_WINDOW = 32

# Roles decide which weights an algorithm adapts in its inner loop.
WEIGHT = "weight"  # kernels and biases of the body (adapted by MAML)
HEAD = "head"  # the output layer (adapted by MAML and by ANIL)
NORM = "norm"  # normalisation offsets/scales (meta-learned only in the original)


class FunctionalLayer(keras.layers.Layer):
  """Base class: a layer with a functional, task-vectorised forward pass.

  Subclasses create their weights in ``build`` and list one role per trainable
  weight in ``self.roles`` (same order as ``self.trainable_weights``).
  """

  roles: tuple[str, ...] = ()

  def forward(self, params: Sequence[tf.Tensor], x: tf.Tensor, step: int = 0,
              training: bool = True) -> tf.Tensor:
    """Applies the layer with the given weights.

    Args:
      params: this layer's weights, each ``[T, *variable_shape]``.
      x: inputs ``[T, B, ...]``.
      step: inner-loop step index (used by per-step layers, MAML++).
      training: whether this is a training-mode call.

    Returns:
      Outputs ``[T, B, ...]``.
    """
    raise NotImplementedError

  def call(self, x, training=None):
    params = [tf.convert_to_tensor(w)[None] for w in self.trainable_weights]
    return self.forward(params, x[None], training=bool(training))[0]


# XLA:CPU runs a per-task matmul that contracts a short example axis,
# ``dW[t] = x[t]^T dy[t]`` (a weight gradient), as 3x slower than ``x[t] W[t]``
# (41 against 13 us for the sinusoid's [25, 10, 40] x [25, 10, 40]), while a
# sum of outer products over that axis, fused by XLA, took 12 us. The three
# functions below are one closed family, each differentiating into the others,
# so that the inner loop's weight gradients and every second-order term take
# the fused sum, to any order (and the final weight gradients too, for
# second-order learners: ``final_weight_gradient_sums``). The sinusoid's MAML
# step ran 1.4x faster (README, Performance).


def _recorded(*tensors: tf.Tensor) -> bool:
  """Whether a gradient tape is recording operations on ``tensors``: when a
  gradient is itself differentiated (MAML's inner loop). TensorFlow has no
  public API for this; a test covers both answers."""
  return record.should_record_backprop(tensors)


def _compiling_for_xla_cpu() -> bool:
  """Whether the function being traced is compiled by XLA (``jit_compile``)
  for the CPU. The forms chosen then (``task_matmul``'s sums, per-task
  convolutions) were measured on XLA:CPU only; with a GPU visible,
  TensorFlow places the function there, and they are not used."""
  return (control_flow_util.GraphOrParentsInXlaContext(
      tf.compat.v1.get_default_graph()) and not gpu_visible())


def gpu_visible() -> bool:
  """Whether TensorFlow sees a GPU (where it places compiled functions)."""
  return bool(tf.config.list_logical_devices("GPU"))


def _local(*tensors: tf.Tensor) -> list[tf.Tensor]:
  """``tensors`` as tensors of the graph being built. A gradient function
  that closes over a tensor of an enclosing graph (a fast weight used in a
  ``tf.cond`` branch, as MAML++'s multi-step loss does) breaks the cond's
  gradient; an identity made here is captured like any op's input."""
  return [tf.identity(t) for t in tensors]


# Innermost last; see ``final_weight_gradient_sums``.
_FINAL_SUMS: list[bool] = []


@contextlib.contextmanager
def final_weight_gradient_sums(enabled: bool):
  """Whether ``task_matmul`` calls made within the context compute their
  final weight gradients (those no tape records) as fused sums too.

  A learner whose meta-gradient is second order enables it: each fast
  weight's final gradient then adds several terms (the query's, the support
  forward pass's, the second-order ones) before the sum over tasks, and the
  sums were faster (sinusoid MAML 28 against 31 ms per 100 steps, ANIL 16
  against 22 ms). Off by default: a first-order meta-gradient sums a single
  term over tasks at once, and XLA merges a fused sum over examples with that
  sum over tasks into one reduction, 14x slower than a matmul (first-order
  MAML 28 against 21 ms).

  Args:
    enabled: True for a second-order meta-gradient. Read when the forward
      pass is traced, so the gradients computed later follow it.
  """
  _FINAL_SUMS.append(bool(enabled))
  try:
    yield
  finally:
    _FINAL_SUMS.pop()


@tf.custom_gradient
def _task_matmul(x: tf.Tensor, w: tf.Tensor):
  """``x[t] @ w[t]``: ``[T, B, I]`` x ``[T, I, O]`` -> ``[T, B, O]``."""
  x, w = _local(x, w)
  final_sums = bool(_FINAL_SUMS and _FINAL_SUMS[-1])

  def grad(dy):
    if final_sums or _recorded(x, dy):
      return _task_matmul_t(dy, w), _outer_sum(x, dy)
    return _task_matmul_t(dy, w), tf.einsum("tbi,tbo->tio", x, dy)

  return tf.einsum("tbi,tio->tbo", x, w), grad


@tf.custom_gradient
def _task_matmul_t(d: tf.Tensor, w: tf.Tensor):
  """``d[t] @ w[t]^T``: ``[T, B, O]`` x ``[T, I, O]`` -> ``[T, B, I]``."""
  d, w = _local(d, w)

  def grad(g):
    return _task_matmul(g, w), _outer_sum(g, d)

  return tf.einsum("tbo,tio->tbi", d, w), grad


@tf.custom_gradient
def _outer_sum(x: tf.Tensor, d: tf.Tensor):
  """``x[t]^T @ d[t]`` as a sum of outer products over the example axis:
  ``[T, B, I]`` x ``[T, B, O]`` -> ``[T, I, O]``."""
  x, d = _local(x, d)

  def grad(g):
    return _task_matmul_t(d, g), _task_matmul(x, g)

  return tf.reduce_sum(x[:, :, :, None] * d[:, :, None, :], axis=1), grad


def task_matmul(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
  """Per-task ``x[t] @ w[t]``, differentiable to any order.

  Args:
    x: ``[T, B, I]``.
    w: ``[T, I, O]``.

  Returns:
    ``[T, B, O]``. Compiled by XLA for the CPU (no GPU visible), with a
    static example axis B of at most 32 in float32 or float64, its weight
    gradients are fused sums of outer products (see above). Otherwise it is
    a plain batched matmul: a longer sum would become a slow reduce-window,
    16-bit sums would lose precision, without XLA TensorFlow materialises
    the outer products (the sinusoid's MAML ran 0.78x as fast), and on a GPU
    the sums were never measured.
  """
  short = x.shape[1] is not None and x.shape[1] <= _TREE_REDUCTION_WINDOW
  if (short and x.dtype in (tf.float32, tf.float64) and
      _compiling_for_xla_cpu()):
    return _task_matmul(x, w)
  return tf.einsum("tbi,tio->tbo", x, w)


class Dense(FunctionalLayer):
  """``y = x W + b`` with per-task ``W`` ``[T, in, out]`` and ``b`` ``[T, out]``."""

  def __init__(self, units: int, kernel_initializer="glorot_uniform",
               role: str = WEIGHT, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.roles = (role, role)

  def build(self, input_shape):
    self.kernel = self.add_weight(
        name="kernel", shape=(int(input_shape[-1]), self.units),
        initializer=self.kernel_initializer)
    self.bias = self.add_weight(name="bias", shape=(self.units,),
                                initializer="zeros")

  def forward(self, params, x, step=0, training=True):
    kernel, bias = params
    return task_matmul(x, kernel) + bias[:, None, :]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
  """Output size and (before, after) padding of a 'SAME' convolution."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, total // 2, total - total // 2


def dim(x: tf.Tensor, axis: int) -> int | tf.Tensor:
  """``x``'s size along ``axis``: a Python int where it is static (as under
  XLA), else a scalar tensor. A static size keeps a Shape op, a strided
  slice and its three constants out of the graph, which the unrolled tasks
  and inner steps repeat many times over; the op count sets the tracing time
  (README, Performance)."""
  size = x.shape[axis]
  return size if size is not None else tf.shape(x)[axis]


def extract_patches(x: tf.Tensor, kernel_size: int, stride: int) -> tf.Tensor:
  """im2col for a 'SAME' convolution.

  Args:
    x: ``[T, B, H, W, C]``.
    kernel_size: square kernel size k.
    stride: stride s.

  Returns:
    ``[T, B, Ho, Wo, k*k*C]``, ordered to match a ``[k, k, C, F]`` kernel
    reshaped to ``[k*k*C, F]``. Built from strided slices, whose gradients are
    cheap pads (``tf.image.extract_patches`` lowers worse under XLA).
  """
  height, width = int(x.shape[2]), int(x.shape[3])
  out_h, top, bottom = _same_padding(height, kernel_size, stride)
  out_w, left, right = _same_padding(width, kernel_size, stride)
  padded = tf.pad(x, [[0, 0], [0, 0], [top, bottom], [left, right], [0, 0]])
  span_h = (out_h - 1) * stride + 1
  span_w = (out_w - 1) * stride + 1
  columns = [
      padded[:, :, i:i + span_h:stride, j:j + span_w:stride, :]
      for i in range(kernel_size) for j in range(kernel_size)
  ]
  return tf.concat(columns, axis=-1)


# Per-task convolutions. With a few tasks (miniImageNet trains with 4), one
# XLA convolution per task beat im2col + a batched matmul: the MAML step took
# 0.86x the time and 0.62x the peak memory, since the k*k-times larger patch
# tensor is never materialised (README, Performance). The unrolled graph
# grows with the tasks: with 8, the step was 0.84x as long but the first call
# 1.8x (60 against 33 s); with Omniglot's 32, it compiled 6x longer and ran
# at half the speed. So more than 4 tasks keep im2col. The two functions
# below differentiate into each other, so every derivative is again a
# per-task convolution in XLA:CPU's canonical layout: TensorFlow's own filter
# gradient lowers to a convolution that XLA leaves in another layout inside
# ``tf.cond`` branches (MAML++'s multi-step loss) and runs as a naive loop
# there (MAML++'s miniImageNet step took 109 instead of 7 s).
MAX_PER_TASK_CONV_TASKS = 4


def _flipped(w: tf.Tensor) -> tf.Tensor:
  """``[T, k, k, C, F]`` -> ``[T, k, k, F, C]``, rotated by 180 degrees: the
  kernel whose 'SAME' convolution is the transposed convolution of ``w``
  (stride 1, odd k)."""
  return tf.transpose(tf.reverse(w, [1, 2]), [0, 1, 2, 4, 3])


@tf.custom_gradient
def _task_conv(x: tf.Tensor, w: tf.Tensor):
  """``conv(x[t], w[t])``, 'SAME', stride 1, odd k: ``[T, B, H, W, C]`` x
  ``[T, k, k, C, F]`` -> ``[T, B, H, W, F]``."""
  x, w = _local(x, w)
  kernel_size = int(w.shape[1])

  def grad(dy):
    return (_task_conv(dy, _flipped(w)),
            _task_conv_filter(x, dy, kernel_size))

  # One unstack per operand, not a strided slice per task: the step's graph
  # is unrolled over tasks and steps, and its op count sets the tracing time.
  return tf.stack([tf.nn.conv2d(x_t, w_t, 1, "SAME")
                   for x_t, w_t in zip(tf.unstack(x), tf.unstack(w))]), grad


def _task_conv_filter(x: tf.Tensor, d: tf.Tensor,
                      kernel_size: int) -> tf.Tensor:
  """The filter gradient of ``_task_conv``: ``[T, B, H, W, C]`` x
  ``[T, B, H, W, F]`` -> ``[T, k, k, C, F]``."""
  pad = (kernel_size - 1) // 2

  @tf.custom_gradient
  def conv_filter(x, d):
    x, d = _local(x, d)

    def grad(g):
      return _task_conv(d, _flipped(g)), _task_conv(x, g)

    # Per task, [C, H, W, B] by [H, W, B, F] -> [C, k, k, F]: x's channels
    # are this convolution's batch, its examples the contracted channels, and
    # the window the whole image. Transposed once for all tasks.
    filters = [
        tf.nn.conv2d(x_t, d_t, 1, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        for x_t, d_t in zip(tf.unstack(tf.transpose(x, [0, 4, 2, 3, 1])),
                            tf.unstack(tf.transpose(d, [0, 2, 3, 1, 4])))]
    return tf.transpose(tf.stack(filters), [0, 2, 3, 1, 4]), grad

  return conv_filter(x, d)


def _per_task_convolutions(x: tf.Tensor, kernel_size: int,
                           stride: int) -> bool:
  """Whether ``Conv2D`` runs one convolution per task (see above)."""
  tasks = x.shape[0]
  return (tasks is not None and tasks <= MAX_PER_TASK_CONV_TASKS and
          stride == 1 and kernel_size % 2 == 1 and
          x.dtype in (tf.float32, tf.float64) and _compiling_for_xla_cpu())


class Conv2D(FunctionalLayer):
  """3x3 'SAME' convolution plus bias, as ``conv_block`` in cbfinn/maml."""

  def __init__(self, filters: int, kernel_size: int = 3, stride: int = 1,
               kernel_initializer="glorot_uniform", role: str = WEIGHT,
               **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.kernel_size = kernel_size
    self.stride = stride
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.roles = (role, role)

  def build(self, input_shape):
    k = self.kernel_size
    self.kernel = self.add_weight(
        name="kernel", shape=(k, k, int(input_shape[-1]), self.filters),
        initializer=self.kernel_initializer)
    self.bias = self.add_weight(name="bias", shape=(self.filters,),
                                initializer="zeros")

  def forward(self, params, x, step=0, training=True):
    kernel, bias = params
    t, b = dim(x, 0), dim(x, 1)
    if _per_task_convolutions(x, self.kernel_size, self.stride):
      out = _task_conv(x, kernel)
      h, w = x.shape[2], x.shape[3]
    else:
      patches = extract_patches(x, self.kernel_size, self.stride)
      h, w, kc = patches.shape[2:]
      out = tf.einsum("tmk,tkf->tmf", tf.reshape(patches, [t, -1, kc]),
                      tf.reshape(kernel, [t, kc, self.filters]))
    # The bias is added over one flat example axis, so that its gradient is
    # a one-axis sum (multi-axis sums compile slowly under XLA:CPU).
    out = tf.reshape(out, [t, -1, self.filters]) + bias[:, None, :]
    return tf.reshape(out, [t, b, h, w, self.filters])


def exact_moments(x: tf.Tensor, axes: Sequence[int]):
  """Mean and biased variance, differentiable to every order.

  ``tf.nn.moments`` (and therefore stock Keras ``BatchNormalization``) puts a
  ``stop_gradient`` on the mean inside the variance. That leaves first-order
  gradients intact but makes second-order MAML meta-gradients about 16% wrong
  (see the README, "Batch norm"). This is the plain formula.
  """
  mean = tf.reduce_mean(x, axis=axes, keepdims=True)
  variance = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
  return mean, variance


# Hooks installed by ``batch_norm_statistics`` (innermost last).
_STATISTICS_HOOKS: list[Callable] = []


@contextlib.contextmanager
def batch_norm_statistics(hook: Callable):
  """Routes every ``BatchNorm`` call's statistics through ``hook``.

  Within the context, ``BatchNorm.forward`` calls
  ``hook(layer, step, mean, variance, count)`` with the exact moments of the
  current call (``[T, 1, ..., 1, C]``, per task; ``[T, 1, C]`` where
  ``BatchNorm`` flattens long example axes) and the number of elements each
  was taken over, and normalises with the ``(mean, variance)`` it returns.
  MAML++ uses this to record per-step batch statistics while meta-training
  and to normalise with per-step running statistics at evaluation. The hook
  runs at trace time (inside ``tf.function`` it sees symbolic tensors); it
  must not assign to variables, since it runs inside gradient tapes.
  """
  _STATISTICS_HOOKS.append(hook)
  try:
    yield
  finally:
    _STATISTICS_HOOKS.pop()


def normalize(x: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor,
              epsilon: float, gamma: tf.Tensor | None = None,
              beta: tf.Tensor | None = None) -> tf.Tensor:
  """``(x - mean) / sqrt(variance + epsilon) * gamma + beta``, for batch and
  layer norm.

  Args:
    x: ``[T, ..., C]``.
    mean, variance: statistics broadcastable to ``x``.
    epsilon: added to the variance.
    gamma, beta: per-task scale and offset ``[T, C]`` (None: none).
  """
  multiplier = tf.math.rsqrt(variance + epsilon)
  expand = (slice(None),) + (None,) * (len(x.shape) - 2) + (slice(None),)
  if gamma is not None:
    # gamma joins the multiplier instead of scaling the normalised x, so that
    # gamma's gradient and the variance's come from one sum over positions,
    # sum(dy * (x - mean)); scaling x-hat made XLA sum twice and made MAML++
    # on Omniglot 1.3-1.8x slower, and layer-norm MAML 1.23-1.36x (README,
    # Performance).
    multiplier = multiplier * gamma[expand]
  y = (x - mean) * multiplier
  return y if beta is None else y + beta[expand]


class BatchNorm(FunctionalLayer):
  """Batch norm with current-batch statistics, as cbfinn/maml uses it.

  The original calls ``tf.contrib.layers.batch_norm`` with its defaults and never
  runs the moving-average updates, so statistics always come from the current
  forward call (per task, separately for support and query, in training and at
  test alike); it learns an offset beta only (``scale=False``), eps 1e-3.

  Statistics are taken over every axis except the task and channel axes, i.e.
  over (B, H, W) of each task.
  """

  def __init__(self, center: bool = True, scale: bool = False,
               epsilon: float = 1e-3, **kwargs):
    super().__init__(**kwargs)
    self.center = center
    self.scale = scale
    self.epsilon = epsilon
    self.roles = (NORM,) * (int(center) + int(scale))

  def build(self, input_shape):
    channels = int(input_shape[-1])
    if self.scale:
      self.gamma = self.add_weight(name="gamma", shape=(channels,),
                                   initializer="ones")
    if self.center:
      self.beta = self.add_weight(name="beta", shape=(channels,),
                                  initializer="zeros")

  def normalize(self, params, x, mean, variance):
    """Applies ``(x - mean) / sqrt(var + eps) * gamma + beta``."""
    params = list(params)
    gamma = params.pop(0) if self.scale else None
    beta = params.pop(0) if self.center else None
    return normalize(x, mean, variance, self.epsilon, gamma, beta)

  def forward(self, params, x, step=0, training=True):
    if x.dtype in (tf.bfloat16, tf.float16):
      # Mixed precision: statistics and normalisation in float32.
      y = self.forward([tf.cast(p, tf.float32) for p in params],
                       tf.cast(x, tf.float32), step, training)
      return tf.cast(y, x.dtype)
    axes = list(range(1, len(x.shape) - 1))
    shape = [dim(x, axis) for axis in range(len(x.shape))]
    count = 1  # elements per statistic
    for axis in axes:
      count *= shape[axis]
    flatten = any(x.shape[a] is None or x.shape[a] > _TREE_REDUCTION_WINDOW
                  for a in axes)
    if flatten:
      # Statistics, normalisation and so every gradient sum over one axis,
      # [T, B*H*W, C] (the reshapes are free). XLA:CPU sums over several axes
      # when one is longer than 32 (miniImageNet's 75 x 84 x 84) with a slow
      # 3-d reduce-window, 30% of a miniImageNet MAML step; over one axis it
      # is 1.4-3.3x faster. With short axes (Omniglot's 5 x 14 x 14) it fuses
      # the sums into their producers, which flattening would undo (README,
      # Performance).
      x = tf.reshape(x, [shape[0], -1, x.shape[-1]])
      axes = [1]
    mean, variance = exact_moments(x, axes)
    if _STATISTICS_HOOKS:
      mean, variance = _STATISTICS_HOOKS[-1](self, step, mean, variance, count)
    y = self.normalize(params, x, mean, variance)
    return tf.reshape(y, shape) if flatten else y


class LayerNorm(FunctionalLayer):
  """Layer norm as ``tf.contrib.layers.layer_norm``: per-example statistics
  over all non-batch axes, learned scale and offset over the last axis."""

  def __init__(self, epsilon: float = 1e-12, **kwargs):
    super().__init__(**kwargs)
    self.epsilon = epsilon
    self.roles = (NORM, NORM)

  def build(self, input_shape):
    channels = int(input_shape[-1])
    self.gamma = self.add_weight(name="gamma", shape=(channels,),
                                 initializer="ones")
    self.beta = self.add_weight(name="beta", shape=(channels,),
                                initializer="zeros")

  def forward(self, params, x, step=0, training=True):
    if x.dtype in (tf.bfloat16, tf.float16):  # statistics in float32
      y = self.forward([tf.cast(p, tf.float32) for p in params],
                       tf.cast(x, tf.float32), step, training)
      return tf.cast(y, x.dtype)
    mean, variance = exact_moments(x, list(range(2, len(x.shape))))
    return normalize(x, mean, variance, self.epsilon, *params)


def max_pool_2x2(x: tf.Tensor) -> tf.Tensor:
  """2x2 max-pool, stride 2, 'VALID', on ``[T, B, H, W, C]``.

  Written as reshape + reduce_max so that it has exact derivatives of every
  order under XLA.
  """
  height, width, channels = int(x.shape[2]), int(x.shape[3]), int(x.shape[4])
  h2, w2 = height // 2, width // 2
  if height % 2 or width % 2:
    x = x[:, :, :2 * h2, :2 * w2, :]
  x = tf.reshape(x, [dim(x, 0), dim(x, 1), h2, 2, w2, 2, channels])
  return tf.reduce_max(x, axis=[3, 5])


def make_norm(norm: str, name: str, dtype=None, **kwargs) -> FunctionalLayer | None:
  """The original's ``--norm`` options: 'batch_norm', 'layer_norm', 'None'.

  ``kwargs`` are ``BatchNorm`` options (e.g. ``scale=True``); layer norm
  always learns a scale and an offset.
  """
  if norm == "batch_norm":
    return BatchNorm(name=name, dtype=dtype, **kwargs)
  if norm == "layer_norm":
    return LayerNorm(name=name, dtype=dtype)
  if norm in ("None", "none", None):
    return None
  raise ValueError(
      f"--norm={norm!r} is not recognised; expected 'batch_norm', "
      "'layer_norm' or 'None'.")
