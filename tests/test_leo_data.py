"""LEO's embeddings: the original on-disk format, safe loading, the class
index, task sampling and the synthetic set."""

import os
import pickle
import struct

import numpy as np
import pytest

from leo import data, synthetic
from leo.config import DataConfig

WIDTH = 3


def make_split(first_class, classes, per_class):
  """Keys in the original format; embedding of row r = [1, r, class], so the
  row and class survive L2 normalisation (x[1] / x[0], x[2] / x[0])."""
  keys, rows = [], []
  for c in range(first_class, first_class + classes):
    wnid = f"n{c:08d}"
    for j in range(per_class):
      r = len(rows)
      keys.append(f"{r}-{wnid}-{wnid}_{j}.JPEG")
      rows.append([1.0, r, c])
  return {"keys": np.asarray(keys),
          "embeddings": np.asarray(rows, np.float32)}


def write_dataset(root, splits, dataset="miniImageNet", crop="center",
                  fmt="pkl", protocol=2):
  directory = os.path.join(root, dataset, crop)
  os.makedirs(directory, exist_ok=True)
  for split, raw in splits.items():
    path = os.path.join(directory, f"{split}_embeddings.{fmt}")
    if fmt == "npz":
      np.savez(path, **raw)
    else:
      with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=protocol)
  return str(root)


def small_splits(per_class=8):
  return {"train": make_split(0, 6, per_class),
          "val": make_split(100, 4, per_class),
          "test": make_split(200, 5, per_class)}


class Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes what Python 2's cPickle wrote: ``bytes`` as py2 ``str``
  (BINSTRING) and numpy under ``numpy.core``."""

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def save_py2_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_py2_str

  def save_global(self, obj, name=None):
    module = getattr(obj, "__module__", "")
    if module.startswith("numpy._core"):
      name = name or obj.__name__
      self.write(pickle.GLOBAL + module.replace("numpy._core", "numpy.core")
                 .encode() + b"\n" + name.encode() + b"\n")
      self.memoize(obj)
      return
    super().save_global(obj, name)

  dispatch[type] = save_global


def py2_pickle(raw) -> bytes:
  import io
  buffer = io.BytesIO()
  Py2Pickler(buffer, protocol=2).dump(
      {k.encode(): v for k, v in raw.items()})
  return buffer.getvalue()


def test_original_format_loads_and_indexes_by_class(tmp_path):
  root = write_dataset(tmp_path, small_splits())
  config = DataConfig(root)
  dataset = data.load_split(config, "train")
  assert dataset.class_names == [f"n{c:08d}" for c in range(6)]
  assert [len(r) for r in dataset.class_rows] == [8] * 6
  assert dataset.example_shape == (WIDTH,)
  tasks = data.task_sources(config, num_classes=5, num_shots=2,
                            num_train_query=3, splits=("train",))
  batch = tasks["train"].batch(0, 4)
  assert batch.support_x.shape == (4, 10, WIDTH)
  assert batch.query_x.shape == (4, 15, WIDTH)
  np.testing.assert_array_equal(batch.support_y[0], np.repeat(np.arange(5), 2))
  np.testing.assert_allclose(np.linalg.norm(batch.query_x, axis=-1), 1.0,
                             rtol=1e-6)
  for t in range(4):
    s, q = batch.support_x[t], batch.query_x[t]
    rows_s = np.round(s[:, 1] / s[:, 0]).astype(int)
    rows_q = np.round(q[:, 1] / q[:, 0]).astype(int)
    assert not set(rows_s) & set(rows_q)
    # labels are consistent with the true classes, 5 distinct classes
    cls_s = np.round(s[:, 2] / s[:, 0]).astype(int).reshape(5, 2)
    cls_q = np.round(q[:, 2] / q[:, 0]).astype(int).reshape(5, 3)
    assert (cls_s == cls_s[:, :1]).all() and (cls_q == cls_s[:, :1]).all()
    assert len(set(cls_s[:, 0])) == 5
  # Validation/test tasks: every remaining image of the class as a query.
  config = DataConfig(root, total_examples_per_class=8)
  val = data.task_sources(config, 3, 1, 15, splits=("val",))["val"]
  assert val.batch(0, 2).query_x.shape == (2, 3 * 7, WIDTH)


def test_embeddings_are_normalised_once_as_the_original_does_per_batch():
  raw = small_splits()["train"]
  before = raw["embeddings"].copy()
  dataset = data.dataset_from_arrays(**raw)
  np.testing.assert_array_equal(raw["embeddings"], before)  # a copy
  # tf.nn.l2_normalize(x, axis=-1) of every row, as get_instance applies it.
  np.testing.assert_allclose(
      dataset.examples,
      before / np.linalg.norm(before, axis=-1, keepdims=True), rtol=1e-6)
  assert data.task_source(dataset, "train", 5, 1, 1).gathers_in_tf


def test_npz_and_every_pickle_flavour_give_the_same_tasks(tmp_path):
  splits = small_splits()
  roots = [write_dataset(tmp_path / "npz", splits, fmt="npz")]
  for protocol in (0, 2, 5):
    roots.append(write_dataset(tmp_path / f"p{protocol}", splits,
                               protocol=protocol))
  py2 = tmp_path / "py2"
  write_dataset(py2, {})
  for split, raw in splits.items():
    (py2 / "miniImageNet" / "center" / f"{split}_embeddings.pkl").write_bytes(
        py2_pickle(raw))
  roots.append(str(py2))
  keys_as_bytes = {s: {"keys": np.char.encode(r["keys"]),
                       "embeddings": r["embeddings"]}
                   for s, r in splits.items()}
  roots.append(write_dataset(tmp_path / "bytes", keys_as_bytes))
  object_keys = {s: {"keys": r["keys"].astype(object),
                     "embeddings": r["embeddings"]} for s, r in splits.items()}
  roots.append(write_dataset(tmp_path / "obj", object_keys))
  batches = []
  for root in roots:
    source = data.task_sources(DataConfig(root, total_examples_per_class=8),
                               3, 1, 2, splits=("test",))["test"]
    batches.append(source.batch(3, 2))
  for b in batches[1:]:
    for x, y in zip(batches[0], b):
      np.testing.assert_array_equal(x, y)


def test_py2_pickle_is_what_python2_wrote():
  raw = py2_pickle(make_split(0, 1, 2))
  assert b"cnumpy.core.multiarray\n_reconstruct" in raw
  assert pickle.SHORT_BINSTRING + bytes([4]) + b"keys" in raw
  assert b"_codecs" not in raw


def test_train_on_val_adds_the_val_classes(tmp_path):
  root = write_dataset(tmp_path, small_splits())
  dataset = data.load_split(DataConfig(root, train_on_val=True), "train")
  assert len(dataset.class_names) == 10
  assert dataset.class_names[6:] == [f"n{c:08d}" for c in range(100, 104)]
  assert dataset.examples.shape == (80, WIDTH)


class Exploit:
  """Unpickling this would create ``path`` (a pickle can run code)."""

  def __init__(self, path, how):
    self.path, self.how = path, how

  def __reduce__(self):
    if self.how == "open":
      return open, (self.path, "w")
    return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("how,name", [("open", "open'"),
                                      ("system", "system'")])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, how,
                                                             name):
  victim = tmp_path / "pwned"
  root = write_dataset(tmp_path, small_splits())
  path = os.path.join(root, "miniImageNet", "center", "train_embeddings.pkl")
  raw = make_split(0, 6, 8)
  raw["keys"] = [Exploit(str(victim), how)] + list(raw["keys"][1:])
  with open(path, "wb") as f:
    pickle.dump(raw, f, protocol=2)
  with pytest.raises(data.UnsafePickleError) as error:
    data.load_split(DataConfig(root), "train")
  assert path in str(error.value) and name in str(error.value)
  assert "refusing to load" in str(error.value)
  assert not victim.exists()


def test_other_globals_are_refused(tmp_path):
  path = str(tmp_path / "x.pkl")
  for payload in (pickle.dumps({"keys": eval}, protocol=2),
                  b"cnumpy\nload\n(S'x'\ntR.",
                  b"c_codecs\nencode\n(Vx\nVrot13\ntR."):
    with open(path, "wb") as f:
      f.write(payload)
    with pytest.raises(data.UnsafePickleError, match="x.pkl"):
      data.load_pickle(path)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(keys=np.char.replace(r["keys"], "-n", "_n")),
     "is not '<x>-<wnid>-<image_file>'"),
    (lambda r: r.update(keys=np.char.replace(r["keys"], "-n00000000_",
                                             "-n00000001_")),
     "does not start with its class 'n00000000'_"),
    (lambda r: r["keys"].__setitem__(1, r["keys"][0]), "appears twice"),
    (lambda r: r.update(embeddings=r["embeddings"][:-1]),
     "48 keys but 47 embeddings"),
    (lambda r: r.pop("embeddings"), "expected a dict with 'keys' and "
     "'embeddings', found \\['keys'\\]"),
    (lambda r: r.update(embeddings=r["embeddings"].astype(np.int32)),
     "must be a 2-D float array"),
    (lambda r: r["embeddings"].__setitem__((3, 1), np.nan),
     "embedding 3 \\(.*\\) is not finite"),
    # These two were a ValueError and a TypeError traceback.
    (lambda r: r.update(embeddings=[[0.5, 0.5], [0.5]]),
     "'keys' and 'embeddings' must be arrays"),
    (lambda r: r.update({0: 1}) or r.pop("embeddings"),
     "expected a dict with 'keys' and 'embeddings', found \\['keys', 0\\]"),
])
def test_malformed_files_are_named(tmp_path, mutate, message):
  splits = small_splits()
  mutate(splits["train"])
  root = write_dataset(tmp_path, splits)
  with pytest.raises(data.EmbeddingsError, match=message) as error:
    data.load_split(DataConfig(root), "train")
  assert "train_embeddings.pkl" in str(error.value)


def test_an_empty_protocol_2_array_is_not_called_unsafe(tmp_path):
  """Protocol 2 writes an empty array's data as ``bytes()``, which was
  refused as if it could run code; ``bytes`` with arguments still is."""
  path = tmp_path / "e.pkl"
  empty = {"keys": np.array([], "<U8"), "embeddings": np.zeros((0, 4))}
  path.write_bytes(pickle.dumps(empty, protocol=2))
  loaded = data.load_pickle(str(path))
  assert loaded["embeddings"].shape == (0, 4)
  path.write_bytes(b"c__builtin__\nbytes\n(I1000000000000\ntR.")
  with pytest.raises(data.UnsafePickleError, match="bytes\\(...\\) with "
                     "arguments"):
    data.load_pickle(str(path))


def test_missing_files_and_bad_flags_are_named(tmp_path):
  with pytest.raises(data.EmbeddingsError, match="train_embeddings.pkl not "
                     "found .*--data_path"):
    data.load_split(DataConfig(str(tmp_path)), "train")
  with pytest.raises(ValueError, match="--embedding_crop='multiview'"):
    DataConfig(str(tmp_path), dataset_name="tieredImageNet",
               embedding_crop="multiview")
  with pytest.raises(ValueError, match="--dataset_name='mini'"):
    DataConfig(str(tmp_path), dataset_name="mini")
  root = write_dataset(tmp_path, small_splits())
  with pytest.raises(data.EmbeddingsError, match="fewer than "
                     "--num_classes=7"):
    data.task_sources(DataConfig(root), 7, 1, 1)
  with pytest.raises(data.EmbeddingsError, match="fewer than the 10 .*"
                     "--num_tr_examples_per_class=1, the query size 9 is "
                     "--total_examples_per_class minus the support"):
    data.task_sources(DataConfig(root, total_examples_per_class=10), 3, 1, 1)
  multiview = write_dataset(tmp_path / "mv", small_splits(), crop="multiview")
  assert data.load_split(DataConfig(multiview, embedding_crop="multiview"),
                         "val").num_classes == 4


def test_synthetic_set_is_in_the_original_format_and_cached(tmp_path):
  config = synthetic.SyntheticConfig(num_classes=(6, 3, 4),
                                     examples_per_class=10, embedding_dim=16)
  root = synthetic.ensure_synthetic_embeddings(str(tmp_path), config)
  path = os.path.join(root, "miniImageNet", "center", "train_embeddings.pkl")
  with open(path, "rb") as f:
    raw = pickle.load(f)
  assert set(raw) == {"keys", "embeddings"}
  assert raw["embeddings"].shape == (60, 16)
  assert raw["embeddings"].dtype == np.float32
  assert (raw["embeddings"] >= 0).all()
  data.parse_key(raw["keys"][0], path)
  mtime = os.path.getmtime(path)
  assert synthetic.ensure_synthetic_embeddings(str(tmp_path), config) == root
  assert os.path.getmtime(path) == mtime  # reused, not regenerated
  assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
  sources = data.task_sources(DataConfig(root, total_examples_per_class=10),
                              3, 1, 3)
  names = [set(s.dataset.class_names) for s in sources.values()]
  assert not (names[0] & names[1] or names[0] & names[2] or
              names[1] & names[2])


def test_synthetic_classes_need_meta_learning():
  """1-shot nearest neighbour on raw features is poor; a projection learned
  on the train classes (LDA) carries over to the test classes."""
  splits = synthetic.generate(synthetic.SyntheticConfig())
  assert splits["train"]["embeddings"].shape == (64 * 200, 640)
  assert splits["test"]["embeddings"].shape == (20 * 200, 640)

  def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  train = normalize(splits["train"]["embeddings"].reshape(64, 200, 640))
  test = normalize(splits["test"]["embeddings"].reshape(20, 200, 640))
  means = train.mean(axis=1)
  within = (train - means[:, None]).reshape(-1, 640)
  sw = within.T @ within / len(within) + 1e-3 * np.eye(640)
  chol = np.linalg.cholesky(np.linalg.inv(sw))
  _, vectors = np.linalg.eigh(chol.T @ np.cov(means.T) @ chol)
  lda = chol @ vectors[:, -16:]

  def one_shot(x, projection=None, tasks=300):
    rng = np.random.default_rng(0)
    correct = []
    for _ in range(tasks):
      classes = rng.choice(len(x), 5, replace=False)
      rows = np.stack([rng.choice(200, 16, replace=False) for _ in classes])
      e = x[classes[:, None], rows]
      if projection is not None:
        e = normalize(e @ projection)
      scores = e[:, 1:].reshape(-1, e.shape[-1]) @ e[:, 0].T
      correct.append(np.argmax(scores, -1) == np.repeat(np.arange(5), 15))
    return np.mean(correct)

  raw, learned = one_shot(test), one_shot(test, lda)
  assert 0.22 < raw < 0.45, raw
  assert 0.6 < learned < 0.85, learned
  # The same arrays as an in-memory split (no files), as benchmarks use them.
  dataset = data.dataset_from_arrays(**splits["test"])
  batch = data.task_source(dataset, "test", 5, 1, 15).batch(0, 2)
  assert batch.support_x.shape == (2, 5, 640)
  np.testing.assert_allclose(np.linalg.norm(batch.query_x, axis=-1), 1.0,
                             rtol=1e-5)
