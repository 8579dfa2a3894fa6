"""The cache loader, its validation, query sizes and image task sources."""

import json
import os

import numpy as np
import pytest

from data_prep import miniimagenet
from maml_tf import image_data
from maml_tf.class_tasks import ClassDataset, FewShotConfig, FewShotTasks
from tests import image_files


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory):
  root = tmp_path_factory.mktemp("mini")
  image_files.mini_csv_layout(root / "raw", per_class=17)
  miniimagenet.prepare(miniimagenet.MiniImageNetPrepConfig(
      str(root / "raw"), str(root / "cache")))
  return root / "cache"


def test_load_cache_memmaps_and_scales(omniglot_cache):
  splits = image_data.load_cache(str(omniglot_cache), "omniglot")
  assert [splits[s].num_classes for s in ("train", "val", "test")] == [
      150, 30, 13]
  train = splits["train"]
  assert isinstance(train.examples, np.memmap)
  assert train.example_shape == (28, 28, 1)
  assert str(omniglot_cache) in train.name and "train split" in train.name
  x = train.transform(train.examples[train.class_rows[0]])
  assert x.dtype == np.float32 and set(np.unique(x)) == {0.0, 1.0}
  # Ink is 1 and the background 0, as after the original's 1 - x.
  assert x.mean() < 0.3


def test_task_batches_are_float_images_and_omniglot_rotates(omniglot_cache):
  # (What the rotation does is tested in test_class_tasks.)
  config = image_data.ImageTasksConfig(str(omniglot_cache), "omniglot", 5, 1)
  train, val, test = image_data.task_sources(config)
  assert train.config.rotate and train.config.num_query == 1
  batch = train.batch(0, 3)
  assert batch.support_x.shape == (3, 5, 28, 28, 1)
  assert batch.query_x.shape == (3, 5, 28, 28, 1)
  assert batch.support_x.dtype == np.float32
  assert set(np.unique(batch.support_x)) <= {0.0, 1.0}
  # The same task id gives the same task; the splits differ.
  np.testing.assert_array_equal(train.batch(0, 3).support_x, batch.support_x)
  assert not np.array_equal(val.batch(0, 3).support_x, batch.support_x)
  none = image_data.ImageTasksConfig(str(omniglot_cache), "omniglot", 5, 1,
                                     rotation="none")
  assert not image_data.task_sources(none)[0].config.rotate
  # HTTYM's: rotated training tasks, unrotated validation and test tasks.
  train_only = image_data.task_sources(image_data.ImageTasksConfig(
      str(omniglot_cache), "omniglot", 5, 1, rotation="train"))
  assert [s.config.rotate for s in train_only] == [True, False, False]


def test_rotations_as_classes(omniglot_cache):
  config = image_data.ImageTasksConfig(str(omniglot_cache), "omniglot", 5, 1,
                                       rotation="classes")
  train, _, test = image_data.task_sources(config)
  assert train.dataset.num_classes == 4 * 150 and not train.config.rotate
  assert test.dataset.num_classes == 4 * 13
  classes = train.dataset
  assert [n.rsplit("/", 1)[1] for n in classes.class_names[:4]] == [
      "rot0", "rot90", "rot180", "rot270"]
  # A 4-way task over the four rotations of one character: every rotation
  # once, each applied to the gathered images.
  tasks = FewShotTasks(classes.subset([0, 1, 2, 3]),
                       FewShotConfig(4, 2, 0, seed=0))
  for t in range(3):
    rows, _, rotations = tasks.sample_task(t)
    assert sorted(rotations) == [0, 1, 2, 3]
    x = tasks.batch(t, 1).support_x[0]  # shot-major: x[s * 4 + j]
    for j in range(4):
      for s in range(2):
        expected = np.rot90(classes.examples[rows[j, s]], rotations[j])
        np.testing.assert_array_equal(x[s * 4 + j], expected / 255.0)


def test_original_query_sizes(mini_cache):
  assert image_data.original_num_query("omniglot", 5, False) == 5
  assert image_data.original_num_query("omniglot", 1, True) == 1
  assert image_data.original_num_query("quickdraw", 3, False) == 3
  assert image_data.original_num_query("miniimagenet", 1, False) == 15
  assert image_data.original_num_query("miniimagenet", 5, True) == 5
  config = image_data.ImageTasksConfig(str(mini_cache), "miniimagenet", 2, 1)
  train, val, test = image_data.task_sources(config)
  assert (train.config.num_query, val.config.num_query,
          test.config.num_query) == (15, 15, 1)
  assert not train.config.rotate  # no augmentation for miniImageNet
  _, val, _ = image_data.task_sources(config, val_meta_test=True)
  assert val.config.num_query == 1
  custom = image_data.ImageTasksConfig(str(mini_cache), "miniimagenet", 2, 1,
                                       num_query=4, num_query_test=15)
  train, val, test = image_data.task_sources(custom)
  assert (train.config.num_query, val.config.num_query,
          test.config.num_query) == (4, 4, 15)
  batch = test.batch(0, 2)
  assert batch.query_x.shape == (2, 30, 84, 84, 3)
  assert batch.support_x.dtype == np.float32


def test_sampler_errors_name_the_cache_and_flags(omniglot_cache, mini_cache):
  with pytest.raises(ValueError, match=r"\(test split\): 13 classes, fewer "
                     r"than --num_classes=20") as e:
    image_data.task_sources(image_data.ImageTasksConfig(
        str(omniglot_cache), "omniglot", 20, 1))
  assert str(omniglot_cache) in str(e.value)
  with pytest.raises(ValueError, match=r"has 17 examples, fewer than the 20 "
                     r"a task needs \(5 support \+ 15 "
                     r"query.*--num_query=-1") as e:
    image_data.task_sources(image_data.ImageTasksConfig(
        str(mini_cache), "miniimagenet", 2, 5))
  assert str(mini_cache) in str(e.value)


