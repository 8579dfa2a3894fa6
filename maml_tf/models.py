"""The networks of Finn et al. (2017), as Keras models with a functional forward.

``build(name, **kwargs)`` returns a ``MetaModel``: a ``keras.Model`` whose
variables are created at construction and whose ``forward(params, x, step)``
evaluates the network at any weights aligned with ``model.trainable_variables``,
vectorised over a leading task axis (see ``layers``).

Architectures and initialisers follow cbfinn/maml (``maml.py``, ``utils.py``):

* ``mlp_sinusoid``: 1-40-40-1 ReLU MLP, regression.
* ``mlp_omniglot``: 784-256-128-64-64-N ReLU MLP (``--conv=False``).
* ``conv4_omniglot``: 4 x [3x3 conv, 64 filters, stride 2 -> norm -> ReLU],
  spatial mean, N-way head initialised N(0, 1) as in the original.
* ``conv4_miniimagenet``: 4 x [3x3 conv, 32 filters, stride 1 -> norm -> ReLU
  -> 2x2 max-pool], flatten (5*5*32 = 800), Glorot head.

Fully connected weights are truncated normal with std 0.01, conv kernels Glorot
uniform, biases zero. Hidden layers are ``norm(x W + b)`` followed by ReLU.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

import maml_tf
from maml_tf import layers as L
from maml_tf import precision

REGRESSION = "regression"
CLASSIFICATION = "classification"


class MetaModel(keras.Model):
  """A network that can be evaluated at fast weights.

  Attributes:
    task_type: ``'regression'`` or ``'classification'``.
    num_outputs: output width (N for N-way classification).
    example_shape: shape of one input example, e.g. ``(28, 28, 1)``.
    param_roles: one role per entry of ``trainable_variables`` ('weight',
      'head' or 'norm'); algorithms use it to choose what the inner loop adapts.
    loss_scale: the ``precision.LossScale`` of the 16-bit gradients, or None.
  """

  def __init__(self, example_shape: Sequence[int], num_outputs: int,
               task_type: str, compute_dtype: str | None = None,
               loss_scale: str | float | None = None, **kwargs):
    super().__init__(**kwargs)
    self.example_shape = tuple(int(d) for d in example_shape)
    self.num_outputs = int(num_outputs)
    self.task_type = task_type
    if compute_dtype not in (None, "float64", *maml_tf.PRECISIONS):
      raise ValueError(f"--precision={compute_dtype!r}: expected one of "
                       f"{', '.join(maml_tf.PRECISIONS)}")
    self.compute_dtype_name = compute_dtype
    policy = precision.parse_loss_scale(loss_scale)
    if policy is not None and compute_dtype is None:
      raise ValueError(f"--loss_scale={loss_scale!r} needs layers in a lower "
                       "precision than the variables (--precision=float16)")
    # S of the float16 gradients (see ``precision``), or None: no scaling.
    self.loss_scale = (None if policy is None else
                       precision.LossScale(policy))

  def compute_cast(self, params: Sequence[tf.Tensor], x: tf.Tensor):
    """Casts weights and inputs to the compute dtype (mixed precision).

    Variables, fast weights and inner updates stay in the variables' dtype;
    only the layers' arithmetic runs in ``compute_dtype`` (bfloat16/float16),
    and outputs come back in the variables' dtype (``apply_head``), so losses
    and gradients accumulate in full precision. With a ``loss_scale``, the
    gradients are S-scaled between these casts (``precision.enter`` and
    ``precision.leave``).
    """
    dtype = tf.as_dtype(self.compute_dtype_name or params[0].dtype)
    scale = self._scale()
    return ([precision.enter(p, dtype, scale) for p in params],
            precision.enter(x, dtype, scale))

  def _scale(self) -> tf.Tensor | None:
    return (None if self.loss_scale is None else
            tf.convert_to_tensor(self.loss_scale.scale))

  def _finish_build(self, functional_layers: Sequence[L.FunctionalLayer]):
    """Records which entries of ``trainable_variables`` belong to each layer."""
    self.built = True
    position = {id(v): i for i, v in enumerate(self.trainable_variables)}
    self._param_index = {}
    roles = [None] * len(self.trainable_variables)
    for layer in functional_layers:
      indices = [position[id(w)] for w in layer.trainable_weights]
      self._param_index[layer.name] = indices
      for i, role in zip(indices, layer.roles):
        roles[i] = role
    assert None not in roles, "every trainable variable needs a role"
    self.param_roles = tuple(roles)
    # Keras 3 keeps layers held in lists out of TensorFlow's object graph, so
    # a tf.train.Checkpoint of the model would hold only ``self.head`` and
    # restore nothing else (its other weights were saved only through the
    # optimiser's references to them). Tracking every layer by its unique
    # name makes the model's checkpoint complete on its own.
    for layer in functional_layers:
      self._track_trackable(layer, name=layer.name, overwrite=True)

  def layer_params(self, layer: L.FunctionalLayer,
                   params: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    return [params[i] for i in self._param_index[layer.name]]

  def forward(self, params: Sequence[tf.Tensor], x: tf.Tensor, step: int = 0,
              training: bool = True) -> tf.Tensor:
    """Evaluates the network at the given weights.

    Args:
      params: weights aligned with ``self.trainable_variables``, each with a
        leading task axis: ``[T, *variable.shape]``.
      x: inputs ``[T, B, *example_shape]`` (flat ``[T, B, prod(shape)]`` is
        accepted too, as the original fed flat vectors).
      step: inner-loop step index, for per-step layers (MAML++).
      training: training-mode call.

    Returns:
      ``[T, B, num_outputs]``: ``apply_head(body(x))``.
    """
    return self.apply_head(params, self.body(params, x, step, training), step,
                           training)

  def call(self, x, training=None):
    """Plain Keras call on this model's own weights: ``[B, ...] -> [B, out]``."""
    params = [tf.convert_to_tensor(v)[None] for v in self.trainable_variables]
    return self.forward(params, tf.convert_to_tensor(x)[None],
                        training=bool(training))[0]

  def body(self, params: Sequence[tf.Tensor], x: tf.Tensor, step: int = 0,
           training: bool = True) -> tf.Tensor:
    """Every layer but the head: ``[T, B, ...] -> [T, B, F]`` features."""
    raise NotImplementedError

  def apply_head(self, params: Sequence[tf.Tensor], features: tf.Tensor,
                 step: int = 0, training: bool = True) -> tf.Tensor:
    """The output layer on ``body`` features: ``[T, B, F] -> [T, B, out]``.

    ``params`` is the full list aligned with ``trainable_variables``; only the
    head's entries are read (ANIL adapts just these).
    """
    variable_dtype = params[0].dtype
    params, features = self.compute_cast(params, features)
    out = self.head.forward(self.layer_params(self.head, params), features,
                            step, training)
    return precision.leave(out, variable_dtype, self._scale())

  def tile_params(self, num_tasks) -> list[tf.Tensor]:
    """This model's variables broadcast to ``[num_tasks, *shape]``.

    The gradient of the broadcast is the sum over tasks, which is how the
    meta-gradient reaches the shared initialisation.
    """
    tensors = [tf.convert_to_tensor(w) for w in self.trainable_variables]
    if isinstance(num_tasks, int):
      return [tf.broadcast_to(v[None], [num_tasks, *v.shape]) for v in tensors]
    return [tf.broadcast_to(v[None], tf.concat([[num_tasks], tf.shape(v)], 0))
            for v in tensors]


