"""data_prep.omniglot on generated official-format archives and on the real
background-small archives."""

import io
import json
import os
import random
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_prep import omniglot
from data_prep.cache import PrepError
from maml_tf import image_data
from tests import image_files


def prepare(input_dir, output, **kw):
  return omniglot.prepare(omniglot.OmniglotPrepConfig(
      input=str(input_dir), output=str(output), **kw))


@pytest.fixture(scope="module")
def small_zips(tmp_path_factory):
  return image_files.small_archives(tmp_path_factory.mktemp("small_zips"))


def test_small_split_dedup_and_layout(small_zips, tmp_path):
  index = prepare(small_zips, tmp_path / "cache")
  classes = index["classes"]
  names = [c["name"] for c in classes]
  # 95 + 95 own characters + Greek's 3 once (it is in both archives).
  assert len(names) == 193 and names == sorted(names)
  assert sum(n.startswith("Greek/") for n in names) == 3
  assert index["provenance"]["alphabets"]["Greek"] == [
      "images_background_small1", "images_background_small2"]
  assert {c["source"] for c in classes if c["name"].startswith("Greek/")} == {
      "images_background_small1"}
  assert index["split_scheme"] == "small"
  counts = {s: index["splits"][s]["classes"] for s in ("train", "val", "test")}
  assert counts == {"train": 150, "val": 30, "test": 13}
  # The split is the seeded shuffle of the sorted names, as documented.
  order = sorted(names)
  random.Random(1).shuffle(order)
  split_of = {c["name"]: c["split"] for c in classes}
  assert [split_of[n] for n in order] == ["train"] * 150 + ["val"] * 30 + [
      "test"] * 13
  # Rows: contiguous per class, 2 drawers each, in drawer order.
  assert [c["start"] for c in classes] == list(range(0, 2 * 193, 2))
  images = np.load(tmp_path / "cache" / "images.npy")
  assert images.shape == (386, 28, 28, 1) and images.dtype == np.uint8


def test_pixels_are_resize_images_py_then_inverted(small_zips, tmp_path):
  prepare(small_zips, tmp_path / "cache")
  images = np.load(tmp_path / "cache" / "images.npy")
  png = image_files.omniglot_entries(
      "images_background_small1", {"Alpha0": 1}, 2)[
          "images_background_small1/Alpha0/character01/0001_01.png"]
  source = Image.open(io.BytesIO(png))
  assert source.mode == "1"
  # Pillow resamples mode '1' with NEAREST even when LANCZOS is asked, so the
  # original's images are binary nearest-neighbour samples.
  nearest = np.asarray(source.resize((28, 28), Image.NEAREST).convert("L"))
  index = json.loads((tmp_path / "cache" / "index.json").read_text())
  row = next(c["start"] for c in index["classes"]
             if c["name"] == "Alpha0/character01")
  np.testing.assert_array_equal(images[row, :, :, 0], 255 - nearest)
  assert set(np.unique(images)) == {0, 255}
  # Ink (black, 0 in the PNG) is 255: value / 255 is the original's 1 - x.
  assert images.mean() < 0.3 * 255

  smooth = omniglot.decode(png, "x", resize="antialias")
  assert len(np.unique(smooth)) > 10
  assert np.abs(smooth.astype(float) - (255 - nearest)).mean() < 40


def test_zipped_and_extracted_archives_give_the_same_cache(small_zips,
                                                           tmp_path):
  extracted = image_files.small_archives(tmp_path / "extracted", zipped=False)
  a = prepare(small_zips, tmp_path / "a")
  b = prepare(extracted, tmp_path / "b")
  assert a["classes"] == b["classes"]
  assert ((tmp_path / "a" / "images.npy").read_bytes() ==
          (tmp_path / "b" / "images.npy").read_bytes())
  assert "sha256" in a["provenance"]["archives"]["images_background_small1"]


