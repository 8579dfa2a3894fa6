"""maml_tf: gradient-based meta-learning in TensorFlow 2.

Public API:
  TaskBatch: a typed meta-batch of tasks (leading task axis).
  MAML: second-order (or first-order) MAML, Finn et al. 2017.
  ANIL: MAML adapting only the head, Raghu et al. 2020.
  MetaSGD: element-wise learned inner learning rates, Li et al. 2017.
  MAMLPlusPlus, MAMLPPConfig: MAML++, Antoniou et al. 2019.
  MetaEstimator: scikit-learn style fit / predict / score around any of them.
  models: ``models.build(name, **kwargs)`` for the paper's networks.

Attributes are imported lazily, so tools that only need the data utilities
(e.g. ``data_prep``) do not pay for importing TensorFlow.
"""

import importlib
import os
import sys

# Two process-wide TensorFlow settings, made before TensorFlow loads and only
# where the user has not chosen (README, Installing):
# - TF 2.21's oneDNN kernels for batched matmul/einsum corrupt the heap now and
#   then (tensorflow#117700, #123109): without XLA, about one run in 25 of a
#   short meta-training crashed here (SIGSEGV/SIGABRT in MklEinsum). XLA steps
#   do not use these kernels.
# - Every call of an XLA:CPU program allocates its temporaries afresh (about
#   180 MB for the Omniglot meta-step). The default CPU allocator takes such
#   blocks from mmap and returns them after the call, so the kernel faults in
#   and zeroes their pages again on every step; TF's BFC allocator keeps and
#   reuses them. Omniglot and miniImageNet MAML ran 1.15-1.4x faster with it,
#   for up to 17% more peak memory (15% for Omniglot MAML).
if "tensorflow" not in sys.modules:
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

_EXPORTS = {
    "ANIL": ("maml_tf.anil", "ANIL"),
    "MAML": ("maml_tf.maml", "MAML"),
    "MAMLPPConfig": ("maml_tf.mamlpp", "MAMLPPConfig"),
    "MAMLPlusPlus": ("maml_tf.mamlpp", "MAMLPlusPlus"),
    "MetaEstimator": ("maml_tf.estimator", "MetaEstimator"),
    "MetaSGD": ("maml_tf.metasgd", "MetaSGD"),
    "TaskBatch": ("maml_tf.tasks", "TaskBatch"),
    "models": ("maml_tf.models", None),
}

__all__ = list(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'maml_tf' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = importlib.import_module(module)
  return value if attribute is None else getattr(value, attribute)