class MLP(MetaModel):
  """Fully connected ReLU network: ``norm(xW + b) -> ReLU`` per hidden layer."""

  def __init__(self, input_dim: int, hidden: Sequence[int], num_outputs: int,
               task_type: str, norm: str = "None", seed: int | None = None,
               dtype=None, name: str | None = None, norm_scale: bool = False,
               compute_dtype: str | None = None,
               loss_scale: str | float | None = None):
    super().__init__((input_dim,), num_outputs, task_type, name=name,
                     dtype=dtype, compute_dtype=compute_dtype,
                     loss_scale=loss_scale)
    self.hidden = tuple(hidden)

    def init(i):
      return keras.initializers.TruncatedNormal(
          stddev=0.01, seed=None if seed is None else seed + i)

    self.dense_layers = []
    self.norm_layers = []
    width = input_dim
    for i, units in enumerate(self.hidden):
      dense = L.Dense(units, kernel_initializer=init(i), name=f"w{i + 1}",
                      dtype=dtype)
      dense.build((None, width))
      norm_layer = L.make_norm(norm, name=f"norm{i + 1}", dtype=dtype,
                               scale=norm_scale)
      if norm_layer is not None:
        norm_layer.build((None, units))
      self.dense_layers.append(dense)
      self.norm_layers.append(norm_layer)
      width = units
    self.head = L.Dense(num_outputs, kernel_initializer=init(len(self.hidden)),
                        role=L.HEAD, name=f"w{len(self.hidden) + 1}",
                        dtype=dtype)
    self.head.build((None, width))
    self._finish_build(self.dense_layers +
                       [n for n in self.norm_layers if n is not None] +
                       [self.head])

  def body(self, params, x, step=0, training=True):
    params, h = self.compute_cast(params, x)
    h = tf.reshape(h, [L.dim(h, 0), L.dim(h, 1), self.example_shape[0]])
    for dense, norm in zip(self.dense_layers, self.norm_layers):
      h = dense.forward(self.layer_params(dense, params), h, step, training)
      if norm is not None:
        h = norm.forward(self.layer_params(norm, params), h, step, training)
      h = tf.nn.relu(h)
    return h


