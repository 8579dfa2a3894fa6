"""The benchmarked workloads and algorithms.

Each workload is a paper setting (or the one the performance issue's
reference measurements used):

* ``sinusoid``: 1-40-40-1 MLP, K=10 support + 10 query, meta-batch 25,
  1 inner step (lr 0.01), second order.
* ``omniglot``: 5-way 1-shot, conv4 (64 filters, stride 2, batch norm),
  meta-batch 32, 1 query per class, 1 inner step (lr 0.4), second order.
* ``miniimagenet``: 5-way 1-shot, conv4 (32 filters, max-pool), meta-batch 4,
  15 queries per class, 5 inner steps (lr 0.01), gradient clip 10.
* ``leo_1shot`` / ``leo_5shot``: LEO on 640-d embeddings, 5-way, meta-batch
  12, 15 queries per class, the original's defaults (5 latent + 5 fine-tuning
  steps; gradients clipped to 0.1 by value, then each tensor's norm to 0.1).
* ``leo_test``: LEO's test evaluation, tasks with all 599 remaining queries per
  class, 10 tasks per compiled call; the figure is tasks/s.

Image workloads sample from an in-memory uint8 array of the real image shape
(or a prepared cache with ``--omniglot_cache``) and LEO workloads from the
synthetic embeddings, so the input figure is the real sampler's cost.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

import maml_tf
from maml_tf import models, sinusoid
from maml_tf.class_tasks import ClassDataset, FewShotConfig, FewShotTasks
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks

MAML_FAMILY = ("maml", "fomaml", "anil", "metasgd", "mamlpp")


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmarked setting.

  Attributes:
    name: workload name.
    meta_batch_size: tasks per meta-step (or per evaluation call).
    steps_per_call: meta-steps per compiled call.
    clip_value: gradient clip by value (0: off).
    clip_norm: then clip each gradient tensor's L2 norm (0: off).
    source: builds the task source.
    model: ``maml_tf.models`` name (MAML family) or None (LEO).
    model_kwargs: ``models.build`` options.
    inner_lr, inner_steps: the MAML-family inner loop.
    leo_shots: K for LEO workloads.
    evaluation: time test evaluation (tasks/s) instead of meta-steps.
    intra_op_threads: TensorFlow's intra-op threads, as runner.py chooses
      them for this setting (0: TensorFlow's default, one per core).
    fusion_emitters: XLA:CPU's MLIR fusion emitters (TensorFlow's default)
      or the classic ones, as runner.py's ``--xla_cpu_emitters=auto``
      chooses them for this setting.
  """

  name: str
  meta_batch_size: int
  steps_per_call: int
  clip_value: float
  source: Callable[[], object]
  model: str | None = None
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  inner_lr: float = 0.0
  inner_steps: int = 0
  leo_shots: int = 0
  clip_norm: float = 0.0
  evaluation: bool = False
  intra_op_threads: int = 0
  fusion_emitters: bool = True

  @property
  def algorithms(self) -> tuple[str, ...]:
    return MAML_FAMILY if self.model else ("leo",)


def _image_source(shape, num_classes, per_class, ways, shots, queries, rotate,
                  cache=None):
  def make():
    if cache:
      from maml_tf import image_data  # a prepared cache (issue 3's format)
      dataset = image_data.load_cache(cache)["train"]
    else:
      rng = np.random.default_rng(0)
      examples = rng.integers(0, 256, (num_classes * per_class,) + shape,
                              dtype=np.uint8)
      rows = np.arange(num_classes * per_class).reshape(num_classes, per_class)
      dataset = ClassDataset(examples, list(rows),
                             [str(c) for c in range(num_classes)], "synthetic",
                             transform=lambda x: x.astype(np.float32) / 255.0)
    return FewShotTasks(dataset, FewShotConfig(ways, shots, queries,
                                               rotate=rotate))
  return make


def _leo_source(shots, queries, per_class=600):
  def make():
    from leo import data, synthetic
    splits = synthetic.generate(synthetic.SyntheticConfig(
        examples_per_class=per_class))
    split = "test" if queries > 15 else "train"
    dataset = data.dataset_from_arrays(**splits[split])
    return data.task_source(dataset, split, 5, shots, queries)
  return make


def workloads(omniglot_cache: str | None = None) -> dict[str, Workload]:
  return {
      "sinusoid": Workload(
          "sinusoid", 25, 100, 0.0,
          lambda: SinusoidTasks(SinusoidConfig(num_shots=10)),
          model="mlp_sinusoid", inner_lr=0.01, inner_steps=1,
          intra_op_threads=sinusoid.INTRA_OP_THREADS),
      "omniglot": Workload(
          "omniglot", 32, 1, 0.0,
          _image_source((28, 28, 1), 150, 20, 5, 1, 1, True, omniglot_cache),
          model="conv4_omniglot", model_kwargs={"num_classes": 5},
          inner_lr=0.4, inner_steps=1, fusion_emitters=False),
      "miniimagenet": Workload(
          "miniimagenet", 4, 1, 10.0,
          _image_source((84, 84, 3), 16, 40, 5, 1, 15, False),
          model="conv4_miniimagenet", model_kwargs={"num_classes": 5},
          inner_lr=0.01, inner_steps=5, fusion_emitters=False),
      "leo_1shot": Workload("leo_1shot", 12, 1, 0.1, _leo_source(1, 15),
                            leo_shots=1, clip_norm=0.1),
      "leo_5shot": Workload("leo_5shot", 12, 1, 0.1, _leo_source(5, 15),
                            leo_shots=5, clip_norm=0.1),
      "leo_test": Workload("leo_test", 10, 1, 0.0, _leo_source(1, 599),
                           leo_shots=1, evaluation=True),
  }


def build_learner(algorithm: str, workload: Workload, jit_compile: bool,
                  seed: int = 0, precision: str = "float32"):
  """A learner for ``algorithm`` on ``workload`` (the runner's defaults,
  dynamic loss scaling with float16 among them)."""
  if algorithm == "leo":
    from leo.config import ModelConfig
    from leo.model import LEO
    return LEO(ModelConfig(seed=seed))
  kwargs = dict(workload.model_kwargs)
  if algorithm == "mamlpp":
    kwargs["norm_scale"] = True  # per-step batch-norm weights and biases
  model = models.build(workload.model, seed=seed, compute_dtype=precision,
                       loss_scale="dynamic" if precision == "float16" else None,
                       **kwargs)
  common = dict(jit_compile=jit_compile)
  lr, steps = workload.inner_lr, workload.inner_steps
  if algorithm in ("maml", "fomaml"):
    return maml_tf.MAML(model, lr, steps, first_order=algorithm == "fomaml",
                        **common)
  if algorithm == "anil":
    return maml_tf.ANIL(model, lr, steps, **common)
  if algorithm == "metasgd":
    return maml_tf.MetaSGD(model, steps, seed=seed, **common)
  if algorithm == "mamlpp":
    return maml_tf.MAMLPlusPlus(model, lr, steps, **common)
  raise ValueError(f"unknown algorithm {algorithm!r}")
