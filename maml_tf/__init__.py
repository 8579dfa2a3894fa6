"""maml_tf: gradient-based meta-learning in TensorFlow 2.

Public API:
  TaskBatch: a typed meta-batch of tasks (leading task axis).
  MAML: second-order (or first-order) MAML, Finn et al. 2017.
  ANIL: MAML adapting only the head, Raghu et al. 2020.
  MetaSGD: element-wise learned inner learning rates, Li et al. 2017.
  MAMLPlusPlus, MAMLPPConfig: MAML++, Antoniou et al. 2019.
  MetaEstimator: scikit-learn style fit / predict / score around any of them.
  models: ``models.build(name, **kwargs)`` for the paper's networks.
  use_xla_cpu_fusion_emitters: choose XLA:CPU's kernel emitters, before the
    first compilation.
  xla_cache: TensorFlow's on-disk XLA cache, one directory per machine
    (``xla_cache.configure``, before the first compilation).
  PRECISIONS: the layers' arithmetic types (mixed precision).

Attributes are imported lazily, so tools that only need the data utilities
(e.g. ``data_prep``) do not pay for importing TensorFlow.
"""

import importlib
import os
import sys

# Three process-wide TensorFlow settings, made before TensorFlow loads and only
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
# - On a GPU, TensorFlow reserves nearly all of its memory at the first op;
#   growing on demand lets a test run beside training, and the benchmark's
#   child processes beside its parent (which measured the peak matmul).
if "tensorflow" not in sys.modules:
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
  os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

# The layers' arithmetic types (``runner.py --precision``, ``models.build(...,
# compute_dtype=...)``): float32, or mixed precision with float32 variables.
PRECISIONS = ("float32", "bfloat16", "float16")

_FUSION_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters"


def use_xla_cpu_fusion_emitters(enabled: bool) -> bool:
  """Chooses XLA:CPU's kernel emitters for this process, through
  ``XLA_FLAGS``, unless the user's ``XLA_FLAGS`` already chooses them.

  XLA reads ``XLA_FLAGS`` once, at the process's first compilation, so call
  this before anything is compiled. With TF 2.21's default, the MLIR fusion
  emitters (True), the sinusoid's steps run up to 16% faster; with the
  classic emitters (False), the Omniglot meta-step peaks 0.3 GB lower, and
  the conv4 MAML steps compile and run faster (README, Performance). Applied
  only with the TensorFlow release this was measured on, 2.21: XLA aborts on
  a flag it does not know.

  Returns:
    Whether this call set the flag (False: the user's ``XLA_FLAGS`` already
    chooses, or TensorFlow is not 2.21).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _FUSION_EMITTERS_FLAG in flags:
    return False
  if not (_tensorflow_version() or "").startswith("2.21."):
    return False
  value = "true" if enabled else "false"
  os.environ["XLA_FLAGS"] = f"{flags} {_FUSION_EMITTERS_FLAG}={value}".strip()
  return True


def gpus_tensorflow_cannot_use(
    driver_directory: str = "/proc/driver/nvidia/gpus") -> int:
  """GPUs the NVIDIA driver lists while TensorFlow sees none (0 otherwise).

  Then everything runs on the CPU: a CPU-only TensorFlow wheel, or missing
  CUDA libraries (``pip install "tensorflow[and-cuda]"``). TensorFlow's own
  warning is hidden at ``TF_CPP_MIN_LOG_LEVEL=2``. GPUs hidden on purpose,
  with ``CUDA_VISIBLE_DEVICES`` empty or -1, do not count.
  """
  if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
    return 0
  try:
    listed = len(os.listdir(driver_directory))
  except OSError:  # no NVIDIA driver (or no /proc)
    return 0
  import tensorflow as tf
  return 0 if tf.config.list_logical_devices("GPU") else listed


def _tensorflow_version() -> str | None:
  from importlib import metadata  # without importing TensorFlow
  for distribution in ("tensorflow", "tensorflow-cpu"):
    try:
      return metadata.version(distribution)
    except metadata.PackageNotFoundError:
      pass
  return None


_EXPORTS = {
    "ANIL": ("maml_tf.anil", "ANIL"),
    "MAML": ("maml_tf.maml", "MAML"),
    "MAMLPPConfig": ("maml_tf.mamlpp", "MAMLPPConfig"),
    "MAMLPlusPlus": ("maml_tf.mamlpp", "MAMLPlusPlus"),
    "MetaEstimator": ("maml_tf.estimator", "MetaEstimator"),
    "MetaSGD": ("maml_tf.metasgd", "MetaSGD"),
    "TaskBatch": ("maml_tf.tasks", "TaskBatch"),
    "models": ("maml_tf.models", None),
    "xla_cache": ("maml_tf.xla_cache", None),
}

__all__ = [*_EXPORTS, "use_xla_cpu_fusion_emitters",
           "gpus_tensorflow_cannot_use", "PRECISIONS"]


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'maml_tf' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = importlib.import_module(module)
  return value if attribute is None else getattr(value, attribute)