class Conv4(MetaModel):
  """The four-block convolutional network of the MAML paper.

  Each block is ``conv3x3(+b) -> norm -> ReLU`` with stride 2 ('SAME'), or
  stride 1 followed by a 2x2 max-pool when ``max_pool``. The features then go
  through a spatial mean (``pooling='mean'``, the original's Omniglot net) or a
  flatten (``'flatten'``, its MiniImagenet net) into a linear head.
  """

  def __init__(self, image_shape: Sequence[int], num_classes: int,
               num_filters: int, max_pool: bool, pooling: str,
               head_initializer: str, norm: str = "batch_norm",
               seed: int | None = None, dtype=None, name: str | None = None,
               norm_scale: bool = False, compute_dtype: str | None = None,
               loss_scale: str | float | None = None):
    super().__init__(image_shape, num_classes, CLASSIFICATION, name=name,
                     dtype=dtype, compute_dtype=compute_dtype,
                     loss_scale=loss_scale)
    if pooling not in ("mean", "flatten"):
      raise ValueError(f"pooling must be 'mean' or 'flatten', got {pooling!r}")
    self.max_pool = max_pool
    self.pooling = pooling
    height, width, channels = self.example_shape
    self.conv_layers, self.norm_layers = [], []
    for i in range(4):
      conv = L.Conv2D(
          num_filters, 3, stride=1 if max_pool else 2,
          kernel_initializer=keras.initializers.GlorotUniform(
              seed=None if seed is None else seed + i),
          name=f"conv{i + 1}", dtype=dtype)
      conv.build((None, height, width, channels))
      norm_layer = L.make_norm(norm, name=f"norm{i + 1}", dtype=dtype,
                               scale=norm_scale)
      if norm_layer is not None:
        norm_layer.build((None, num_filters))
      self.conv_layers.append(conv)
      self.norm_layers.append(norm_layer)
      if max_pool:
        height, width = height // 2, width // 2
      else:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
      channels = num_filters
    features = num_filters if pooling == "mean" else height * width * channels
    if head_initializer == "normal":
      # tf.random_normal, std 1: what cbfinn/maml uses for the conv head.
      head_init = keras.initializers.RandomNormal(
          stddev=1.0, seed=None if seed is None else seed + 4)
    else:
      head_init = keras.initializers.GlorotUniform(
          seed=None if seed is None else seed + 4)
    self.head = L.Dense(num_classes, kernel_initializer=head_init, role=L.HEAD,
                        name="w5", dtype=dtype)
    self.head.build((None, features))
    self._finish_build(self.conv_layers +
                       [n for n in self.norm_layers if n is not None] +
                       [self.head])

  def body(self, params, x, step=0, training=True, return_blocks=False):
    """The four conv blocks and the pooling: ``[T, B, ...] -> [T, B, F]``.

    With ``return_blocks`` also returns each block's output ``[T, B, h, w, C]``
    (for representation analysis).
    """
    params, h = self.compute_cast(params, x)
    h = tf.reshape(h, [L.dim(h, 0), L.dim(h, 1), *self.example_shape])
    blocks = []
    for conv, norm in zip(self.conv_layers, self.norm_layers):
      h = conv.forward(self.layer_params(conv, params), h, step, training)
      if norm is not None:
        h = norm.forward(self.layer_params(norm, params), h, step, training)
      h = tf.nn.relu(h)
      if self.max_pool:
        h = L.max_pool_2x2(h)
      blocks.append(h)
    if self.pooling == "mean":
      h = tf.reduce_mean(h, axis=[2, 3])
    else:
      h = tf.reshape(h, [L.dim(h, 0), L.dim(h, 1), -1])
    return (h, blocks) if return_blocks else h


