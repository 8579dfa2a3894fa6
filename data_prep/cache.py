"""Writing a ``maml_tf.image_data`` cache atomically.

A cache is built in a temporary directory beside the output (arrays written
progressively through ``np.lib.format.open_memmap``, never held in memory) and
renamed into place only when it is complete, so a reader sees either the old
cache, the new one, or none: never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
from typing import Callable, Sequence

import numpy as np

from maml_tf import image_data
from maml_tf.io_utils import atomic_replace_dir, make_temp_dir


class PrepError(Exception):
  """Bad input to a data_prep command (names the file and what was expected)."""


def check_output(output: str, overwrite: bool) -> None:
  """Refuses to replace anything but a cache, and a cache without
  ``--overwrite``."""
  if not os.path.exists(output):
    return
  if not os.path.isdir(output):
    raise PrepError(f"--output={output} exists and is not a directory")
  if not os.listdir(output):
    return
  if not os.path.isfile(os.path.join(output, image_data.INDEX_FILE)):
    raise PrepError(f"--output={output} is a non-empty directory without "
                    f"{image_data.INDEX_FILE}: not a cache, refusing to "
                    "replace it")
  if not overwrite:
    raise PrepError(f"--output={output} already holds a cache; pass "
                    "--overwrite to replace it")


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class CacheWriter:
  """Builds one cache directory.

  Use as a context manager: on an exception the temporary directory is
  removed and ``output`` is left untouched.

  Args:
    output: the cache directory to create or replace.
    dataset: 'omniglot', 'miniimagenet' or 'quickdraw'.
    image_shape: ``(H, W, C)``.
  """

  def __init__(self, output: str, dataset: str,
               image_shape: Sequence[int]):
    self.output = os.path.abspath(output)
    self.dataset = dataset
    self.image_shape = tuple(int(d) for d in image_shape)
    self.arrays: dict[str, np.memmap] = {}
    self.classes: list[dict] = []
    self.tmp: str | None = None

  def __enter__(self) -> "CacheWriter":
    parent = os.path.dirname(self.output)
    try:
      os.makedirs(parent, exist_ok=True)
      self.tmp = make_temp_dir(f".tmp-{os.path.basename(self.output)}-",
                               parent)
    except OSError as e:
      reason = (f"{e.filename} is not a directory" if e.filename and
                os.path.exists(e.filename) and not os.path.isdir(e.filename)
                else f"{e.strerror}: {e.filename}")
      raise PrepError(f"--output={self.output}: cannot write a cache there "
                      f"({reason})") from e
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.arrays.clear()  # drop the memmaps before deleting their files
    if self.tmp is not None and os.path.exists(self.tmp):
      shutil.rmtree(self.tmp)

  def new_array(self, name: str, num_rows: int) -> np.memmap:
    """A writable ``[num_rows, H, W, C]`` uint8 memmap saved as
    ``<name>.npy``."""
    array = np.lib.format.open_memmap(
        os.path.join(self.tmp, f"{name}.npy"), mode="w+", dtype=np.uint8,
        shape=(num_rows,) + self.image_shape)
    self.arrays[name] = array
    return array

  def add_class(self, name: str, split: str, array: str, start: int,
                count: int, source: str) -> None:
    """Records that rows ``start..start+count-1`` of ``array`` are class
    ``name`` of ``split``."""
    self.classes.append({"name": name, "split": split, "array": array,
                         "start": int(start), "count": int(count),
                         "source": source})

  def commit(self, split_scheme: str, split_rule: str, pixels: str,
             provenance: dict) -> dict:
    """Writes ``index.json``, checks it and renames the cache into place.

    Returns:
      The index.
    """
    covered = {name: np.zeros(len(a), np.int64)
               for name, a in self.arrays.items()}
    for c in self.classes:
      covered[c["array"]][c["start"]:c["start"] + c["count"]] += 1
    for name, counts in covered.items():
      if not (counts == 1).all():
        raise AssertionError(f"array {name}: rows not covered exactly once")
    index = {
        "format": image_data.FORMAT,
        "version": image_data.VERSION,
        "dataset": self.dataset,
        "image_shape": list(self.image_shape),
        "dtype": "uint8",
        "pixels": pixels,
        "arrays": {name: {"file": f"{name}.npy", "num_rows": len(a)}
                   for name, a in self.arrays.items()},
        "split_scheme": split_scheme,
        "split_rule": split_rule,
        "splits": {s: {"classes": sum(c["split"] == s for c in self.classes),
                       "images": sum(c["count"] for c in self.classes
                                     if c["split"] == s)}
                   for s in ("train", "val", "test")},
        "classes": self.classes,
        "provenance": provenance,
    }
    for array in self.arrays.values():
      array.flush()
    self.arrays.clear()
    with open(os.path.join(self.tmp, image_data.INDEX_FILE), "w") as f:
      json.dump(index, f, indent=1, sort_keys=True)
      f.write("\n")
    image_data.load_cache(self.tmp, self.dataset)  # the reader accepts it
    atomic_replace_dir(self.tmp, self.output)
    self.tmp = None
    logging.info("Wrote %s: %s", self.output, ", ".join(
        f"{s} {v['classes']} classes / {v['images']} images"
        for s, v in index["splits"].items()))
    return index


def seeded_shuffle(names: Sequence[str], seed: int) -> list[str]:
  """``sorted(names)`` shuffled by Python's ``random.Random(seed)``: the
  original's ``random.seed(1); random.shuffle(...)`` on a list whose order no
  longer depends on the file system."""
  import random
  order = sorted(names)
  random.Random(seed).shuffle(order)
  return order


def run_main(name: str, parse_args: Callable, prepare: Callable,
             argv: Sequence[str] | None) -> int:
  """The body of every ``data_prep`` command: parse, prepare, and report a
  ``PrepError`` as one line on stderr with exit status 2."""
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    prepare(parse_args(argv))
  except PrepError as e:
    print(f"data_prep.{name}: error: {e}", file=sys.stderr)
    return 2
  return 0
