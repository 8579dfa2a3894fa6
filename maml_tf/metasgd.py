"""Meta-SGD (Li, Zhou, Chen & Li, 2017).

Paper: https://arxiv.org/abs/1707.09835 ("Meta-SGD: Learning to Learn Quickly
for Few-Shot Learning").

Meta-SGD meta-learns, with the initialisation theta, a vector alpha of the
same shape as theta; the inner update is ``theta' = theta - alpha * grad``
(element-wise product), so alpha sets both the step size and the direction of
every parameter's update. Following the paper, alpha is element-wise (one rate
per parameter element, not one scalar per tensor as in
fastforwardlabs/learning-to-learn or tristandeleu/pytorch-maml), initialised
uniformly at random in [0.005, 0.1] (the paper's setup, section 4; also what
public re-implementations of its sinusoid experiment use), and the inner loop
takes one step. With more steps the same alpha is used at every step, as in
learn2learn's ``MetaSGD``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from maml_tf.maml import MAML
from maml_tf.models import MetaModel

# alpha ~ U[0.005, 0.1] element-wise (Li et al. 2017, section 4).
DEFAULT_INIT_RANGE = (0.005, 0.1)


def initial_learning_rates(shapes: Sequence[Sequence[int]],
                           init_range: tuple[float, float],
                           seed: int | None) -> list[np.ndarray]:
  """alpha at initialisation: one uniform array per shape (float64)."""
  rng = np.random.default_rng(seed)
  low, high = init_range
  return [rng.uniform(low, high, size=tuple(shape)) for shape in shapes]


class MetaSGD(MAML):
  """MAML with a meta-learned inner learning rate per parameter element.

  Args:
    model: a ``MetaModel``.
    num_inner_steps: inner steps (the paper: 1).
    first_order: stop gradients through the inner gradient (alpha still gets
      its meta-gradient, which is first order in alpha).
    init_range: ``(low, high)`` of alpha's uniform initialisation; a
      constant initialisation is ``(a, a)``.
    seed: seed of alpha's initialisation (None: nondeterministic).
    **kwargs: ``MAML`` options (``num_inner_steps_eval``, ``adapted_roles``,
      ``loss_scaling``, ``jit_compile``, ``use_tf_function``, ``name``).

  Attributes:
    learning_rates: alpha, one variable per adapted model weight, same shape;
      they follow the model's variables in ``trainable_variables`` and are
      saved with the learner's checkpoints.

  Example:
    >>> learner = MetaSGD(models.build("mlp_sinusoid"), seed=0)
    >>> loss, grads = learner.meta_gradients(batch)  # model vars, then alpha
  """

  def __init__(self, model: MetaModel, num_inner_steps: int = 1,
               first_order: bool = False, *,
               init_range: tuple[float, float] = DEFAULT_INIT_RANGE,
               seed: int | None = None, **kwargs):
    low, high = (float(v) for v in init_range)
    if not 0.0 <= low <= high:
      raise ValueError(f"--metasgd_init_range must be 'low,high' with "
                       f"0 <= low <= high, got {init_range!r}")
    # inner_lr is only reported (the rates are the variables below).
    super().__init__(model, (low + high) / 2, num_inner_steps, first_order,
                     **kwargs)
    self.init_range = (low, high)
    adapted = [v for v, a in zip(model.trainable_variables, self.adapted_mask)
               if a]
    values = initial_learning_rates([v.shape for v in adapted],
                                    self.init_range, seed)
    self.learning_rates = [
        tf.Variable(tf.constant(value, dtype=v.dtype), name=f"alpha_{i}")
        for i, (v, value) in enumerate(zip(adapted, values))
    ]

  @property
  def extra_variables(self) -> list:
    """alpha, aligned with the adapted model weights."""
    return list(self.learning_rates)

  def inner_learning_rates(self, step: int) -> list:
    """alpha for every adapted weight (the same at every step)."""
    rates = iter(self.learning_rates)
    return [next(rates) if a else None for a in self.adapted_mask]

