"""Tiny dataset files in exactly the official formats, for data_prep tests."""

from __future__ import annotations

import io
import os
import pathlib
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageDraw


def _seed(*parts) -> int:
  """A stable seed (``hash()`` of strings changes between processes)."""
  return zlib.crc32(repr(parts).encode())


def omniglot_png(seed: int) -> bytes:
  """A 105x105 mode-'1' PNG like the official ones: white paper (1), a few
  black strokes (0)."""
  rng = np.random.default_rng(seed)
  image = Image.new("1", (105, 105), 1)
  draw = ImageDraw.Draw(image)
  for _ in range(3):
    draw.line([tuple(int(v) for v in rng.integers(10, 95, 2))
               for _ in range(3)], fill=0, width=3)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def omniglot_entries(archive: str, alphabets: dict[str, int], drawers: int,
                     first_id: int = 1) -> dict[str, bytes]:
  """``{<archive>/<Alphabet>/characterNN/<id>_<drawer>.png: PNG}``; the
  image id counts characters globally as in the official archives."""
  entries = {}
  image_id = first_id
  for alphabet, count in alphabets.items():
    for c in range(1, count + 1):
      for d in range(1, drawers + 1):
        name = (f"{archive}/{alphabet}/character{c:02d}/"
                f"{image_id:04d}_{d:02d}.png")
        entries[name] = omniglot_png(_seed(alphabet, c, d))
      image_id += 1
  return entries


def write_zip(path: pathlib.Path, entries: dict[str, bytes]) -> pathlib.Path:
  """A zip with a directory entry for every folder, as the official ones."""
  folders = set()
  for name in entries:
    parts = name.split("/")[:-1]
    folders.update("/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
  with zipfile.ZipFile(path, "w") as z:
    for folder in sorted(folders):
      z.writestr(folder, b"")
    for name in sorted(entries):
      z.writestr(name, entries[name])
  return path


def write_tree(root: pathlib.Path, entries: dict[str, bytes]) -> None:
  for name, data in entries.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def small_archives(directory: pathlib.Path, characters: int = 95,
                   drawers: int = 2, zipped: bool = True) -> pathlib.Path:
  """The background-small pair: 'Greek' (3 characters) in both archives, as
  in the real ones; ``2 * characters + 3`` distinct characters in total."""
  directory.mkdir(parents=True, exist_ok=True)
  shared = omniglot_entries("x", {"Greek": 3}, drawers, first_id=900)
  for i, name in enumerate(("images_background_small1",
                            "images_background_small2")):
    own = omniglot_entries(name, {f"Alpha{i}": characters}, drawers,
                           first_id=1 + 100 * i)
    own.update({k.replace("x/", f"{name}/", 1): v for k, v in shared.items()})
    if zipped:
      write_zip(directory / f"{name}.zip", own)
    else:
      write_tree(directory, own)
  return directory


def jpeg(seed: int, size=(100, 90), mode="RGB") -> bytes:
  rng = np.random.default_rng(seed)
  channels = 3 if mode == "RGB" else 1
  pixels = rng.integers(0, 256, (size[1], size[0], channels), np.uint8)
  image = Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode)
  out = io.BytesIO()
  image.save(out, format="JPEG")
  return out.getvalue()


MINI_CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"],
                "test": ["n06", "n07"]}


def mini_csv_layout(root: pathlib.Path, per_class: int = 3) -> pathlib.Path:
  """Ravi & Larochelle: images/ + {train,val,test}.csv (filename,label)."""
  (root / "images").mkdir(parents=True)
  for split, labels in MINI_CLASSES.items():
    lines = ["filename,label"]
    for label in labels:
      for i in range(per_class):
        name = f"{label}{i:08d}.jpg"
        (root / "images" / name).write_bytes(jpeg(_seed(label, i)))
        lines.append(f"{name},{label}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
  return root


def mini_folder_layout(csv_root: pathlib.Path, root: pathlib.Path
                       ) -> pathlib.Path:
  """The same images as ``{train,val,test}/<wnid>/*.jpg``."""
  for split in MINI_CLASSES:
    for line in (csv_root / f"{split}.csv").read_text().splitlines()[1:]:
      name, label = line.split(",")
      target = root / split / label / name
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes((csv_root / "images" / name).read_bytes())
  return root


# Real category names; "house" / "house plant" sort differently with and
# without the ".npy" suffix, which decides the fastforwardlabs split.
QUICKDRAW_NAMES = ["cat", "house", "house plant", "The Eiffel Tower", "bus",
                   "bush", "car", "apple", "zebra", "sun", "moon", "tree"]


def quickdraw_files(root: pathlib.Path, categories: int = 10,
                    drawings: int = 30) -> pathlib.Path:
  """``<category>.npy`` [N, 784] uint8; pixel 0 of drawing i of category c is
  ``c``, pixel 1 is ``i``, so every cached image can be traced back."""
  root.mkdir(parents=True, exist_ok=True)
  for c, name in enumerate(QUICKDRAW_NAMES[:categories]):
    data = np.zeros((drawings, 784), np.uint8)
    data[:, 0] = c
    data[:, 1] = np.arange(drawings)
    data[:, 2:] = 255 * (np.arange(782) % 7 == 0)
    np.save(os.path.join(root, f"{name}.npy"), data)
  return root
