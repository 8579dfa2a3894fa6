"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle's split) -> a cache.

  python -m data_prep.miniimagenet --input <dir> --output <cache dir>

``<dir>`` is either layout the MAML code knows:

* ``csv`` (Ravi & Larochelle): ``images/*.jpg`` plus ``train.csv``,
  ``val.csv`` and ``test.csv`` with the header ``filename,label`` (64 / 16 /
  20 classes of 600 images);
* ``folders`` (what cbfinn/maml's ``proc_images.py`` makes, and what its data
  generator reads): ``{train,val,test}/<wnid>/*.jpg``.

Every image is converted to RGB and resized to 84x84 with LANCZOS, as
``proc_images.py``, and stored as uint8 (``value / 255`` is the network input,
no mean subtraction, as the original). Deviation: the original re-saved the
resized images as JPEG (quality 75) before decoding them again; here the
resized pixels are stored directly, without that second lossy encoding.

Each split is one ``[num_images, 84, 84, 3]`` array written image by image
into a memory-mapped ``.npy`` (the 1.3 GB of decoded images are never in
memory at once); classes are sorted by label and images by file name.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import multiprocessing
import os
import sys
from typing import Sequence

import numpy as np
import PIL
from PIL import Image

from data_prep.cache import (CacheWriter, PrepError, check_output, file_sha256,
                             run_main)

SPLITS = ("train", "val", "test")
SIZE = 84
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUTS = ("auto", "csv", "folders")


@dataclasses.dataclass(frozen=True)
class MiniImageNetPrepConfig:
  """Arguments of ``data_prep.miniimagenet`` (see the module docstring)."""

  input: str
  output: str
  layout: str = "auto"
  num_workers: int = 1
  overwrite: bool = False

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise PrepError(f"--layout={self.layout!r}: expected one of {LAYOUTS}")
    if self.num_workers < 1:
      raise PrepError(f"--num_workers must be >= 1, got {self.num_workers}")
    if not os.path.isdir(self.input):
      raise PrepError(f"--input={self.input}: not a directory")


# split -> [(label, [image paths])], classes sorted by label.
Listing = dict[str, list[tuple[str, list[str]]]]


def detect_layout(input_dir: str) -> str:
  if os.path.isdir(os.path.join(input_dir, "images")) or any(
      os.path.isfile(os.path.join(input_dir, f"{s}.csv")) for s in SPLITS):
    return "csv"
  if any(os.path.isdir(os.path.join(input_dir, s)) for s in SPLITS):
    return "folders"
  raise PrepError(f"--input={input_dir}: expected images/ with train.csv, "
                  "val.csv and test.csv (Ravi & Larochelle), or train/, val/ "
                  "and test/ folders of <wnid>/*.jpg")


def _group(pairs: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
  """(label, path) pairs -> classes sorted by label, paths sorted by name."""
  classes: dict[str, list[str]] = {}
  for label, path in pairs:
    classes.setdefault(label, []).append(path)
  return [(label, sorted(classes[label], key=os.path.basename))
          for label in sorted(classes)]


def list_csv(input_dir: str) -> Listing:
  """Reads Ravi & Larochelle's ``{train,val,test}.csv``; every named image
  must exist in ``images/``."""
  images_dir = os.path.join(input_dir, "images")
  if not os.path.isdir(images_dir):
    raise PrepError(f"{images_dir}: no such folder (the csv layout keeps the "
                    "images in images/)")
  present = set(os.listdir(images_dir))
  listing: Listing = {}
  seen: dict[str, str] = {}
  for split in SPLITS:
    path = os.path.join(input_dir, f"{split}.csv")
    if not os.path.isfile(path):
      raise PrepError(f"{path}: not found (the csv layout needs train.csv, "
                      "val.csv and test.csv)")
    pairs = []
    try:
      with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise PrepError(f"{path}: not a UTF-8 text file ({e})") from e
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header != ["filename", "label"]:
      raise PrepError(f"{path}: header {header}, expected "
                      "['filename', 'label']")
    for line, row in enumerate(rows, start=2):
      if not row:
        continue
      if len(row) != 2 or not row[0] or not row[1]:
        raise PrepError(f"{path}:{line}: expected 'filename,label', got "
                        f"{row}")
      filename, label = row
      if filename in seen:
        raise PrepError(f"{path}:{line}: {filename} is already listed in "
                        f"{seen[filename]}")
      seen[filename] = os.path.basename(path)
      if filename not in present:
        raise PrepError(f"{path}:{line} names {filename}, but "
                        f"{os.path.join(images_dir, filename)} does not "
                        "exist")
      pairs.append((label, os.path.join(images_dir, filename)))
    if not pairs:
      raise PrepError(f"{path}: no images listed")
    listing[split] = _group(pairs)
  return listing


def list_folders(input_dir: str) -> Listing:
  """Lists ``{train,val,test}/<wnid>/*.jpg``."""
  listing: Listing = {}
  for split in SPLITS:
    root = os.path.join(input_dir, split)
    if not os.path.isdir(root):
      raise PrepError(f"{root}: not found (the folders layout needs train/, "
                      "val/ and test/, each with one folder per class)")
    pairs = []
    for entry in sorted(os.listdir(root)):
      folder = os.path.join(root, entry)
      if entry.startswith("."):
        continue
      if not os.path.isdir(folder):
        raise PrepError(f"{folder}: expected only class folders in {root}")
      images = [f for f in os.listdir(folder) if not f.startswith(".") and
                f.lower().endswith(IMAGE_EXTENSIONS)]
      if not images:
        raise PrepError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
      pairs += [(entry, os.path.join(folder, f)) for f in images]
    if not pairs:
      raise PrepError(f"{root}: no class folders")
    listing[split] = _group(pairs)
  return listing


def decode(path: str) -> np.ndarray:
  """One image -> ``[84, 84, 3]`` uint8 (RGB, LANCZOS, as proc_images.py)."""
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise PrepError(f"{path}: not a readable image ({e})") from e
  return np.asarray(image.resize((SIZE, SIZE), Image.LANCZOS), np.uint8)


def prepare(config: MiniImageNetPrepConfig) -> dict:
  """Builds the cache; returns its index."""
  check_output(config.output, config.overwrite)
  layout = (detect_layout(config.input) if config.layout == "auto" else
            config.layout)
  listing = (list_csv if layout == "csv" else list_folders)(config.input)
  owner: dict[str, str] = {}
  for split in SPLITS:
    for label, _ in listing[split]:
      if label in owner:
        raise PrepError(f"class {label} is in both the {owner[label]} and "
                        f"the {split} split; expected disjoint classes")
      owner[label] = split
  provenance = {"layout": layout, "pillow": PIL.__version__}
  if layout == "csv":
    provenance["csv_sha256"] = {
        f"{s}.csv": file_sha256(os.path.join(config.input, f"{s}.csv"))
        for s in SPLITS}
  pool = (multiprocessing.Pool(config.num_workers)
          if config.num_workers > 1 else None)
  try:
    with CacheWriter(config.output, "miniimagenet",
                     (SIZE, SIZE, 3)) as writer:
      for split in SPLITS:
        paths = [p for _, ps in listing[split] for p in ps]
        logging.info("miniImageNet %s: %d classes, %d images", split,
                     len(listing[split]), len(paths))
        array = writer.new_array(split, len(paths))
        decoded = (pool.imap(decode, paths, chunksize=16) if pool else
                   map(decode, paths))
        for row, image in enumerate(decoded):
          array[row] = image
          if (row + 1) % 5000 == 0:
            logging.info("  %d / %d", row + 1, len(paths))
        start = 0
        for label, ps in listing[split]:
          source = (f"{split}.csv" if layout == "csv" else f"{split}/{label}")
          writer.add_class(label, split, split, start, len(ps), source)
          start += len(ps)
      return writer.commit(
          layout, "as given: train/val/test " + (
              "csv files" if layout == "csv" else "folders"),
          "RGB, value / 255 (no mean subtraction)", provenance)
  finally:
    if pool is not None:
      pool.terminate()


def parse_args(argv: Sequence[str] | None = None) -> MiniImageNetPrepConfig:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.miniimagenet",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True,
                      help="images/ + train/val/test.csv, or train/ val/ "
                      "test/ class folders")
  parser.add_argument("--output", required=True, help="cache directory")
  parser.add_argument("--layout", default="auto", choices=LAYOUTS)
  parser.add_argument("--num_workers", type=int, default=1,
                      help="processes decoding JPEGs")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing cache at --output")
  return MiniImageNetPrepConfig(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
  return run_main("miniimagenet", parse_args, prepare, argv)


if __name__ == "__main__":
  sys.exit(main())
