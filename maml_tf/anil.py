"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

Paper: https://arxiv.org/abs/1909.09157 ("Rapid Learning or Feature Reuse?
Towards Understanding the Effectiveness of MAML").

ANIL is MAML with the inner loop restricted to the network's head (the final
linear layer, role ``maml_tf.layers.HEAD``); the body is still meta-learned by
the outer loop, and its meta-gradient includes the second-order terms through
the head's inner updates. The paper shows this matches MAML's accuracy because
MAML's body barely changes in its inner loop anyway.

Because the body is not adapted, its features are the same at every inner
step. With ``cache_features`` the body runs once per task on the support set
and once on the query set; the inner loop, and the query evaluation after
every step, only re-run the head. The meta-gradient is unchanged (the cached
features stay on the outer tape), only the redundant body forward and
backward passes are gone.
"""

from __future__ import annotations

import tensorflow as tf

from maml_tf import layers as L
from maml_tf.maml import MAML, Params
from maml_tf.models import MetaModel


class ANIL(MAML):
  """MAML whose inner loop adapts only the head.

  Args:
    model: a ``MetaModel`` with a ``body`` / ``apply_head`` split (every model
      of ``maml_tf.models``).
    inner_lr: alpha, the head's inner step size.
    num_inner_steps: U, inner steps in meta-training.
    first_order: drop the second-order terms (``--stop_grad``).
    cache_features: compute the body once per task and set (same results,
      faster); False re-runs the full network at every inner step, as a
      straightforward implementation (learn2learn's ANIL example) does.
    **kwargs: ``MAML`` options (``num_inner_steps_eval``, ``loss_scaling``,
      ``jit_compile``, ``use_tf_function``, ``name``); ``adapted_roles`` is
      fixed to the head.

  Example:
    >>> anil = ANIL(models.build("conv4_omniglot"), inner_lr=0.4,
    ...             num_inner_steps=1)
    >>> loss, grads = anil.meta_gradients(batch)
  """

  def __init__(self, model: MetaModel, inner_lr: float, num_inner_steps: int,
               first_order: bool = False, *, cache_features: bool = True,
               **kwargs):
    if "adapted_roles" in kwargs:
      raise ValueError("ANIL adapts only the head; adapted_roles cannot be "
                       "set.")
    if L.HEAD not in model.param_roles:
      raise ValueError(f"model {model.name!r} has no weights with role "
                       f"{L.HEAD!r} for ANIL to adapt.")
    super().__init__(model, inner_lr, num_inner_steps, first_order,
                     adapted_roles=(L.HEAD,), **kwargs)
    self.cache_features = bool(cache_features)

  def default_tasks_per_chunk(self, num_tasks: int) -> int:
    """As MAML's, but a meta-batch of at most 4 goes at once: one task at a
    time made ANIL's miniImageNet step 1.1x as long, and its first call,
    short anyway, needs no shortening (README, Performance)."""
    if num_tasks <= L.MAX_PER_TASK_CONV_TASKS:
      return num_tasks
    return super().default_tasks_per_chunk(num_tasks)

  def encode(self, params: Params, x: tf.Tensor, training: bool):
    """The body's features ``[T, B, F]`` with ``cache_features``, else ``x``."""
    if not self.cache_features:
      return x
    return self.model.body(params, x, 0, training)

  def forward(self, params: Params, x: tf.Tensor, step: int,
              training: bool) -> tf.Tensor:
    """The head on cached features, or the whole network on raw inputs."""
    if not self.cache_features:
      return self.model.forward(params, x, step, training)
    return self.model.apply_head(params, x, step, training)