def test_deterministic_bytes(small_zips, tmp_path):
  prepare(small_zips, tmp_path / "a")
  prepare(small_zips, tmp_path / "b")
  for name in ("images.npy", "index.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" /
                                                    name).read_bytes()


def test_split_rules():
  names = [f"A{a:02d}/character{c:02d}" for a in range(50) for c in range(33)]
  names = names[:1623]
  shuffled = list(names)
  random.Random(7).shuffle(shuffled)
  original = omniglot.split_characters(names, "original", 1)
  # The split does not depend on the listing order (the original's did).
  assert omniglot.split_characters(shuffled, "original", 1) == original
  sizes = {s: sum(v == s for v in original.values())
           for s in ("train", "val", "test")}
  assert sizes == {"train": 1100, "val": 100, "test": 423}
  assert omniglot.split_characters(names, "original", 2) != original

  background = [n for n in names if int(n[1:3]) < 30]
  vinyals = omniglot.split_characters(names, "vinyals", 1, background)
  assert all(vinyals[n] == "test" for n in names if n not in background)
  val_alphabets = {n.split("/")[0] for n in names if vinyals[n] == "val"}
  assert len(val_alphabets) == 5
  assert all(int(a[1:3]) < 30 for a in val_alphabets)
  assert sum(v == "train" for v in vinyals.values()) == 25 * 33

  with pytest.raises(PrepError, match="--split=small needs more than 180"):
    omniglot.split_characters(names[:100], "small", 1)


def test_vinyals_split_from_full_archives(tmp_path):
  background = image_files.omniglot_entries(
      "images_background", {f"B{i}": 2 for i in range(7)}, 2)
  evaluation = image_files.omniglot_entries(
      "images_evaluation", {"E0": 2, "E1": 3}, 2, first_id=500)
  image_files.write_zip(tmp_path / "images_background.zip", background)
  image_files.write_tree(tmp_path, evaluation)  # extracted: mixing is fine
  index = prepare(tmp_path, tmp_path / "cache", split="vinyals")
  split = {c["name"]: c["split"] for c in index["classes"]}
  assert {n for n, s in split.items() if s == "test"} == {
      f"E{a}/character{c:02d}" for a, n in ((0, 2), (1, 3))
      for c in range(1, n + 1)}
  assert sum(s == "val" for s in split.values()) == 10  # 5 alphabets x 2
  assert sum(s == "train" for s in split.values()) == 4
  # auto with the full archives is the original split, which needs 1201+.
  with pytest.raises(PrepError, match="--split=original needs more than"):
    prepare(tmp_path, tmp_path / "cache2")


def test_conflicting_duplicates_are_an_error(tmp_path):
  image_files.small_archives(tmp_path)
  entries = image_files.omniglot_entries("images_background_small2",
                                         {"Greek": 3}, 2, first_id=900)
  entries["images_background_small2/Greek/character01/0900_01.png"] = (
      image_files.omniglot_png(12345))
  image_files.write_zip(tmp_path / "images_background_small2.zip", entries)
  with pytest.raises(PrepError, match="Greek/character01 is in both "
                     "images_background_small1 and images_background_small2"):
    prepare(tmp_path, tmp_path / "cache")


def test_missing_archive_is_named(small_zips, tmp_path):
  (tmp_path / "images_background_small1.zip").write_bytes(
      (small_zips / "images_background_small1.zip").read_bytes())
  with pytest.raises(PrepError, match="images_background_small1.zip and "
                     "images_background_small2.zip"):
    prepare(tmp_path, tmp_path / "cache")
  with pytest.raises(PrepError, match="neither images_background_small2.zip "
                     "nor an extracted images_background_small2/"):
    prepare(tmp_path, tmp_path / "cache", split="small")


