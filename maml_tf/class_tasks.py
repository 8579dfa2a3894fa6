"""N-way K-shot classification tasks from any class-indexed array.

One sampler serves every classification source: Omniglot, miniImageNet and
Quick Draw image caches (uint8 arrays, possibly memory-mapped) and LEO's
precomputed embeddings. A task is a pure function of (seed, split, task id)
(see ``maml_tf.data``), so streams are reproducible and resumable.

Sampling follows cbfinn/maml's ``make_data_tensor``: N distinct classes, labels
0..N-1 in a random order, ``K + Q`` distinct examples per class (support and
query disjoint), and for Omniglot one random multiple of 90 degrees per class
and task, applied to all of that class's examples. LEO's ``get_instance`` is the
same draw with a class-major layout.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

import numpy as np

from maml_tf.data import task_ids, task_rng
from maml_tf.tasks import TaskBatch

SHOT_MAJOR = "shot_major"  # cbfinn/maml: shot 0 of classes 0..N-1, then shot 1
CLASS_MAJOR = "class_major"  # deepmind/leo: all shots of class 0, then class 1


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  """An N-way K-shot task distribution.

  Attributes:
    num_classes: N (``--num_classes``).
    num_shots: K, support examples per class (``--update_batch_size``).
    num_query: Q, query examples per class.
    layout: ``'shot_major'`` (the original MAML order) or ``'class_major'``.
    rotate: rotate each class by a random multiple of 90 degrees per task
      (cbfinn/maml's Omniglot augmentation).
    seed: seeds the stream.
  """

  num_classes: int
  num_shots: int
  num_query: int
  layout: str = SHOT_MAJOR
  rotate: bool = False
  seed: int = 0

  def __post_init__(self):
    if self.num_classes < 1 or self.num_shots < 1 or self.num_query < 0:
      raise ValueError(f"invalid task shape: {self.num_classes}-way, "
                       f"{self.num_shots}-shot, {self.num_query} queries")
    if self.layout not in (SHOT_MAJOR, CLASS_MAJOR):
      raise ValueError(f"layout must be {SHOT_MAJOR!r} or {CLASS_MAJOR!r}")


class ClassDataset:
  """Examples grouped by class.

  Args:
    examples: ``[num_examples, *example_shape]`` array (may be a memmap).
    class_rows: for each class, the row indices of its examples.
    class_names: one name per class (for error messages and bookkeeping).
    name: what this dataset is (file or directory), for error messages.
    transform: applied to every gathered batch ``[..., *example_shape]``
      (e.g. uint8 -> float32 in [0, 1]); identity by default.
    class_rotations: for each class, a fixed number of 90-degree
      counter-clockwise turns applied to all its examples (rotated copies of
      a class as new classes); None: no fixed rotation.
  """

  def __init__(self, examples: np.ndarray, class_rows: Sequence[np.ndarray],
               class_names: Sequence[str], name: str = "dataset",
               transform: Callable[[np.ndarray], np.ndarray] | None = None,
               class_rotations: Sequence[int] | None = None):
    if len(class_rows) != len(class_names):
      raise ValueError(f"{name}: {len(class_rows)} classes but "
                       f"{len(class_names)} names")
    if class_rotations is not None and len(class_rotations) != len(class_rows):
      raise ValueError(f"{name}: {len(class_rows)} classes but "
                       f"{len(class_rotations)} rotations")
    self.examples = examples
    self.class_rows = [np.asarray(r, np.int64) for r in class_rows]
    self.class_names = list(class_names)
    self.name = name
    self.transform = transform
    self.class_rotations = (None if class_rotations is None else
                            np.asarray(class_rotations, np.int64) % 4)
    self._tensor = None
    self._tensor_lock = threading.Lock()

  @property
  def num_classes(self) -> int:
    return len(self.class_rows)

  @property
  def example_shape(self) -> tuple[int, ...]:
    return tuple(self.examples.shape[1:])

  def as_tensor(self) -> "tf.Tensor":
    """The examples as one TF tensor, made on first use.

    ``examples`` then becomes a numpy view of the tensor's buffer, so the
    split is held once. It is in host memory on any machine (on a GPU host,
    ``tf.constant`` would put it in the GPU's, and the view would be a second
    copy); ``FewShotTasks.tensor_batch`` gathers there too.
    """
    import tensorflow as tf  # only here: data preparation needs no TF
    with self._tensor_lock:
      if self._tensor is None:
        with tf.device("/CPU:0"):
          self._tensor = tf.constant(self.examples)
        self.examples = np.asarray(self._tensor)
      return self._tensor

  def subset(self, classes: Sequence[int], name: str | None = None
             ) -> "ClassDataset":
    """The same examples restricted to some classes (a split)."""
    rotations = (None if self.class_rotations is None else
                 self.class_rotations[list(classes)])
    return ClassDataset(self.examples, [self.class_rows[c] for c in classes],
                        [self.class_names[c] for c in classes],
                        name or self.name, self.transform, rotations)

  def with_rotated_classes(self) -> "ClassDataset":
    """Each class and its 90, 180 and 270 degree rotations as four classes.

    The protocol of Santoro et al. (2016) and Vinyals et al. (2016), where
    rotated Omniglot characters are new characters. Nothing is copied: the
    rotation is applied when a batch is gathered.
    """
    shape = self.example_shape
    if len(shape) < 2 or shape[0] != shape[1]:
      raise ValueError(f"{self.name}: rotations need square examples, got "
                       f"shape {shape}")
    base = (np.zeros(self.num_classes, np.int64) if self.class_rotations is None
            else self.class_rotations)
    rows, names, rotations = [], [], []
    for c in range(self.num_classes):
      for k in range(4):
        rows.append(self.class_rows[c])
        names.append(f"{self.class_names[c]}/rot{90 * k}")
        rotations.append(base[c] + k)
    return ClassDataset(self.examples, rows, names, self.name, self.transform,
                        rotations)

  def check(self, num_classes: int, per_class: int, what: str) -> None:
    """Raises a clear error if tasks of this shape cannot be drawn."""
    if self.num_classes < num_classes:
      raise ValueError(
          f"{self.name}: {self.num_classes} classes, fewer than "
          f"--num_classes={num_classes} ({what})")
    sizes = np.array([len(r) for r in self.class_rows])
    if sizes.min(initial=per_class) < per_class:
      bad = int(np.argmin(sizes))
      raise ValueError(
          f"{self.name}: class {self.class_names[bad]!r} has {sizes[bad]} "
          f"examples, fewer than the {per_class} a task needs ({what})")


class FewShotTasks:
  """A deterministic stream of N-way K-shot task batches.

  Args:
    dataset: a ``ClassDataset`` (one split's classes).
    config: a ``FewShotConfig``.
    split: 'train', 'val' or 'test' (separates the random streams).
  """

  def __init__(self, dataset: ClassDataset, config: FewShotConfig,
               split: str = "train"):
    per_class = config.num_shots + config.num_query
    dataset.check(config.num_classes, per_class,
                  f"{config.num_shots} support + {config.num_query} query "
                  f"examples per class, {split} split")
    self.dataset = dataset
    self.config = config
    self.split = split

  def sample_task(self, task_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``[N, K+Q]``, labels ``[N]`` (0..N-1) and rotations ``[N]``."""
    c = self.config
    rng = task_rng(c.seed, self.split, task_id)
    classes = rng.choice(self.dataset.num_classes, c.num_classes,
                         replace=False)
    per_class = c.num_shots + c.num_query
    rows = np.stack([
        rng.choice(self.dataset.class_rows[k], per_class, replace=False)
        for k in classes
    ])
    rotations = (rng.integers(0, 4, size=c.num_classes) if c.rotate else
                 np.zeros(c.num_classes, np.int64))
    if self.dataset.class_rotations is not None:
      rotations = (rotations + self.dataset.class_rotations[classes]) % 4
    return rows, np.arange(c.num_classes), rotations

  def _rows(self, index: int, num_tasks: int):
    """Example rows ``[T, N, K+Q]`` of batch ``index`` and the rotations
    ``[T, N]`` to apply (None: none)."""
    c = self.config
    sampled = [self.sample_task(int(t)) for t in task_ids(index, num_tasks)]
    rows = np.stack([s[0] for s in sampled])
    rotations = (np.stack([s[2] for s in sampled]) if
                 c.rotate or self.dataset.class_rotations is not None else None)
    return rows, rotations

  def _arrange(self, rows: np.ndarray):
    """Rows ``[T, N, count]`` in the configured layout, and their labels.

    Returns:
      ``rows [T, N, count]`` (class-major) or ``[T, count, N]`` (shot-major),
      and labels ``[T, N*count]`` int32 in the same order.
    """
    num_tasks, n, count = rows.shape
    if self.config.layout == SHOT_MAJOR:
      rows = np.swapaxes(rows, 1, 2)
      labels = np.tile(np.arange(n, dtype=np.int32), count)
    else:
      labels = np.repeat(np.arange(n, dtype=np.int32), count)
    return rows, np.broadcast_to(labels, (num_tasks, n * count)).copy()

  def batch(self, index: int, num_tasks: int) -> TaskBatch:
    """Batch ``index`` of ``num_tasks`` tasks.

    Returns:
      ``TaskBatch`` with ``support_x [T, N*K, *shape]``, ``support_y [T, N*K]``
      int32, ``query_x [T, N*Q, *shape]``, ``query_y [T, N*Q]``, in the
      configured layout.
    """
    k = self.config.num_shots
    rows, rotations = self._rows(index, num_tasks)
    # Support and query are gathered separately, each straight into its final
    # layout, so the gathered examples are never copied again.
    support_x, support_y = self._gather(rows[:, :, :k], rotations)
    query_x, query_y = self._gather(rows[:, :, k:], rotations)
    return TaskBatch(support_x, support_y, query_x, query_y)

  @property
  def gathers_in_tf(self) -> bool:
    """Whether ``tensor_batch`` gathers in TF: the examples are in memory and
    need no host-side work (transform or rotation), as LEO's embeddings."""
    dataset = self.dataset
    return (dataset.transform is None and dataset.class_rotations is None and
            not self.config.rotate and
            not isinstance(dataset.examples, np.memmap))

  def tensor_batch(self, index: int, num_tasks: int) -> TaskBatch:
    """``batch(index, num_tasks)`` as TF tensors (the same values).

    With ``gathers_in_tf`` (LEO's embeddings), TF gathers the examples from
    the split held as one tensor: one copy instead of a numpy gather plus a
    copy into TF, about 3.5x faster for LEO's test tasks of 3000 embeddings
    (see the README, Performance).
    """
    import tensorflow as tf  # only here: data preparation needs no TF
    if not self.gathers_in_tf:
      return self.batch(index, num_tasks).to_tensors()
    k = self.config.num_shots
    rows, _ = self._rows(index, num_tasks)
    examples = self.dataset.as_tensor()
    parts = []
    # On the host, beside the compiled calls (a GPU's would first copy the
    # whole split over); the compiled call then copies only the batch.
    with tf.device("/CPU:0"):
      for part in (rows[:, :, :k], rows[:, :, k:]):
        part, labels = self._arrange(part)
        x = tf.gather(examples, part.reshape(part.shape[0], -1))
        parts += [x, tf.constant(labels)]
    return TaskBatch(*parts)

  def _gather(self, rows: np.ndarray, rotations: np.ndarray | None):
    """Examples and labels of ``rows [T, N, count]`` in the configured layout.

    Returns:
      ``x [T, N*count, *shape]`` (transformed) and ``y [T, N*count]`` int32.
    """
    num_tasks, n, count = rows.shape
    rows, labels = self._arrange(rows)
    flat = rows.reshape(-1)
    shape = self.dataset.example_shape
    if isinstance(self.dataset.examples, np.memmap):
      # Read a memory-mapped cache in file order, then restore task order.
      order = np.argsort(flat, kind="stable")
      gathered = np.empty((flat.size,) + shape, self.dataset.examples.dtype)
      gathered[order] = self.dataset.examples[flat[order]]
    else:
      gathered = np.take(self.dataset.examples, flat, axis=0)
    x = gathered.reshape(rows.shape + shape)
    if rotations is not None:
      shot_major = self.config.layout == SHOT_MAJOR
      for t in range(num_tasks):
        for j in np.flatnonzero(rotations[t]):
          examples = x[t, :, j] if shot_major else x[t, j]  # [count, H, W, ...]
          examples[...] = np.rot90(examples, rotations[t, j], axes=(1, 2))
    if self.dataset.transform is not None:
      x = self.dataset.transform(x)
    return x.reshape((num_tasks, n * count) + x.shape[3:]), labels
