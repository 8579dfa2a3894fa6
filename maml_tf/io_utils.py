"""File input and output: a result or checkpoint is either complete or
absent, and a damaged input file is named, not a traceback."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile

import numpy as np


class CheckpointUnreadableError(RuntimeError):
  """A checkpoint's files are missing or damaged (``Trainer.restore``)."""


def open_npy(path: str) -> np.ndarray:
  """A plain ``.npy`` array, memory-mapped (no pickled objects).

  Raises:
    ValueError: ``path`` is not a readable ``.npy`` array (empty, truncated,
      pickled objects, or an ``.npz`` archive under that name); the message
      says which, without the path.
  """
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except EOFError as e:  # an empty file
    raise ValueError(f"empty or truncated ({e})") from e
  except (OSError, ValueError) as e:
    raise ValueError(str(e)) from e
  if not isinstance(array, np.ndarray):
    array.close()
    raise ValueError("an .npz archive, not an .npy array")
  return array


def umask_mode(mode: int) -> int:
  """``mode`` less the process's umask: what ``open``/``mkdir`` would give.
  ``tempfile`` creates files 0600 and directories 0700, which would keep a
  team's results and dataset caches from everyone but their writer."""
  umask = os.umask(0o022)
  os.umask(umask)
  return mode & ~umask


def make_temp_dir(prefix: str, parent: str) -> str:
  """A new directory in ``parent`` for output to be renamed into place,
  with the permissions of an ordinary ``mkdir``."""
  path = tempfile.mkdtemp(prefix=prefix, dir=parent)
  os.chmod(path, umask_mode(0o777))
  return path


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside ``path``; renames it over ``path`` on
  success and deletes it on failure, so readers never see a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-",
                             dir=directory)
  os.close(fd)
  try:
    yield tmp
    if os.path.isfile(tmp):
      os.chmod(tmp, umask_mode(0o666))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and a rename."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)


def _aside(dst: str) -> tuple[str, str]:
  """Where ``atomic_replace_dir`` moves a replaced ``dst``: hidden siblings
  named ``.<name>.replaced-*``, which nothing but this module creates."""
  parent, name = os.path.split(os.path.abspath(dst))
  return parent, f".{name}.replaced-"


def atomic_replace_dir(src: str, dst: str) -> None:
  """Moves directory ``src`` to ``dst``, replacing ``dst`` if it exists.

  The old ``dst`` is first renamed aside, to a new hidden sibling, so at every
  instant either the old or the new directory is complete under some name
  (``recover_replaced_dir`` puts it back after a kill between the renames).
  Nothing but the old ``dst`` and earlier such leftovers is deleted: a
  ``<dst>.old`` of the user's stays (the aside name was ``<dst>.old`` before
  2026-11-24, and a replacement deleted whatever held that name).
  """
  parent, prefix = _aside(dst)
  if os.path.exists(dst):
    # (A directory may replace an empty one.)
    os.replace(dst, tempfile.mkdtemp(prefix=prefix, dir=parent))
  os.replace(src, dst)
  for aside in glob.glob(os.path.join(glob.escape(parent),
                                      glob.escape(prefix) + "*")):
    shutil.rmtree(aside)  # this one, and any a kill left


def recover_replaced_dir(dst: str) -> None:
  """Undoes the first half of an ``atomic_replace_dir`` that was killed
  between its two renames: puts ``dst``'s old version back in place."""
  if os.path.exists(dst):
    return
  parent, prefix = _aside(dst)
  asides = sorted(glob.glob(os.path.join(glob.escape(parent),
                                         glob.escape(prefix) + "*")),
                  key=os.path.getmtime)
  if not asides and os.path.isdir(dst + ".old"):
    asides = [dst + ".old"]  # left by a run before 2026-11-24
  if asides:
    os.replace(asides[-1], dst)
