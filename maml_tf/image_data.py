"""Prepared few-shot image caches: format, validated loading, task sources.

``data_prep/{omniglot,miniimagenet,quickdraw}.py`` turn the official dataset
files into a *cache directory* that training reads without decoding a single
image:

* one or more ``.npy`` arrays ``[num_rows, H, W, C]`` uint8, opened with
  ``mmap_mode='r'`` (miniImageNet's 1.3 GB never has to fit in memory);
* ``index.json``: the format tag, the dataset name, the image shape, the
  arrays, and one record per class ``{name, split, array, start, count,
  source}`` (the class's examples are rows ``start .. start+count-1`` of
  ``array``), plus the split rule and the provenance of the inputs.

Every cache stores pixels so that ``value / 255`` is the network input in
``[0, 1]`` (``to_unit_float``): Omniglot is inverted when it is prepared, so ink
is 1 as after cbfinn/maml's ``1 - x``; Quick Draw bitmaps already have ink 255;
miniImageNet is RGB ``/ 255`` with no mean subtraction, as the original.

Tasks come from ``maml_tf.class_tasks.FewShotTasks`` with the original's query
sizes (``original_num_query``): K per class for Omniglot and Quick Draw; for
miniImageNet 15 while meta-training (and in the validation done during
training) but K at meta-test time.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from maml_tf.class_tasks import ClassDataset, FewShotConfig, FewShotTasks
from maml_tf import io_utils
from maml_tf.data import SPLITS

FORMAT = "maml_tf.class_cache"
VERSION = 1
INDEX_FILE = "index.json"
DATASOURCES = ("omniglot", "miniimagenet", "quickdraw")
ROTATIONS = ("auto", "task", "train", "classes", "none")

# The command that builds each cache, quoted by every "cache not found" error.
PREPARE_COMMANDS = {
    "omniglot": "python -m data_prep.omniglot --input <dir with "
                "images_background.zip and images_evaluation.zip, or "
                "images_background_small1.zip and images_background_small2."
                "zip> --output <cache dir>",
    "miniimagenet": "python -m data_prep.miniimagenet --input <dir with "
                    "images/ and train.csv, val.csv, test.csv, or train/, "
                    "val/, test/ class folders> --output <cache dir>",
    "quickdraw": "python -m data_prep.quickdraw --input <dir with "
                 "<category>.npy bitmap files> --output <cache dir>",
}


class CacheError(ValueError):
  """A cache directory is missing, incomplete or not in the expected format."""


def to_unit_float(x: np.ndarray) -> np.ndarray:
  """Cached uint8 pixels -> float32 in ``[0, 1]`` (``x / 255``)."""
  return np.asarray(x, np.float32) / np.float32(255.0)


def _prepare_hint(datasource: str | None) -> str:
  if datasource in PREPARE_COMMANDS:
    return f"prepare it with: {PREPARE_COMMANDS[datasource]}"
  return "prepare it with one of the data_prep commands (see README)"


def read_index(path: str, datasource: str | None = None) -> dict:
  """Reads and validates ``path/index.json``.

  Args:
    path: cache directory.
    datasource: if given, the dataset the cache must hold.

  Returns:
    The index as a dict.

  Raises:
    CacheError: naming the file and what was expected.
  """
  index_path = os.path.join(path, INDEX_FILE)
  if not os.path.isdir(path):
    raise CacheError(f"{path}: no such cache directory; "
                     f"{_prepare_hint(datasource)}")
  if not os.path.isfile(index_path):
    raise CacheError(f"{index_path} not found: {path} is not a prepared "
                     f"cache; {_prepare_hint(datasource)}")
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CacheError(f"{index_path}: unreadable JSON ({e}); prepare the "
                     "cache again") from e

  def fail(what):
    raise CacheError(f"{index_path}: {what}; prepare the cache again with "
                     "this version of data_prep")

  if not isinstance(index, dict) or index.get("format") != FORMAT:
    fail(f"not a {FORMAT!r} index")
  if index.get("version") != VERSION:
    fail(f"format version {index.get('version')!r}, expected {VERSION}")
  for key in ("dataset", "image_shape", "dtype", "arrays", "classes"):
    if key not in index:
      fail(f"missing key {key!r}")
  if datasource is not None and index["dataset"] != datasource:
    raise CacheError(
        f"{path} holds {index['dataset']!r}, not {datasource!r}: check "
        f"--datasource and --data_path")
  shape = index["image_shape"]
  if (not isinstance(shape, list) or len(shape) != 3 or
      not all(isinstance(d, int) and d > 0 for d in shape)):
    fail(f"image_shape must be [H, W, C], got {shape!r}")
  if index["dtype"] != "uint8":
    fail(f"dtype must be 'uint8', got {index['dtype']!r}")
  arrays = index["arrays"]
  if not isinstance(arrays, dict) or not arrays:
    fail("'arrays' must name at least one array")
  for name, spec in arrays.items():
    if (not isinstance(spec, dict) or not isinstance(spec.get("file"), str) or
        not isinstance(spec.get("num_rows"), int)):
      fail(f"array {name!r} needs 'file' and 'num_rows'")
  if not isinstance(index["classes"], list):
    fail("'classes' must be a list of class records")
  names = set()
  for i, cls in enumerate(index["classes"]):
    if not isinstance(cls, dict) or not all(
        k in cls for k in ("name", "split", "array", "start", "count")):
      fail(f"class record {i} needs name, split, array, start and count")
    if not all(isinstance(cls[k], str) for k in ("name", "split", "array")):
      fail(f"class record {i}: name, split and array must be strings")
    if cls["name"] in names:
      fail(f"class {cls['name']!r} appears twice")
    names.add(cls["name"])
    if cls["split"] not in SPLITS:
      fail(f"class {cls['name']!r}: split {cls['split']!r} is not one of "
           f"{SPLITS}")
    if cls["array"] not in arrays:
      fail(f"class {cls['name']!r}: unknown array {cls['array']!r}")
    start, count = cls["start"], cls["count"]
    if (not isinstance(start, int) or not isinstance(count, int) or
        start < 0 or count < 1 or
        start + count > arrays[cls["array"]]["num_rows"]):
      fail(f"class {cls['name']!r}: rows {start}..{start}+{count} outside "
           f"array {cls['array']!r}")
  # Classes sharing rows would share images, across splits too.
  previous = {}
  for cls in sorted(index["classes"], key=lambda c: (c["array"], c["start"])):
    other = previous.get(cls["array"])
    if other is not None and cls["start"] < other["start"] + other["count"]:
      fail(f"classes {other['name']!r} and {cls['name']!r} share rows of "
           f"array {cls['array']!r}")
    if other is None or (cls["start"] + cls["count"] >
                         other["start"] + other["count"]):
      previous[cls["array"]] = cls  # the one reaching furthest
  return index


def _open_array(path: str, spec: dict, shape: tuple[int, ...]) -> np.ndarray:
  file = os.path.join(path, spec["file"])
  if not os.path.isfile(file):
    raise CacheError(f"{file} not found (named in {INDEX_FILE}); the cache is "
                     "incomplete, prepare it again")
  try:
    array = io_utils.open_npy(file)
  except ValueError as e:
    raise CacheError(f"{file}: not a readable .npy array ({e}); prepare the "
                     "cache again") from e
  expected = (spec["num_rows"],) + shape
  if array.dtype != np.uint8 or array.shape != expected:
    raise CacheError(f"{file}: {array.dtype} {array.shape}, expected uint8 "
                     f"{expected} as {INDEX_FILE} says; prepare the cache "
                     "again")
  return array


def load_cache(path: str, datasource: str | None = None
               ) -> dict[str, ClassDataset]:
  """Opens a prepared cache, memory-mapped.

  Args:
    path: cache directory (``--data_path``).
    datasource: if given, the dataset the cache must hold (``--datasource``).

  Returns:
    ``{'train', 'val', 'test'}`` -> ``ClassDataset`` whose examples are
    ``[rows, H, W, C]`` uint8 memmaps and whose transform is
    ``to_unit_float`` (batches come out float32 in ``[0, 1]``). A split with
    no classes is an empty dataset (the sampler then names it in its error).

  Raises:
    CacheError: a missing or malformed cache, naming the file.
  """
  index = read_index(path, datasource)
  shape = tuple(index["image_shape"])
  arrays = {name: _open_array(path, spec, shape)
            for name, spec in index["arrays"].items()}
  splits = {}
  for split in SPLITS:
    classes = [c for c in index["classes"] if c["split"] == split]
    used = sorted({c["array"] for c in classes})
    if len(used) > 1:
      raise CacheError(f"{os.path.join(path, INDEX_FILE)}: the {split} "
                       f"split spans arrays {used}; expected one per split")
    examples = arrays[used[0]] if used else np.zeros((0,) + shape, np.uint8)
    splits[split] = ClassDataset(
        examples,
        [np.arange(c["start"], c["start"] + c["count"]) for c in classes],
        [c["name"] for c in classes], name=f"{path} ({split} split)",
        transform=to_unit_float)
  return splits


def original_num_query(datasource: str, num_shots: int,
                       meta_test: bool) -> int:
  """Query examples per class as cbfinn/maml's ``data_generator``.

  Omniglot uses ``2K`` examples per class everywhere (K query). MiniImagenet
  uses ``K + 15`` while meta-training and for the validation during training,
  but ``2K`` at test time, so 1-shot tests have 1 query per class (a known
  quirk; ``--num_query_test`` overrides it). Quick Draw (not in the original)
  uses K, like Omniglot.
  """
  if datasource == "miniimagenet" and not meta_test:
    return 15
  return num_shots


@dataclasses.dataclass(frozen=True)
class ImageTasksConfig:
  """N-way K-shot tasks from a prepared cache.

  Attributes:
    data_path: the cache directory (``--data_path``).
    datasource: 'omniglot', 'miniimagenet' or 'quickdraw' (``--datasource``).
    num_classes: N (``--num_classes``).
    num_shots: K (``--update_batch_size``).
    num_query: query examples per class while meta-training and for the
      validation during training (``--num_query``; -1: the original's rule).
    num_query_test: query examples per class at meta-test time
      (``--num_query_test``; -1: the original's rule).
    rotation: 'task' (a random multiple of 90 degrees per class and task, the
      original's Omniglot augmentation, applied to every split), 'train' (the
      same in the train split only, as HowToTrainYourMAML), 'classes' (the
      four rotations of every class are distinct classes), 'none', or
      'auto' ('task' for Omniglot, 'none' otherwise) (``--rotation``).
    seed: seeds every split's task stream (``--seed``).
  """

  data_path: str
  datasource: str
  num_classes: int
  num_shots: int
  num_query: int = -1
  num_query_test: int = -1
  rotation: str = "auto"
  seed: int = 0

  def __post_init__(self):
    if not self.data_path:
      raise ValueError(f"--datasource={self.datasource} needs --data_path, "
                       f"the prepared cache; {_prepare_hint(self.datasource)}")
    if self.datasource not in DATASOURCES:
      raise ValueError(f"--datasource={self.datasource!r}: expected one of "
                       f"{DATASOURCES}")
    if self.num_classes < 1:
      raise ValueError(f"--num_classes must be >= 1, got {self.num_classes}")
    if self.num_shots < 1:
      raise ValueError(
          f"--update_batch_size must be >= 1, got {self.num_shots}")
    for name in ("num_query", "num_query_test"):
      if getattr(self, name) < -1 or getattr(self, name) == 0:
        raise ValueError(f"--{name} must be >= 1 or -1 (the original's "
                         f"rule), got {getattr(self, name)}")
    if self.rotation not in ROTATIONS:
      raise ValueError(f"--rotation={self.rotation!r}: expected one of "
                       f"{ROTATIONS}")

  @property
  def rotation_mode(self) -> str:
    if self.rotation == "auto":
      return "task" if self.datasource == "omniglot" else "none"
    return self.rotation

  def query_size(self, meta_test: bool) -> int:
    value = self.num_query_test if meta_test else self.num_query
    if value == -1:
      return original_num_query(self.datasource, self.num_shots, meta_test)
    return value


def task_sources(config: ImageTasksConfig, val_meta_test: bool = False
                 ) -> tuple[FewShotTasks, FewShotTasks, FewShotTasks]:
  """The (train, val, test) task sources of a cache.

  Args:
    config: an ``ImageTasksConfig``.
    val_meta_test: the validation split is used for a final meta-test
      (``--train=False`` without ``--test_set``), so it gets the meta-test
      query size; otherwise it is the validation during training and gets the
      meta-training one.

  Returns:
    Three ``FewShotTasks`` in the shot-major layout.

  Raises:
    CacheError: a missing or malformed cache.
    ValueError: a split too small for the task shape, naming the cache, the
      split and the flags.
  """
  splits = load_cache(config.data_path, config.datasource)
  mode = config.rotation_mode
  if mode == "classes":
    splits = {k: v.with_rotated_classes() for k, v in splits.items()}

  def make(split: str, meta_test: bool) -> FewShotTasks:
    num_query = config.query_size(meta_test)
    flag = "--num_query_test" if meta_test else "--num_query"
    rotate = mode == "task" or mode == "train" and split == "train"
    task_config = FewShotConfig(config.num_classes, config.num_shots,
                                num_query, rotate=rotate, seed=config.seed)
    try:
      return FewShotTasks(splits[split], task_config, split)
    except ValueError as e:
      raise ValueError(f"{e}; the support size is --update_batch_size="
                       f"{config.num_shots}, the query size {num_query} "
                       f"comes from {flag}={getattr(config, flag[2:])} (-1: "
                       "the original's rule)") from e

  return (make("train", False), make("val", val_meta_test),
          make("test", True))
