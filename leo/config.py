"""LEO's configuration: data, inner model and outer training, one frozen
dataclass each.

deepmind/leo splits its flags the same way (``config.get_data_config``,
``get_inner_model_config``, ``get_outer_model_config``); here the configs are
typed, immutable and validated when built, and only ``runner.py`` reads flags.
Field names are the original flag names, so errors name the flag to fix.
"""

from __future__ import annotations

import dataclasses
import math

DATASETS = ("miniImageNet", "tieredImageNet")
CROPS = ("center", "multiview")
DTYPES = ("float32", "float64")


def _require(condition: bool, flag: str, expected: str, value) -> None:
  if not condition:
    raise ValueError(f"--{flag}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which embeddings to read (deepmind/leo ``get_data_config``).

  Attributes:
    data_path: root of the unzipped ``embeddings/`` directory.
    dataset_name: 'miniImageNet' or 'tieredImageNet'.
    embedding_crop: 'center' or 'multiview' (miniImageNet only).
    train_on_val: meta-train on the train and val classes together (the
      paper's final numbers); validation still uses the val split.
    total_examples_per_class: images per class in a meta-validation/test task,
      support included (the original hard-codes 600: every remaining image of a
      miniImageNet class; 600 sampled ones for tieredImageNet).
  """

  data_path: str
  dataset_name: str = "miniImageNet"
  embedding_crop: str = "center"
  train_on_val: bool = False
  total_examples_per_class: int = 600

  def __post_init__(self):
    _require(bool(self.data_path), "data_path",
             "the directory that holds <dataset_name>/<embedding_crop>/"
             "{train,val,test}_embeddings.pkl", self.data_path)
    _require(self.dataset_name in DATASETS, "dataset_name",
             " or ".join(DATASETS), self.dataset_name)
    _require(self.embedding_crop in CROPS, "embedding_crop", " or ".join(CROPS),
             self.embedding_crop)
    if self.dataset_name == "tieredImageNet":
      _require(self.embedding_crop == "center", "embedding_crop",
               "center for tieredImageNet (there are no multiview "
               "tieredImageNet embeddings)", self.embedding_crop)
    _require(self.total_examples_per_class >= 2, "total_examples_per_class",
             ">= 2", self.total_examples_per_class)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The LEO model (deepmind/leo ``get_inner_model_config``).

  Greek letters are the paper's (Rusu et al. 2019, Eq. 9 and section 4.2).

  Attributes:
    inner_unroll_length: latent-space adaptation steps.
    finetuning_unroll_length: parameter-space fine-tuning steps.
    num_latents: n_z, the latent code size.
    inner_lr_init: initial value of the learned per-latent inner step size
      alpha.
    finetuning_lr_init: initial value of the learned per-dimension
      fine-tuning step size.
    dropout_rate: probability of dropping a unit (meta-training only).
    kl_weight: beta.
    encoder_penalty_weight: gamma.
    l2_penalty_weight: lambda_1.
    orthogonality_penalty_weight: lambda_2.
    num_classes: N (the classifier has one weight vector per class).
    embedding_dim: d, the embedding width (640 for the released embeddings).
    dtype: 'float32' (the original's runner) or 'float64' (its tests).
    seed: initialisation and, with the meta-step, dropout and sampling.
  """

  inner_unroll_length: int = 5
  finetuning_unroll_length: int = 5
  num_latents: int = 64
  inner_lr_init: float = 1.0
  finetuning_lr_init: float = 0.001
  dropout_rate: float = 0.5
  kl_weight: float = 1e-3
  encoder_penalty_weight: float = 1e-9
  l2_penalty_weight: float = 1e-8
  orthogonality_penalty_weight: float = 1e-3
  num_classes: int = 5
  embedding_dim: int = 640
  dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    for name in ("inner_unroll_length", "finetuning_unroll_length"):
      _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
    for name in ("num_latents", "num_classes", "embedding_dim"):
      _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
    _require(0.0 <= self.dropout_rate < 1.0, "dropout_rate",
             "a probability in [0, 1)", self.dropout_rate)
    for name in ("kl_weight", "encoder_penalty_weight", "l2_penalty_weight",
                 "orthogonality_penalty_weight"):
      value = getattr(self, name)
      _require(math.isfinite(value) and value >= 0, name, "a finite "
               "weight >= 0", value)
    for name in ("inner_lr_init", "finetuning_lr_init"):
      _require(math.isfinite(getattr(self, name)), name, "a finite number",
               getattr(self, name))
    _require(self.dtype in DTYPES, "use_64bits_dtype",
             "dtype float32 or float64", self.dtype)


@dataclasses.dataclass(frozen=True)
class OuterConfig:
  """Meta-training and evaluation (deepmind/leo ``get_outer_model_config``
  plus its runner flags).

  Attributes:
    num_classes: N, classes per task.
    num_tr_examples_per_class: K, support examples per class.
    num_val_examples_per_class: query examples per class in meta-training
      tasks (validation/test tasks use all ``total_examples_per_class - K``).
    metatrain_batch_size: tasks per meta-step.
    metavalid_batch_size: tasks per meta-validation batch.
    metatest_batch_size: tasks per meta-test batch.
    num_steps_limit: meta-steps to train for.
    outer_lr: Adam learning rate.
    gradient_threshold: clip every gradient element to this (<= 0: off).
    gradient_norm_threshold: then clip each gradient tensor's norm (<= 0: off).
    checkpoint_path: the run directory (checkpoints, best checkpoint, logs,
      flags, results).
    checkpoint_steps: checkpoint and meta-validation interval.
    evaluation_mode: only evaluate (restores the best checkpoint).
    num_metavalid_batches: meta-validation batches per validation (the
      original: 10, so 2,000 tasks).
    num_metatest_tasks: test tasks, rounded down to whole metatest batches as
      the original does (10,000 // 200 * 200).
    eval_batch_size: tasks per compiled evaluation call; bounds memory, does
      not change results.
  """

  num_classes: int = 5
  num_tr_examples_per_class: int = 1
  num_val_examples_per_class: int = 15
  metatrain_batch_size: int = 12
  metavalid_batch_size: int = 200
  metatest_batch_size: int = 200
  num_steps_limit: int = 100000
  outer_lr: float = 1e-4
  gradient_threshold: float = 0.1
  gradient_norm_threshold: float = 0.1
  checkpoint_path: str = "/tmp/leo"
  checkpoint_steps: int = 1000
  evaluation_mode: bool = False
  num_metavalid_batches: int = 10
  num_metatest_tasks: int = 10000
  eval_batch_size: int = 10

  def __post_init__(self):
    for name in ("num_classes", "num_tr_examples_per_class",
                 "num_val_examples_per_class", "metatrain_batch_size",
                 "metavalid_batch_size", "metatest_batch_size",
                 "num_metavalid_batches", "eval_batch_size"):
      _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
    _require(self.num_classes >= 2, "num_classes", ">= 2", self.num_classes)
    _require(self.num_steps_limit >= 0, "num_steps_limit", ">= 0",
             self.num_steps_limit)
    _require(self.num_metatest_tasks >= self.metatest_batch_size,
             "num_metatest_tasks", f">= --metatest_batch_size="
             f"{self.metatest_batch_size}", self.num_metatest_tasks)
    _require(math.isfinite(self.outer_lr) and self.outer_lr > 0, "outer_lr",
             "> 0", self.outer_lr)
    for name in ("gradient_threshold", "gradient_norm_threshold"):
      _require(math.isfinite(getattr(self, name)), name,
               "a finite number (<= 0: off)", getattr(self, name))
    _require(bool(self.checkpoint_path), "checkpoint_path", "a directory",
             self.checkpoint_path)
    if not self.evaluation_mode:  # the original needs 0 in evaluation mode
      _require(self.checkpoint_steps >= 1, "checkpoint_steps",
               ">= 1 when training", self.checkpoint_steps)

  @property
  def num_metavalid_tasks(self) -> int:
    return self.num_metavalid_batches * self.metavalid_batch_size

  @property
  def num_metatest_tasks_rounded(self) -> int:
    """The original's ``num_metatest_tasks // batch`` whole batches."""
    return (self.num_metatest_tasks // self.metatest_batch_size *
            self.metatest_batch_size)
