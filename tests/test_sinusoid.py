"""Sinusoid task distribution."""

import numpy as np

from maml_tf import data
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks


def test_shapes_ranges_and_function():
  config = SinusoidConfig(num_shots=10, seed=0)
  batch = SinusoidTasks(config).batch(0, 2000)
  assert batch.support_x.shape == (2000, 10, 1)
  assert batch.query_y.shape == (2000, 10, 1)
  x = np.concatenate([batch.support_x, batch.query_x], 1)[..., 0]
  y = np.concatenate([batch.support_y, batch.query_y], 1)[..., 0]
  assert x.min() >= -5 and x.max() <= 5
  # recover amplitude from y = A sin(x - phase): max |y| <= A <= 5
  assert np.abs(y).max() <= 5.0
  assert np.abs(y).max(1).mean() > 2.0  # amplitudes spread over [0.1, 5]


def test_oracle_inputs_carry_amplitude_and_phase():
  batch = SinusoidTasks(SinusoidConfig(num_shots=5, oracle=True)).batch(0, 4)
  x = batch.support_x
  assert x.shape == (4, 5, 3)
  amp, phase = x[:, :, 1], x[:, :, 2]
  np.testing.assert_allclose(amp[:, 0:1] * np.sin(x[:, :, 0] - phase[:, 0:1]),
                             batch.support_y[..., 0], rtol=1e-5, atol=1e-6)
  assert (0.1 <= amp).all() and (amp <= 5).all()
  assert (0 <= phase).all() and (phase <= np.pi).all()


def test_deterministic_by_task_id_and_split():
  source = SinusoidTasks(SinusoidConfig(num_shots=5, seed=1))
  big = source.batch(1, 10)  # tasks 10..19
  small = source.batch(5, 2)  # tasks 10..11
  np.testing.assert_array_equal(big.support_x[:2], small.support_x)
  other = SinusoidTasks(SinusoidConfig(num_shots=5, seed=1), "test")
  assert not np.allclose(other.batch(1, 10).support_x, big.support_x)


def test_task_uniforms_are_uniform():
  u = data.task_uniforms(0, "train", np.arange(20000), 5)
  assert 0 <= u.min() and u.max() < 1
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
  assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
