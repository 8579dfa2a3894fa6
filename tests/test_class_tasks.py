"""The N-way K-shot sampler."""

import numpy as np
import pytest

from maml_tf.class_tasks import (CLASS_MAJOR, ClassDataset, FewShotConfig,
                                 FewShotTasks)


def toy_dataset(classes=10, per_class=6, size=4):
  """Example value encodes (class, index): pixel [0,0] = 100*class + i."""
  examples = np.zeros((classes * per_class, size, size, 1), np.float32)
  rows = []
  for c in range(classes):
    r = np.arange(c * per_class, (c + 1) * per_class)
    examples[r, 0, 0, 0] = 100 * c + np.arange(per_class)
    rows.append(r)
  return ClassDataset(examples, rows, [f"c{c}" for c in range(classes)],
                      name="toy")


def ids(x):
  return x[..., 0, 0, 0].astype(int)


def test_shot_major_layout_labels_and_disjoint_support_query():
  tasks = FewShotTasks(toy_dataset(), FewShotConfig(5, 2, 3, seed=1))
  b = tasks.batch(0, 4)
  assert b.support_x.shape == (4, 10, 4, 4, 1)
  assert b.query_x.shape == (4, 15, 4, 4, 1)
  np.testing.assert_array_equal(b.support_y[0], np.tile(np.arange(5), 2))
  for t in range(4):
    s, q = ids(b.support_x[t]), ids(b.query_x[t])
    assert not set(s) & set(q)
    # every example's class matches its label consistently within the task
    cls_of = {}
    for value, label in zip(np.r_[s, q], np.r_[b.support_y[t], b.query_y[t]]):
      cls_of.setdefault(label, set()).add(value // 100)
    assert all(len(v) == 1 for v in cls_of.values())
    assert len({next(iter(v)) for v in cls_of.values()}) == 5


def test_class_major_layout():
  tasks = FewShotTasks(toy_dataset(),
                       FewShotConfig(3, 2, 1, layout=CLASS_MAJOR))
  b = tasks.batch(0, 2)
  np.testing.assert_array_equal(b.support_y[0], [0, 0, 1, 1, 2, 2])


def test_rotation_is_per_class_and_task():
  tasks = FewShotTasks(toy_dataset(per_class=4), FewShotConfig(
      5, 2, 2, rotate=True, seed=0))
  b = tasks.batch(0, 20)
  corners = set()
  for t in range(20):
    for label in range(5):
      imgs = np.concatenate([b.support_x[t][b.support_y[t] == label],
                             b.query_x[t][b.query_y[t] == label]])[..., 0]
      # the marked pixel moves to the same corner for the whole class
      where = {tuple(np.argwhere(im == im.max())[0]) for im in imgs
               if im.max() > 0}
      assert len(where) <= 1
      corners |= where
  assert len(corners) == 4  # all four rotations occur


@pytest.mark.parametrize("layout", ["shot_major", CLASS_MAJOR])
@pytest.mark.parametrize("rotate", [False, True])
def test_tensor_batch_is_batch_as_tensors(layout, rotate):
  tasks = FewShotTasks(toy_dataset(), FewShotConfig(
      5, 2, 3, layout=layout, rotate=rotate, seed=3))
  # TF gathers from the split as one tensor unless host-side work is needed.
  assert tasks.gathers_in_tf == (not rotate)
  expected = tasks.batch(2, 4)
  got = tasks.tensor_batch(2, 4)
  for e, g in zip(expected, got):
    assert g.dtype.as_numpy_dtype == e.dtype
    np.testing.assert_array_equal(g.numpy(), e)
  # The numpy path reads the same split afterwards (a view of the tensor).
  for e, again in zip(expected, tasks.batch(2, 4)):
    np.testing.assert_array_equal(again, e)


def test_deterministic_by_task_id():
  tasks = FewShotTasks(toy_dataset(), FewShotConfig(5, 1, 1, seed=2))
  np.testing.assert_array_equal(tasks.batch(1, 4).support_x[2],
                                tasks.batch(3, 2).support_x[0])


def test_clear_errors_for_too_few_classes_or_examples():
  with pytest.raises(ValueError, match="toy: 10 classes, fewer than "
                     "--num_classes=20"):
    FewShotTasks(toy_dataset(), FewShotConfig(20, 1, 1))
  with pytest.raises(ValueError, match="class 'c0' has 6 examples, fewer "
                     "than the 7"):
    FewShotTasks(toy_dataset(), FewShotConfig(5, 2, 5))
