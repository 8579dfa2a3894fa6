"""The benchmarked workloads and algorithms.

Each workload is the paper setting (or the one performance.md measured):

* ``sinusoid``: 1-40-40-1 MLP, K=10 support + 10 query, meta-batch 25,
  1 inner step (lr 0.01), second order.
* ``omniglot``: 5-way 1-shot, conv4 (64 filters, stride 2, batch norm),
  meta-batch 32, 1 query per class, 1 inner step (lr 0.4), second order.
* ``miniimagenet``: 5-way 1-shot, conv4 (32 filters, max-pool), meta-batch 4,
  15 queries per class, 5 inner steps (lr 0.01), gradient clip 10.

Image workloads sample from an in-memory uint8 array of the real image shape,
so the input-time figure is the real sampler's cost (with ``--omniglot_cache``
the benchmark reads a prepared cache instead).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

import maml_tf
from maml_tf import models
from maml_tf.class_tasks import ClassDataset, FewShotConfig, FewShotTasks
from maml_tf.sinusoid import SinusoidConfig, SinusoidTasks


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  model: str
  model_kwargs: dict
  meta_batch_size: int
  inner_lr: float
  inner_steps: int
  steps_per_call: int
  clip_value: float
  source: Callable[[], object]


def _image_source(shape, num_classes, per_class, ways, shots, queries, rotate,
                  cache=None):
  def make():
    if cache:
      from maml_tf import image_data  # prepared cache (issue 3 format)
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


def workloads(omniglot_cache: str | None = None) -> dict[str, Workload]:
  return {
      "sinusoid": Workload(
          "sinusoid", "mlp_sinusoid", {}, 25, 0.01, 1, 100, 0.0,
          lambda: SinusoidTasks(SinusoidConfig(num_shots=10))),
      "omniglot": Workload(
          "omniglot", "conv4_omniglot", {"num_classes": 5}, 32, 0.4, 1, 1,
          0.0, _image_source((28, 28, 1), 150, 20, 5, 1, 1, True,
                             omniglot_cache)),
      "miniimagenet": Workload(
          "miniimagenet", "conv4_miniimagenet", {"num_classes": 5}, 4, 0.01, 5,
          1, 10.0, _image_source((84, 84, 3), 16, 40, 5, 1, 15, False)),
  }


def build_learner(algorithm: str, workload: Workload, jit_compile: bool,
                  seed: int = 0, precision: str = "float32"):
  """A learner for ``algorithm`` on ``workload``."""
  model = models.build(workload.model, seed=seed, compute_dtype=precision,
                       **workload.model_kwargs)
  common = dict(jit_compile=jit_compile)
  if algorithm in ("maml", "fomaml"):
    return maml_tf.MAML(model, workload.inner_lr, workload.inner_steps,
                        first_order=algorithm == "fomaml", **common)
  raise ValueError(f"unknown algorithm {algorithm!r}")


ALGORITHMS = ("maml", "fomaml")
