"""maml_tf: gradient-based meta-learning in TensorFlow 2.

Public API:
  TaskBatch: a typed meta-batch of tasks (leading task axis).
  MAML: second-order (or first-order) MAML, Finn et al. 2017.
  ANIL: MAML adapting only the head, Raghu et al. 2020.
  MetaSGD: element-wise learned inner learning rates, Li et al. 2017.
  MAMLPlusPlus, MAMLPPConfig: MAML++, Antoniou et al. 2019.
  MetaEstimator: scikit-learn style fit / predict / score around any of them.
  models: ``models.build(name, **kwargs)`` for the paper's networks.
"""

from maml_tf import models
from maml_tf.anil import ANIL
from maml_tf.estimator import MetaEstimator
from maml_tf.maml import MAML
from maml_tf.mamlpp import MAMLPlusPlus, MAMLPPConfig
from maml_tf.metasgd import MetaSGD
from maml_tf.tasks import TaskBatch

__all__ = ["ANIL", "MAML", "MAMLPPConfig", "MAMLPlusPlus", "MetaEstimator",
           "MetaSGD", "TaskBatch", "models"]
