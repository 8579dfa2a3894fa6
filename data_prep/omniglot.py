"""Omniglot (Lake et al. 2015) -> a 28x28 few-shot cache.

  python -m data_prep.omniglot --input <dir> --output <cache dir> [--split ...]

``<dir>`` holds the official archives, zipped or extracted:
``images_background.zip`` and ``images_evaluation.zip`` (30 + 20 alphabets,
1623 characters x 20 drawers), or the "background small" pair
``images_background_small1.zip`` and ``images_background_small2.zip`` (8
alphabets, 242 characters once Greek and Latin, which are in both, are
deduplicated). Inside each archive: ``<archive>/<Alphabet>/<characterNN>/
<image id>_<drawer>.png``, 105x105 1-bit PNGs, ink black.

Preprocessing is cbfinn/maml's ``resize_images.py``:
``Image.open(f).resize((28, 28), LANCZOS)``. Pillow resamples mode '1' images
with NEAREST whatever filter is asked, so the original's 28x28 images are
binary, nearest-neighbour samples; ``--resize=antialias`` converts to 8-bit
gray first so that LANCZOS really filters (not the original). Pixels are then
inverted (stored ``255 - p``) so that ``value / 255`` equals the original's
``1 - x``: ink is 1.

Splits, by character (every split's characters in sorted order, so nothing
depends on the file system):

* ``original``: cbfinn/maml's: the sorted characters shuffled by
  ``random.Random(seed)`` (the original's ``random.seed(1); shuffle``), 1100
  train, 100 val, the remaining 423 test. The original shuffled an unsorted
  ``os.listdir`` order, so its split depended on the file system and differs
  from this one.
* ``vinyals``: by archive: ``images_background`` alphabets train, the
  ``images_evaluation`` alphabets test; 5 of the 30 background alphabets
  (sorted, shuffled by ``random.Random(seed)``, the first 5) are val.
* ``small``: the 242 background-small characters, sorted, shuffled by
  ``random.Random(seed)``: 150 train, 30 val, 62 test.

``auto`` picks ``original`` when both full archives are present, else
``small``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import sys
import zipfile
import zlib
from typing import Callable, Sequence

import numpy as np
import PIL
from PIL import Image

from data_prep.cache import (CacheWriter, PrepError, check_output, file_sha256,
                             run_main, seeded_shuffle)

FULL = ("images_background", "images_evaluation")
SMALL = ("images_background_small1", "images_background_small2")
ARCHIVES = FULL + SMALL
SCHEMES = ("auto", "original", "vinyals", "small")
SOURCE_SIZE = (105, 105)
SIZE = 28

# Split sizes, in characters.
ORIGINAL_TRAIN, ORIGINAL_VAL = 1100, 100
SMALL_TRAIN, SMALL_VAL = 150, 30
VINYALS_VAL_ALPHABETS = 5

SPLIT_RULES = {
    "original": "cbfinn/maml: sorted alphabet/character names shuffled with "
                "random.Random({seed}); first 1100 train, next 100 val, rest "
                "test",
    "vinyals": "images_background alphabets train except 5 val alphabets "
               "(sorted background alphabet names shuffled with "
               "random.Random({seed}), first 5); images_evaluation test",
    "small": "background-small characters (small1 + small2, deduplicated), "
             "sorted alphabet/character names shuffled with "
             "random.Random({seed}); first 150 train, next 30 val, rest test",
}


@dataclasses.dataclass(frozen=True)
class OmniglotPrepConfig:
  """Arguments of ``data_prep.omniglot`` (see the module docstring)."""

  input: str
  output: str
  split: str = "auto"
  seed: int = 1
  resize: str = "original"
  overwrite: bool = False

  def __post_init__(self):
    if self.split not in SCHEMES:
      raise PrepError(f"--split={self.split!r}: expected one of {SCHEMES}")
    if self.resize not in ("original", "antialias"):
      raise PrepError(f"--resize={self.resize!r}: expected original or "
                      "antialias")
    if not os.path.isdir(self.input):
      raise PrepError(f"--input={self.input}: not a directory")


# An image: (file name inside its character folder, read() -> PNG bytes).
ImageEntry = tuple[str, Callable[[], bytes]]


def _where(input_dir: str, name: str) -> str | None:
  """``<input>/<name>.zip`` or the extracted ``<input>/<name>/``."""
  zip_path = os.path.join(input_dir, f"{name}.zip")
  if os.path.isfile(zip_path):
    return zip_path
  folder = os.path.join(input_dir, name)
  return folder if os.path.isdir(folder) else None


def _is_junk(part: str) -> bool:
  # Finder / Explorer metadata that zips made on desktops carry.
  return part.startswith(".") or part == "__MACOSX" or part == "Thumbs.db"


def read_archive(path: str, name: str) -> dict[str, list[ImageEntry]]:
  """Lists an archive's images by character.

  Args:
    path: the ``.zip`` or the extracted folder.
    name: the archive name (its top-level folder).

  Returns:
    ``'Alphabet/characterNN'`` -> images sorted by file name.
  """
  characters: dict[str, list[ImageEntry]] = {}

  def add(parts: list[str], where: str, read: Callable[[], bytes]):
    if any(_is_junk(p) for p in parts) or not parts[-1].lower().endswith(
        ".png"):
      return
    if len(parts) != 3:
      raise PrepError(f"{where}: expected {name}/<Alphabet>/<character>/"
                      "<image>.png")
    characters.setdefault(f"{parts[0]}/{parts[1]}", []).append(
        (parts[2], read))

  if path.endswith(".zip"):
    try:
      archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
      raise PrepError(f"{path}: not a readable zip archive ({e})") from e
    for info in archive.infolist():
      if info.is_dir():
        continue
      parts = info.filename.split("/")
      if parts[0] != name:
        if _is_junk(parts[0]):
          continue
        raise PrepError(f"{path}: entry {info.filename!r} is not under "
                        f"{name}/ as in the official archive")
      add(parts[1:], f"{path}:{info.filename}",
          lambda n=info.filename: _read_member(archive, path, n))
  else:
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for file in sorted(files):
        full = os.path.join(root, file)
        parts = os.path.relpath(full, path).split(os.sep)

        def read(full=full):
          with open(full, "rb") as f:
            return f.read()

        add(parts, full, read)
  if not characters:
    raise PrepError(f"{path}: no {name}/<Alphabet>/<character>/*.png images")
  return {k: sorted(v, key=lambda im: im[0]) for k, v in characters.items()}


def _read_member(archive: zipfile.ZipFile, path: str, member: str) -> bytes:
  try:
    return archive.read(member)
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise PrepError(f"{path}:{member}: damaged in the archive ({e}); "
                    "download the archive again") from e


def load_archives(input_dir: str, names: Sequence[str]
                  ) -> tuple[dict[str, list[ImageEntry]], dict[str, str], dict]:
  """Reads several archives and merges them, deduplicating characters.

  A character present in several archives (Greek and Latin are in both
  background-small archives) must be byte-identical in all of them; it is kept
  once, attributed to the first archive in ``names`` order.

  Returns:
    ``(images by character, source archive by character, provenance)``.
  """
  merged: dict[str, list[ImageEntry]] = {}
  source: dict[str, str] = {}
  provenance = {"archives": {}, "alphabets": {}}
  for name in names:
    path = _where(input_dir, name)
    if path is None:
      raise PrepError(f"--input={input_dir}: neither {name}.zip nor an "
                      f"extracted {name}/ folder")
    info = {"file": os.path.basename(path)}
    if path.endswith(".zip"):
      info["sha256"] = file_sha256(path)
    provenance["archives"][name] = info
    for key, images in read_archive(path, name).items():
      alphabet = key.split("/")[0]
      sources = provenance["alphabets"].setdefault(alphabet, [])
      if name not in sources:
        sources.append(name)
      if key not in merged:
        merged[key], source[key] = images, name
        continue
      same = ([f for f, _ in merged[key]] == [f for f, _ in images] and
              all(a() == b() for (_, a), (_, b) in zip(merged[key], images)))
      if not same:
        raise PrepError(f"{key} is in both {source[key]} and {name} with "
                        "different images; expected identical copies")
  return merged, source, provenance


def decode(data: bytes, where: str, resize: str = "original") -> np.ndarray:
  """One official PNG -> ``[28, 28]`` uint8 with ink 255 (inverted).

  ``resize='original'`` is ``resize_images.py``'s
  ``resize((28, 28), LANCZOS)`` on the image as stored (mode '1': Pillow uses
  NEAREST); ``'antialias'`` resizes the 8-bit gray image with LANCZOS.
  """
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise PrepError(f"{where}: not a readable PNG image ({e})") from e
  if image.size != SOURCE_SIZE:
    raise PrepError(f"{where}: {image.size[0]}x{image.size[1]} pixels, "
                    "expected the official 105x105 Omniglot images")
  if resize == "antialias":
    image = image.convert("L")
  small = image.resize((SIZE, SIZE), Image.LANCZOS).convert("L")
  return 255 - np.asarray(small, np.uint8)


def split_characters(names: Sequence[str], scheme: str, seed: int,
                     background: Sequence[str] = ()) -> dict[str, str]:
  """Assigns every character to 'train', 'val' or 'test'.

  Args:
    names: ``'Alphabet/character'`` names (any order).
    scheme: 'original', 'vinyals' or 'small' (see the module docstring).
    seed: the shuffle seed (the original: 1).
    background: for 'vinyals', the characters of ``images_background``.

  Returns:
    name -> split.
  """
  if scheme == "vinyals":
    background = set(background)
    alphabets = sorted({n.split("/")[0] for n in background})
    val = set(seeded_shuffle(alphabets, seed)[:VINYALS_VAL_ALPHABETS])
    return {n: ("test" if n not in background else
                "val" if n.split("/")[0] in val else "train") for n in names}
  train, val = {"original": (ORIGINAL_TRAIN, ORIGINAL_VAL),
                "small": (SMALL_TRAIN, SMALL_VAL)}[scheme]
  if len(names) <= train + val:
    raise PrepError(f"--split={scheme} needs more than {train + val} "
                    f"characters ({train} train, {val} val, the rest test); "
                    f"the input has {len(names)}")
  order = seeded_shuffle(names, seed)
  return {n: "train" if i < train else "val" if i < train + val else "test"
          for i, n in enumerate(order)}


def resolve_scheme(input_dir: str, split: str) -> str:
  if split != "auto":
    return split
  if all(_where(input_dir, n) for n in FULL):
    return "original"
  if all(_where(input_dir, n) for n in SMALL):
    return "small"
  found = [n for n in ARCHIVES if _where(input_dir, n)]
  raise PrepError(
      f"--input={input_dir}: expected images_background.zip and "
      "images_evaluation.zip, or images_background_small1.zip and "
      "images_background_small2.zip (zipped or extracted); found "
      f"{found or 'none of them'}")


def prepare(config: OmniglotPrepConfig) -> dict:
  """Builds the cache; returns its index."""
  check_output(config.output, config.overwrite)
  scheme = resolve_scheme(config.input, config.split)
  names = SMALL if scheme == "small" else FULL
  images, source, provenance = load_archives(config.input, names)
  characters = sorted(images)
  background = [c for c in characters if source[c] == "images_background"]
  splits = split_characters(characters, scheme, config.seed, background)
  total = sum(len(images[c]) for c in characters)
  logging.info("Omniglot: %d characters, %d images from %s; split %s", len(
      characters), total, ", ".join(names), scheme)
  provenance.update({"resize": config.resize, "seed": config.seed,
                     "pillow": PIL.__version__})
  with CacheWriter(config.output, "omniglot", (SIZE, SIZE, 1)) as writer:
    array = writer.new_array("images", total)
    row = 0
    for c in characters:
      for file, read in images[c]:
        array[row, :, :, 0] = decode(read(), f"{source[c]}/{c}/{file}",
                                     config.resize)
        row += 1
      writer.add_class(c, splits[c], "images", row - len(images[c]),
                       len(images[c]), source[c])
    return writer.commit(
        scheme, SPLIT_RULES[scheme].format(seed=config.seed),
        "ink = 255 (the official PNGs inverted): value / 255 is the "
        "original's 1 - x", provenance)


def parse_args(argv: Sequence[str] | None = None) -> OmniglotPrepConfig:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.omniglot",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True,
                      help="directory with the official archives (zips or "
                      "extracted folders)")
  parser.add_argument("--output", required=True, help="cache directory")
  parser.add_argument("--split", default="auto", choices=SCHEMES,
                      help="character split (default: original with the full "
                      "archives, small with the background-small ones)")
  parser.add_argument("--seed", type=int, default=1,
                      help="shuffle seed of the split (the original: 1)")
  parser.add_argument("--resize", default="original",
                      choices=("original", "antialias"),
                      help="original: resize_images.py (nearest for these "
                      "1-bit PNGs); antialias: LANCZOS on 8-bit gray")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing cache at --output")
  args = parser.parse_args(argv)
  return OmniglotPrepConfig(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
  return run_main("omniglot", parse_args, prepare, argv)


if __name__ == "__main__":
  sys.exit(main())
