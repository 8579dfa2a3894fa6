"""maml_tf: gradient-based meta-learning in TensorFlow 2.

Public API:
  TaskBatch: a typed meta-batch of tasks (leading task axis).
  MAML: second-order (or first-order) MAML, Finn et al. 2017.
  models: ``models.build(name, **kwargs)`` for the paper's networks.
"""

from maml_tf import models
from maml_tf.maml import MAML
from maml_tf.tasks import TaskBatch

__all__ = ["MAML", "TaskBatch", "models"]
