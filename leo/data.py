"""LEO's pre-computed embeddings: loading, indexing by class, task sources.

On disk (deepmind/leo ``data.py``, the released ``embeddings.zip``)::

  <data_path>/<dataset_name>/<embedding_crop>/{train,val,test}_embeddings.pkl

Each pickle is a dict with ``keys``, strings ``"<x>-<wnid>-<image_file>"``
whose image file starts with ``<wnid>_``, and ``embeddings``, an ``(n, 640)``
float32 array (the WRN-28-10 features of Rusu et al. 2019, section 4.2.2). The
class lists come from the pickles: LEO's train/val classes are not Ravi &
Larochelle's (deepmind/leo issue #8). A ``.npz`` file with the same two arrays
is accepted in place of a pickle.

The released pickles were written by Python 2, hence ``encoding='latin1'``.
Loading never executes code: ``RestrictedUnpickler`` admits only what numpy
arrays, dtypes and scalars and plain containers need.

Tasks follow ``DataProvider.get_instance``: N distinct classes in random
order (labels 0..N-1), K + Q distinct images per class, class-major. Every
embedding is L2-normalised once, when its split loads (the original
normalises each sampled task's embeddings).
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from typing import Any

import numpy as np
from absl import logging

from leo.config import DataConfig
from maml_tf.class_tasks import (CLASS_MAJOR, ClassDataset, FewShotConfig,
                                 FewShotTasks)

SPLITS = ("train", "val", "test")

# (module, name) pairs a pickle of numpy arrays and plain containers refers to,
# from numpy 1.x (numpy.core) and 2.x (numpy._core), protocols 0-5 and Python 2
# (__builtin__). Resolved from the first importable module below.
_NUMPY_GLOBALS = {
    "_reconstruct": ("numpy._core.multiarray", "numpy.core.multiarray"),
    "scalar": ("numpy._core.multiarray", "numpy.core.multiarray"),
    "_frombuffer": ("numpy._core.numeric", "numpy.core.numeric"),
}
_NUMPY_MODULES = {m for ms in _NUMPY_GLOBALS.values() for m in ms}
_CONTAINERS = {("collections", "OrderedDict"), ("builtins", "set"),
               ("builtins", "frozenset"), ("builtins", "bytearray"),
               ("__builtin__", "set"), ("__builtin__", "frozenset"),
               ("__builtin__", "bytearray")}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
  """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin1 only)."""
  if codecs.lookup(encoding).name != "iso8859-1":
    raise UnsafePickleError(f"refusing _codecs.encode with {encoding!r}")
  return codecs.encode(text, "latin1")


def _empty_bytes(*args) -> bytes:
  """``bytes()``, as protocol-2 pickles write an empty bytes object (an
  empty array's data); with arguments it could allocate any size."""
  if args:
    raise UnsafePickleError("refusing bytes(...) with arguments")
  return b""


class EmbeddingsError(ValueError):
  """A missing, malformed or unsuitable embeddings file (the message names
  the file or the flag)."""


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle that refers to something other than arrays and containers."""


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that can only build numpy arrays/dtypes/scalars and
  containers.

  ``find_class`` is the only way a pickle reaches a callable, so refusing
  everything else means a malicious file cannot run code (the approach of the
  Python documentation, "Restricting Globals").

  Args:
    file: a binary file object.
    name: the file's name, for error messages.
  """

  def __init__(self, file, name: str):
    super().__init__(file, encoding="latin1")
    self.name = name

  def find_class(self, module: str, name: str) -> Any:
    if module in _NUMPY_MODULES and module in _NUMPY_GLOBALS.get(name, ()):
      for candidate in _NUMPY_GLOBALS[name]:
        try:
          return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
          continue
    if module == "numpy" and name in ("ndarray", "dtype"):
      return getattr(np, name)
    if module == "_codecs" and name == "encode":
      return _latin1_encode
    if module in ("builtins", "__builtin__") and name == "bytes":
      return _empty_bytes
    if (module, name) in _CONTAINERS:
      return super().find_class(module, name)
    raise UnsafePickleError(
        f"{self.name}: refusing to load '{module}.{name}'. An embeddings "
        "pickle may only hold numpy arrays, numpy dtypes/scalars and plain "
        "containers (unpickling anything else can run arbitrary code).")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"{self.name}: persistent ids are not allowed "
                            "in an embeddings pickle")


def load_pickle(path: str) -> Any:
  """Reads a pickle of arrays safely (``RestrictedUnpickler``)."""
  with open(path, "rb") as f:
    try:
      return RestrictedUnpickler(f, path).load()
    except UnsafePickleError as e:
      if str(e).startswith(path):
        raise
      raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt file
      raise EmbeddingsError(f"{path}: not a readable embeddings pickle "
                            f"({type(e).__name__}: {e})") from e


