"""Quick, Draw! bitmaps -> a 28x28 few-shot cache, as fastforwardlabs.

  python -m data_prep.quickdraw --input <dir> --output <cache dir>

``<dir>`` holds the official numpy bitmap files (``gsutil -m cp
'gs://quickdraw_dataset/full/numpy_bitmap/*.npy' <dir>``): ``<category>.npy``,
``[N, 784]`` uint8, 28x28 drawings with ink 255 on 0 (kept as they are:
``value / 255`` puts ink at 1, as Omniglot's cache).

The split and the subsampling are those of fastforwardlabs/learning-to-learn's
Torchmeta fork (``QuickDrawClassDataset.download``): the ``.npy`` file names,
sorted, are shuffled with ``np.random.RandomState(seed)``; the first
``int(0.6 n)`` categories are train, the next ``int(0.2 n)`` val, the rest
test; then, split by split in that order, the same generator draws
``samples_per_class`` drawings of each category without replacement
(``rs.choice(N, samples, replace=False)``). The defaults (seed 123, 100
drawings) are theirs. ``--samples_per_class=0`` keeps every drawing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Sequence

import numpy as np

from data_prep.cache import CacheWriter, PrepError, check_output, run_main
from maml_tf import io_utils

SIZE = 28
RATIOS = (60, 20, 20)


@dataclasses.dataclass(frozen=True)
class QuickDrawPrepConfig:
  """Arguments of ``data_prep.quickdraw`` (see the module docstring)."""

  input: str
  output: str
  samples_per_class: int = 100
  seed: int = 123
  overwrite: bool = False

  def __post_init__(self):
    if self.samples_per_class < 0:
      raise PrepError("--samples_per_class must be >= 0 (0: all), got "
                      f"{self.samples_per_class}")
    if not os.path.isdir(self.input):
      raise PrepError(f"--input={self.input}: not a directory")


def open_bitmaps(path: str) -> np.ndarray:
  """A category file as a ``[N, 784]`` uint8 memmap, validated."""
  try:
    data = io_utils.open_npy(path)
  except ValueError as e:
    raise PrepError(f"{path}: not a readable .npy file ({e})") from e
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != SIZE * SIZE:
    raise PrepError(f"{path}: {data.dtype} {data.shape}, expected uint8 "
                    f"[N, {SIZE * SIZE}] (Quick Draw numpy_bitmap)")
  if data.shape[0] == 0:
    raise PrepError(f"{path}: no drawings")
  return data


def split_categories(files: Sequence[str], rs: np.random.RandomState
                     ) -> dict[str, list[str]]:
  """fastforwardlabs' class split: sorted file names, shuffled by ``rs``,
  60/20/20 (int() of each share; the remainder goes to test)."""
  names = [f[:-len(".npy")] for f in sorted(files)]
  rs.shuffle(names)
  n = len(names)
  num_train, num_val = (int(float(r) / sum(RATIOS) * n) for r in RATIOS[:2])
  return {"train": names[:num_train],
          "val": names[num_train:num_train + num_val],
          "test": names[num_train + num_val:]}


def prepare(config: QuickDrawPrepConfig) -> dict:
  """Builds the cache; returns its index."""
  check_output(config.output, config.overwrite)
  files = [f for f in os.listdir(config.input)
           if f.endswith(".npy") and not f.startswith(".")]
  rs = np.random.RandomState(config.seed)
  splits = split_categories(files, rs)
  if not all(splits.values()):
    raise PrepError(
        f"--input={config.input}: {len(files)} <category>.npy files give "
        f"{'/'.join(str(len(v)) for v in splits.values())} train/val/test "
        "categories; every split needs one (at least 5 files)")
  # Draw in fastforwardlabs' order (train, val, test), so the same seed picks
  # the same drawings.
  chosen: dict[str, np.ndarray] = {}
  for split in ("train", "val", "test"):
    for name in splits[split]:
      path = os.path.join(config.input, f"{name}.npy")
      count = open_bitmaps(path).shape[0]
      if config.samples_per_class == 0:
        chosen[name] = np.arange(count)
      elif count < config.samples_per_class:
        raise PrepError(f"{path}: {count} drawings, fewer than "
                        f"--samples_per_class={config.samples_per_class}")
      else:
        chosen[name] = rs.choice(count, config.samples_per_class,
                                 replace=False)
  names = sorted(chosen)
  total = sum(len(chosen[n]) for n in names)
  logging.info("Quick Draw: %d categories (%s), %d drawings", len(names),
               ", ".join(f"{s} {len(v)}" for s, v in splits.items()), total)
  split_of = {n: s for s, ns in splits.items() for n in ns}
  with CacheWriter(config.output, "quickdraw", (SIZE, SIZE, 1)) as writer:
    array = writer.new_array("images", total)
    row = 0
    for name in names:
      data = open_bitmaps(os.path.join(config.input, f"{name}.npy"))
      rows = chosen[name]
      # Read in file order (sequential access to the memmap), store in draw
      # order, a bounded block at a time.
      order = np.argsort(rows, kind="stable")
      for start in range(0, len(rows), 65536):
        part = order[start:start + 65536]
        array[row + part] = data[rows[part]].reshape(-1, SIZE, SIZE, 1)
      writer.add_class(name, split_of[name], "images", row, len(rows),
                       f"{name}.npy")
      row += len(rows)
    return writer.commit(
        "fastforwardlabs",
        f"sorted <category>.npy names shuffled with np.random.RandomState("
        f"{config.seed}); int(60%) train, int(20%) val, rest test; "
        f"{config.samples_per_class or 'all'} drawings per category drawn by "
        "the same generator, train, val, test in turn",
        "ink = 255 as in the bitmap files: value / 255",
        {"seed": config.seed, "samples_per_class": config.samples_per_class,
         "categories": len(names)})


def parse_args(argv: Sequence[str] | None = None) -> QuickDrawPrepConfig:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.quickdraw",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True,
                      help="directory of <category>.npy bitmap files")
  parser.add_argument("--output", required=True, help="cache directory")
  parser.add_argument("--samples_per_class", type=int, default=100,
                      help="drawings kept per category (0: all); "
                      "fastforwardlabs: 100 (their --num-training-samples)")
  parser.add_argument("--seed", type=int, default=123,
                      help="split and sampling seed (fastforwardlabs: 123)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing cache at --output")
  return QuickDrawPrepConfig(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
  return run_main("quickdraw", parse_args, prepare, argv)


if __name__ == "__main__":
  sys.exit(main())