def _mlp_sinusoid(input_dim=1, norm="None", hidden=(40, 40), **kw):
  return MLP(input_dim, hidden, 1, REGRESSION, norm=norm, **kw)


def _mlp_omniglot(num_classes=5, norm="batch_norm", hidden=(256, 128, 64, 64),
                  input_dim=784, **kw):
  return MLP(input_dim, hidden, num_classes, CLASSIFICATION, norm=norm, **kw)


def _conv4_omniglot(num_classes=5, norm="batch_norm", num_filters=64,
                    max_pool=False, image_shape=(28, 28, 1), **kw):
  return Conv4(image_shape, num_classes, num_filters, max_pool, "mean",
               "normal", norm=norm, **kw)


def _conv4_miniimagenet(num_classes=5, norm="batch_norm", num_filters=32,
                        max_pool=True, image_shape=(84, 84, 3), **kw):
  return Conv4(image_shape, num_classes, num_filters, max_pool, "flatten",
               "glorot", norm=norm, **kw)


_BUILDERS = {
    "mlp_sinusoid": _mlp_sinusoid,
    "mlp_omniglot": _mlp_omniglot,
    "conv4_omniglot": _conv4_omniglot,
    "conv4_miniimagenet": _conv4_miniimagenet,
}

NAMES = tuple(_BUILDERS)


def build(name: str, **kwargs) -> MetaModel:
  """Builds one of the paper's networks with its variables created.

  Args:
    name: one of ``NAMES``: 'mlp_sinusoid', 'mlp_omniglot', 'conv4_omniglot',
      'conv4_miniimagenet'.
    **kwargs: overrides: ``num_classes``, ``norm`` ('batch_norm', 'layer_norm',
      'None'), ``num_filters``, ``max_pool``, ``image_shape``, ``hidden``,
      ``input_dim``, ``seed`` (initialiser seed), ``dtype`` ('float32' or
      'float64'), ``compute_dtype`` (mixed precision: 'bfloat16' or 'float16'
      arithmetic with float32 variables), ``loss_scale`` (with
      ``compute_dtype``: 'dynamic' or a fixed power of two, see
      ``precision``), ``norm_scale`` (batch norm also learns a scale gamma;
      the original learns only the offset beta, MAML++ learns both). The sinusoid
      MLP defaults to ``norm='None'`` (the paper's command), the others to the
      original flag default 'batch_norm'.

  Returns:
    A ``MetaModel``.

  Example:
    >>> model = build("conv4_omniglot", num_classes=5)
    >>> model(np.zeros([2, 28, 28, 1], np.float32)).shape
    TensorShape([2, 5])
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}; expected one of {NAMES}")
  return _BUILDERS[name](**kwargs)


def count_params(model: keras.Model) -> int:
  return int(sum(np.prod(v.shape) for v in model.trainable_variables))