def embeddings_file(data_config: DataConfig, split: str) -> str:
  """``<data_path>/<dataset>/<crop>/<split>_embeddings.pkl`` (or ``.npz``)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  stem = os.path.join(data_config.data_path, data_config.dataset_name,
                      data_config.embedding_crop, f"{split}_embeddings")
  for ext in (".pkl", ".npz"):
    if os.path.exists(stem + ext):
      return stem + ext
  raise EmbeddingsError(
      f"{stem}.pkl not found (nor {stem}.npz). --data_path should be the "
      "unzipped embeddings directory holding <dataset_name>/<embedding_crop>/"
      "{train,val,test}_embeddings.pkl.")


def load_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split's ``keys`` and ``embeddings`` (``.pkl`` or ``.npz``).

  Returns:
    ``(keys [n] str, embeddings [n, d] float32)``.

  Raises:
    EmbeddingsError: naming ``path``, if the file is unreadable, lacks the two
      arrays, their shapes disagree or an embedding is not finite.
    UnsafePickleError: if the pickle refers to anything but arrays and
      containers.
  """
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as npz:
        raw = {k: npz[k] for k in npz.files}
    except Exception as e:  # object arrays, corrupt zip
      raise EmbeddingsError(f"{path}: not a readable embeddings .npz "
                            f"({type(e).__name__}: {e}); expected arrays "
                            "'keys' (strings, not objects) and "
                            "'embeddings'") from e
  else:
    raw = load_pickle(path)
  if not isinstance(raw, dict) or not {"keys", "embeddings"} <= set(raw):
    found = (sorted(raw, key=repr) if isinstance(raw, dict) else
             type(raw).__name__)
    raise EmbeddingsError(f"{path}: expected a dict with 'keys' and "
                          f"'embeddings', found {found}")
  try:
    keys = np.asarray([k.decode("latin1") if isinstance(k, bytes) else str(k)
                       for k in np.asarray(raw["keys"]).reshape(-1)])
    embeddings = np.asarray(raw["embeddings"])
  except (ValueError, TypeError) as e:  # ragged lists
    raise EmbeddingsError(f"{path}: 'keys' and 'embeddings' must be arrays "
                          f"({e})") from e
  if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
    raise EmbeddingsError(f"{path}: 'embeddings' must be a 2-D float array "
                          f"(n, 640), got {embeddings.dtype} "
                          f"{embeddings.shape}")
  if embeddings.shape[0] != keys.shape[0]:
    raise EmbeddingsError(f"{path}: {keys.shape[0]} keys but "
                          f"{embeddings.shape[0]} embeddings")
  embeddings = embeddings.astype(np.float32, copy=False)
  # A NaN or inf row would make every task that draws it non-finite, and
  # the training loop would skip those steps without saying why.
  for start in range(0, embeddings.shape[0], 65536):  # no n x d temporary
    bad = ~np.isfinite(embeddings[start:start + 65536]).all(axis=1)
    if bad.any():
      row = start + int(np.argmax(bad))
      raise EmbeddingsError(f"{path}: embedding {row} ({keys[row]}) is not "
                            "finite (NaN or inf)")
  return keys, embeddings


def parse_key(key: str, path: str) -> tuple[str, str]:
  """``"<x>-<wnid>-<image_file>"`` -> ``(wnid, image_file)``, with the
  original's check that the image file starts with ``<wnid>_``."""
  parts = key.split("-")
  if len(parts) != 3:
    raise EmbeddingsError(f"{path}: key {key!r} is not "
                          "'<x>-<wnid>-<image_file>'")
  _, class_label, image_file = parts
  if image_file.split("_")[0] != class_label:
    raise EmbeddingsError(f"{path}: key {key!r}: image file {image_file!r} "
                          f"does not start with its class {class_label!r}_")
  return class_label, image_file


def index_by_class(keys: np.ndarray, path: str) -> tuple[list[str],
                                                          list[np.ndarray]]:
  """Rows of each class, classes in order of first appearance (the
  original's ``OrderedDict``).

  Raises:
    EmbeddingsError: naming ``path`` on a malformed or duplicated key.
  """
  rows: dict[str, list[int]] = {}
  seen: dict[str, int] = {}
  for i, key in enumerate(keys):
    class_label, image_file = parse_key(key, path)
    if image_file in seen:
      raise EmbeddingsError(f"{path}: image {image_file!r} appears twice "
                            f"(rows {seen[image_file]} and {i})")
    seen[image_file] = i
    rows.setdefault(class_label, []).append(i)
  if not rows:
    raise EmbeddingsError(f"{path}: no embeddings")
  return list(rows), [np.asarray(r, np.int64) for r in rows.values()]


