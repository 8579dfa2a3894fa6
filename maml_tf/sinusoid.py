"""Sinusoid regression tasks (Finn et al. 2017, section 5.1).

Each task is ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``,
``phase ~ U[0, pi]`` and ``x ~ U[-5, 5]``; K support and K query points, as in
cbfinn/maml's ``generate_sinusoid_batch`` (first K points support, last K
query). The ``oracle`` baseline appends the amplitude and phase to the input.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from maml_tf.data import task_ids, task_uniforms
from maml_tf.tasks import TaskBatch

# TensorFlow's intra-op threads for sinusoid runs (runner.py's and the
# benchmark's default). A sinusoid meta-step is about 100 kernels of at most a
# few thousand FLOPs each, so its time is dispatch overhead, and handing those
# kernels to a thread pool costs more than the parallelism gives back: on one
# thread MAML's step ran 1.3-1.5x faster on 2 cores (README, Performance).
INTRA_OP_THREADS = 1


@dataclasses.dataclass(frozen=True)
class SinusoidConfig:
  """Sinusoid task distribution.

  Attributes:
    num_shots: K, support points per task (``--update_batch_size``).
    num_query: query points per task (default K, as the original).
    amplitude_range: A is uniform in this range.
    phase_range: the phase is uniform in this range.
    input_range: x is uniform in this range.
    oracle: append (A, phase) to every input (``--baseline=oracle``).
    seed: seeds every split's stream.
  """

  num_shots: int = 5
  num_query: int | None = None
  amplitude_range: tuple[float, float] = (0.1, 5.0)
  phase_range: tuple[float, float] = (0.0, math.pi)
  input_range: tuple[float, float] = (-5.0, 5.0)
  oracle: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.num_shots < 1:
      raise ValueError(f"--update_batch_size (K) must be >= 1, got {self.num_shots}")

  @property
  def input_dim(self) -> int:
    return 3 if self.oracle else 1


class SinusoidTasks:
  """A deterministic stream of sinusoid task batches for one split."""

  def __init__(self, config: SinusoidConfig, split: str = "train"):
    self.config = config
    self.split = split

  def batch(self, index: int, num_tasks: int) -> TaskBatch:
    """Batch ``index`` of ``num_tasks`` tasks.

    Returns:
      ``TaskBatch`` with ``support_x [T, K, d]``, ``support_y [T, K, 1]``,
      ``query_x [T, Q, d]``, ``query_y [T, Q, 1]`` (float32; d = 1, or 3 for
      the oracle).
    """
    c = self.config
    num_query = c.num_shots if c.num_query is None else c.num_query
    points = c.num_shots + num_query
    u = task_uniforms(c.seed, self.split, task_ids(index, num_tasks), 2 + points)

    def scale(v, bounds):
      return bounds[0] + (bounds[1] - bounds[0]) * v

    amplitude = scale(u[:, 0, None, None], c.amplitude_range)
    phase = scale(u[:, 1, None, None], c.phase_range)
    x = scale(u[:, 2:, None], c.input_range)
    y = amplitude * np.sin(x - phase)
    if c.oracle:
      x = np.concatenate([x, np.broadcast_to(amplitude, x.shape),
                          np.broadcast_to(phase, x.shape)], axis=-1)
    x, y = x.astype(np.float32), y.astype(np.float32)
    k = c.num_shots
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