def test_config_errors_name_the_flags(tmp_path):
  with pytest.raises(ValueError, match="needs --data_path.*python -m "
                     "data_prep.quickdraw"):
    image_data.ImageTasksConfig("", "quickdraw", 5, 1)
  with pytest.raises(ValueError, match="--num_query_test must be >= 1 or -1"):
    image_data.ImageTasksConfig(str(tmp_path), "omniglot", 5, 1,
                                num_query_test=0)
  with pytest.raises(ValueError, match="--rotation='sometimes'"):
    image_data.ImageTasksConfig(str(tmp_path), "omniglot", 5, 1,
                                rotation="sometimes")


def copy_cache(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_cache_validation(omniglot_cache, tmp_path):
  with pytest.raises(image_data.CacheError, match="no such cache directory; "
                     "prepare it with: python -m data_prep.omniglot"):
    image_data.load_cache(str(tmp_path / "nothing"), "omniglot")
  (tmp_path / "empty").mkdir()
  with pytest.raises(image_data.CacheError, match="index.json not found"):
    image_data.load_cache(str(tmp_path / "empty"), "omniglot")
  with pytest.raises(image_data.CacheError, match="holds 'omniglot', not "
                     "'quickdraw': check --datasource and --data_path"):
    image_data.load_cache(str(omniglot_cache), "quickdraw")

  def broken(name, edit_index=None, edit_array=None):
    cache = copy_cache(omniglot_cache, tmp_path / name)
    if edit_index:
      index = json.loads((cache / "index.json").read_text())
      edit_index(index)
      (cache / "index.json").write_text(json.dumps(index))
    if edit_array:
      edit_array(cache / "images.npy")
    return str(cache)

  def set_version(i):
    i["version"] = 99

  def overflow(i):
    i["classes"][-1]["count"] = 21

  def bad_split(i):
    i["classes"][0]["split"] = "dev"

  def list_name(i):
    i["classes"][0]["name"] = ["a"]

  def shared_rows(i):  # a test class reading a train class's images
    test = next(c for c in i["classes"] if c["split"] == "test")
    train = next(c for c in i["classes"] if c["split"] == "train")
    test["start"], test["count"] = train["start"], train["count"]

  def npz_instead(p):
    np.savez(str(p) + ".npz", images=np.zeros(3, np.uint8))
    os.replace(str(p) + ".npz", p)

  cases = [
      (broken("v", set_version), "format version 99, expected 1"),
      (broken("o", overflow), "outside array 'images'"),
      (broken("s", bad_split), "split 'dev' is not one of"),
      # These were a TypeError, a traceback, or (shared rows) accepted: the
      # test split then held training images.
      (broken("l", list_name), "name, split and array must be strings"),
      (broken("c", lambda i: i.update(classes=None)),
       "'classes' must be a list"),
      (broken("r", shared_rows), "share rows of array 'images'"),
      (broken("e", edit_array=lambda p: p.write_bytes(b"")),
       "images.npy: not a readable .npy array \\(empty"),
      (broken("z", edit_array=npz_instead),
       "images.npy: not a readable .npy array \\(an .npz archive"),
      (broken("k", edit_array=lambda p: (npz_instead(p), p.write_bytes(
          p.read_bytes()[:40]))), "images.npy: not a readable .npy array "
       "\\(a damaged .npz archive"),
      (broken("t", edit_array=lambda p: p.write_bytes(p.read_bytes()[:1000])),
       "images.npy: not a readable .npy array"),
      (broken("m", edit_array=lambda p: p.unlink()),
       "images.npy not found \\(named in index.json\\)"),
      (broken("d", edit_array=lambda p: np.save(
          p, np.zeros((386, 28, 28, 1), np.float32))),
       "float32 \\(386, 28, 28, 1\\), expected uint8"),
  ]
  for path, message in cases:
    with pytest.raises(image_data.CacheError, match=message):
      image_data.load_cache(path, "omniglot")
  (tmp_path / "j").mkdir()
  (tmp_path / "j" / "index.json").write_text("{not json")
  with pytest.raises(image_data.CacheError, match="unreadable JSON"):
    image_data.load_cache(str(tmp_path / "j"))


def test_class_rotations_compose_with_task_rotation():
  examples = np.zeros((2, 3, 3, 1), np.uint8)
  examples[:, 0, 0, 0] = 1  # a marked corner
  dataset = ClassDataset(examples, [np.array([0, 1])], ["c"])
  rotated = dataset.with_rotated_classes()
  assert rotated.class_names == ["c/rot0", "c/rot90", "c/rot180", "c/rot270"]
  tasks = FewShotTasks(rotated.subset([1]), FewShotConfig(1, 1, 1, seed=3,
                                                          rotate=True))
  for t in range(8):
    _, _, rot = tasks.sample_task(t)
    x = tasks.batch(t, 1).support_x[0, 0]
    np.testing.assert_array_equal(x, np.rot90(examples[0], rot[0]))
  turns = {int(tasks.sample_task(t)[2][0]) for t in range(40)}
  assert turns == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="rotations need square examples"):
    ClassDataset(np.zeros((2, 5)), [np.array([0, 1])],
                 ["e"]).with_rotated_classes()