def l2_normalize(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
  """``tf.nn.l2_normalize(x, axis=-1)`` in numpy, in place, row block by row
  block (no full-size temporary): ``x / sqrt(max(sum x^2, 1e-12))``."""
  for start in range(0, x.shape[0], chunk):
    rows = x[start:start + chunk]
    norm = np.sqrt(np.maximum(np.einsum("...i,...i->...", rows, rows), 1e-12))
    rows /= norm[..., None].astype(x.dtype)
  return x


def load_split(data_config: DataConfig, split: str) -> ClassDataset:
  """One split's embeddings indexed by class, L2-normalised.

  With ``train_on_val``, the train split also holds the val pickle's rows,
  as the original concatenates them.
  """
  paths = [embeddings_file(data_config, split)]
  if split == "train" and data_config.train_on_val:
    paths.append(embeddings_file(data_config, "val"))
  parts = [load_embeddings(p) for p in paths]
  name = " + ".join(paths)
  if len({p[1].shape[1] for p in parts}) > 1:
    raise EmbeddingsError(f"{name}: embedding widths differ")
  keys = np.concatenate([p[0] for p in parts])
  embeddings = (parts[0][1] if len(parts) == 1 else
                np.concatenate([p[1] for p in parts]))
  # ``embeddings`` is ours (loaded or concatenated here): normalise in place.
  dataset = _normalized_dataset(keys, embeddings, name)
  logging.info("%s: %d embeddings of width %d in %d classes.", name,
               embeddings.shape[0], embeddings.shape[1], dataset.num_classes)
  return dataset


def dataset_from_arrays(keys: np.ndarray, embeddings: np.ndarray,
                        name: str = "embeddings") -> ClassDataset:
  """A split from in-memory ``keys [n]`` and ``embeddings [n, d]`` (e.g.
  ``leo.synthetic.generate(...)["train"]``), L2-normalised (a copy)."""
  return _normalized_dataset(keys, np.array(embeddings, np.float32), name)


def _normalized_dataset(keys: np.ndarray, embeddings: np.ndarray,
                        name: str) -> ClassDataset:
  """The split over float32 ``embeddings [n, d]``, which it L2-normalises in
  place.

  The original normalises every sampled batch (``tf.nn.l2_normalize`` in
  ``get_instance``); normalising each row once is the same per-row arithmetic
  and keeps the test sampler (3000 embeddings per task) off the critical path.
  """
  class_names, class_rows = index_by_class(np.asarray(keys), name)
  return ClassDataset(l2_normalize(embeddings), class_rows, class_names,
                      name=name)


def task_source(dataset: ClassDataset, split: str, num_classes: int,
                num_shots: int, num_query: int, seed: int = 0) -> FewShotTasks:
  """N-way K-shot tasks with Q queries per class, class-major.

  Returns:
    A task source whose ``batch(index, T)`` gives ``support_x [T, N*K, d]``,
    ``query_x [T, N*Q, d]`` (L2-normalised float32) and int32 labels.

  Raises:
    EmbeddingsError: if the split has too few classes or images per class.
  """
  try:
    return FewShotTasks(dataset, FewShotConfig(
        num_classes, num_shots, num_query, layout=CLASS_MAJOR, seed=seed),
                        split)
  except ValueError as e:
    query = ("--num_val_examples_per_class" if split == "train" else
             "--total_examples_per_class minus the support (all remaining "
             "examples of a class)")
    raise EmbeddingsError(
        f"{e}; the support size is --num_tr_examples_per_class={num_shots}, "
        f"the query size {num_query} is {query}") from e


def task_sources(data_config: DataConfig, num_classes: int, num_shots: int,
                 num_train_query: int, seed: int = 0,
                 splits=SPLITS) -> dict[str, FewShotTasks]:
  """The original's problem streams, by split.

  Meta-train tasks have ``num_train_query`` queries per class
  (``--num_val_examples_per_class``); meta-validation and test tasks use
  ``total_examples_per_class - K`` (all remaining images of a miniImageNet
  class).
  """
  if data_config.total_examples_per_class <= num_shots:
    raise EmbeddingsError(
        f"--total_examples_per_class={data_config.total_examples_per_class} "
        f"leaves no query images after --num_tr_examples_per_class="
        f"{num_shots}")
  sources = {}
  for split in splits:
    query = (num_train_query if split == "train" else
             data_config.total_examples_per_class - num_shots)
    sources[split] = task_source(load_split(data_config, split), split,
                                 num_classes, num_shots, query, seed)
  return sources