@pytest.mark.parametrize("bad,message", [
    ("corrupt", "Alpha0/character02/0002_01.png: not a readable PNG"),
    ("size", r"0002_01.png: 28x28 pixels, expected the official 105x105"),
    ("layout", "expected images_background_small1/<Alphabet>/<character>/"),
    # These two were a zipfile.BadZipFile and a DecompressionBombError.
    ("damaged", "Alpha0/character02/0002_01.png: damaged in the archive "
     r"\(Bad CRC-32"),
    ("huge", r"\.png: not a readable PNG image \(Image size \(11025 pixels\) "
     "exceeds"),
])
def test_bad_images_are_named_and_nothing_is_written(small_zips, tmp_path,
                                                     bad, message,
                                                     monkeypatch):
  zip_name = "images_background_small1.zip"
  entries = image_files.omniglot_entries("images_background_small1",
                                         {"Alpha0": 95}, 2)
  key = "images_background_small1/Alpha0/character02/0002_01.png"
  if bad == "corrupt":
    entries[key] = entries[key][:40]
  elif bad == "size":
    small = io.BytesIO()
    Image.new("1", (28, 28), 1).save(small, format="PNG")
    entries[key] = small.getvalue()
  elif bad == "layout":
    entries["images_background_small1/Alpha0/stray.png"] = entries[key]
  elif bad == "huge":  # Pillow's guard, as against a 15000x15000 image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  image_files.write_zip(tmp_path / zip_name, entries)
  if bad == "damaged":  # one byte of the member's stored data flipped
    with zipfile.ZipFile(tmp_path / zip_name) as z:
      info = z.getinfo(key)
    data = bytearray((tmp_path / zip_name).read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / zip_name).write_bytes(bytes(data))
  (tmp_path / "images_background_small2.zip").write_bytes(
      (small_zips / "images_background_small2.zip").read_bytes())
  with pytest.raises(PrepError, match=message):
    prepare(tmp_path, tmp_path / "out" / "cache")
  out = tmp_path / "out"
  assert not (out / "cache").exists()
  assert not out.exists() or not any(out.iterdir())  # no temporary left


def test_output_protection_and_cli(small_zips, tmp_path, capsys):
  cache = tmp_path / "cache"
  assert omniglot.main(["--input", str(small_zips), "--output",
                        str(cache)]) == 0
  assert omniglot.main(["--input", str(small_zips), "--output",
                        str(cache)]) == 2
  assert "already holds a cache; pass --overwrite" in capsys.readouterr().err
  assert omniglot.main(["--input", str(small_zips), "--output", str(cache),
                        "--overwrite", "--seed", "3"]) == 0
  assert json.loads((cache / "index.json").read_text())["provenance"][
      "seed"] == 3
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  assert omniglot.main(["--input", str(small_zips), "--output",
                        str(other), "--overwrite"]) == 2
  assert "not a cache, refusing" in capsys.readouterr().err
  assert (other / "notes.txt").read_text() == "keep me"
  assert sorted(os.listdir(tmp_path)) == ["cache", "other"]  # no temp left


def test_real_background_small_archives(omniglot_archives, tmp_path):
  index = prepare(omniglot_archives, tmp_path / "a")
  classes = index["classes"]
  assert len(classes) == 242 and all(c["count"] == 20 for c in classes)
  assert {s: v["classes"] for s, v in index["splits"].items()} == {
      "train": 150, "val": 30, "test": 62}
  alphabets = {}
  for c in classes:
    alphabet = c["name"].split("/")[0]
    alphabets[alphabet] = alphabets.get(alphabet, 0) + 1
  assert alphabets == {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24,
                       "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26,
                       "Sanskrit": 42, "Tagalog": 17}
  both = ["images_background_small1", "images_background_small2"]
  assert index["provenance"]["alphabets"]["Greek"] == both
  assert index["provenance"]["alphabets"]["Latin"] == both
  splits = image_data.load_cache(str(tmp_path / "a"), "omniglot")
  assert splits["train"].examples.shape == (4840, 28, 28, 1)
  prepare(omniglot_archives, tmp_path / "b")
  for name in ("images.npy", "index.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" /
                                                    name).read_bytes()
