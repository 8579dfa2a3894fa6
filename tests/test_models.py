"""The paper's networks: shapes, parameter counts, roles, dtypes."""

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import layers as L
from maml_tf import models


def shapes(model):
  return [tuple(v.shape) for v in model.trainable_variables]


def test_sinusoid_mlp_matches_original():
  m = models.build("mlp_sinusoid")
  assert shapes(m) == [(1, 40), (40,), (40, 40), (40,), (40, 1), (1,)]
  assert m.task_type == models.REGRESSION
  assert m.param_roles[-2:] == (L.HEAD, L.HEAD)
  # truncated normal, std 0.01, truncated at 2 std; biases zero
  w = m.trainable_variables[2].numpy()
  assert np.abs(w).max() <= 0.02 + 1e-7 and 0.005 < w.std() < 0.015
  assert not m.trainable_variables[1].numpy().any()


def test_omniglot_conv4_matches_original():
  m = models.build("conv4_omniglot", num_classes=5)
  kernels = [s for s in shapes(m) if len(s) == 4]
  assert kernels == [(3, 3, 1, 64)] + [(3, 3, 64, 64)] * 3
  assert (64, 5) in shapes(m)  # global mean -> 64 -> N
  betas = [v for v, r in zip(m.trainable_variables, m.param_roles)
           if r == L.NORM]
  assert len(betas) == 4 and all(tuple(b.shape) == (64,) for b in betas)
  # head ~ N(0, 1) as tf.random_normal in the original
  head = m.trainable_variables[shapes(m).index((64, 5))].numpy()
  assert 0.6 < head.std() < 1.4
  assert models.count_params(m) == (9 * 64 + 3 * 9 * 64 * 64 + 4 * 64 + 4 * 64
                                    + 64 * 5 + 5)


def test_miniimagenet_conv4_flattens_800_features():
  m = models.build("conv4_miniimagenet", num_classes=5)
  assert (800, 5) in shapes(m)
  out = m(np.zeros((2, 84, 84, 3), np.float32))
  assert out.shape == (2, 5)


def test_mlp_omniglot_layers_and_flat_input():
  m = models.build("mlp_omniglot", num_classes=20)
  dense = [s for s in shapes(m) if len(s) == 2]
  assert dense == [(784, 256), (256, 128), (128, 64), (64, 64), (64, 20)]
  assert m(np.zeros((3, 784), np.float32)).shape == (3, 20)


@pytest.mark.parametrize("norm,count", [("None", 0), ("batch_norm", 4),
                                        ("layer_norm", 8)])
def test_norm_options(norm, count):
  m = models.build("conv4_omniglot", norm=norm, num_filters=8)
  assert sum(r == L.NORM for r in m.param_roles) == count


def test_float64_build_and_seeded_initialisation():
  a = models.build("conv4_omniglot", dtype="float64", seed=3, num_filters=4)
  b = models.build("conv4_omniglot", dtype="float64", seed=3, num_filters=4)
  assert all(v.dtype == "float64" for v in a.trainable_variables)
  for x, y in zip(a.trainable_variables, b.trainable_variables):
    np.testing.assert_array_equal(x.numpy(), y.numpy())
  out = a(np.zeros((1, 28, 28, 1)))
  assert out.dtype == tf.float64


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model 'conv5'"):
    models.build("conv5")


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_keeps_float32_weights_and_outputs(precision):
  """Layers compute in 16 bits; variables, fast weights and outputs stay
  float32, and the result is close to the float32 network's."""
  full = models.build("conv4_omniglot", num_filters=8, seed=0)
  mixed = models.build("conv4_omniglot", num_filters=8, seed=0,
                       compute_dtype=precision)
  x = np.random.default_rng(0).random((4, 28, 28, 1)).astype(np.float32)
  params = mixed.tile_params(2)
  out = mixed.forward(params, np.stack([x, x]))
  assert out.dtype == tf.float32 and params[0].dtype == tf.float32
  ref = full(x).numpy()
  np.testing.assert_allclose(out.numpy()[0], ref, rtol=0.1, atol=0.1)
  assert not np.allclose(out.numpy()[0], ref, rtol=1e-6, atol=1e-6)
  with tf.GradientTape() as tape:
    tape.watch(params)
    loss = tf.reduce_sum(mixed.forward(params, np.stack([x, x])))
  grads = tape.gradient(loss, params)
  assert all(g.dtype == tf.float32 for g in grads)


def test_unknown_precision_is_named():
  with pytest.raises(ValueError, match="--precision='int8'"):
    models.build("mlp_sinusoid", compute_dtype="int8")
