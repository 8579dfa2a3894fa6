"""Atomic file output: a result or checkpoint is either complete or absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


class CheckpointUnreadableError(RuntimeError):
  """A checkpoint's files are missing or damaged (``Trainer.restore``)."""


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


def atomic_replace_dir(src: str, dst: str) -> None:
  """Moves directory ``src`` to ``dst``, replacing ``dst`` if it exists.

  The old ``dst`` is first renamed aside, so at every instant either the old or
  the new directory is complete under some name.
  """
  old = None
  if os.path.exists(dst):
    old = dst + ".old"
    if os.path.exists(old):
      shutil.rmtree(old)
    os.replace(dst, old)
  os.replace(src, dst)
  if old is not None:
    shutil.rmtree(old)


def recover_replaced_dir(dst: str) -> None:
  """Undoes the first half of an ``atomic_replace_dir`` that was killed
  between its two renames: puts ``dst``'s old version back in place."""
  old = dst + ".old"
  if not os.path.exists(dst) and os.path.exists(old):
    os.replace(old, dst)
