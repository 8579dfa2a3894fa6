"""File input and output: a result or checkpoint is either complete or
absent, and a damaged input file is named, not a traceback."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import socket
import tempfile
import zipfile

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
  except zipfile.BadZipFile as e:  # (numpy reads a file starting PK as .npz)
    raise ValueError(f"a damaged .npz archive ({e})") from e
  except (OSError, ValueError) as e:
    raise ValueError(str(e)) from e
  if not isinstance(array, np.ndarray):
    array.close()
    raise ValueError("an .npz archive, not an .npy array")
  return array


def remove_stale_temporary_files(directory: str) -> None:
  """Removes the temporary files (``.tmp-*``) that writes killed midway left
  in ``directory``. Only safe while no other process writes there (under
  the run directory's exclusive lock)."""
  for stale in glob.glob(os.path.join(glob.escape(directory), ".tmp-*")):
    if os.path.isfile(stale):
      os.remove(stale)


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
  with _temporary_file(path) as tmp:
    yield tmp
    os.replace(tmp, path)


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and a rename."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)


def atomic_write_files(contents: dict[str, str | bytes]) -> None:
  """Writes several files (path -> data) that belong together: all of them
  are written to temporary files first and renamed one after the other at
  the end, so a kill leaves the old set or the new one, but for a window of
  a few renames (``atomic_write`` one by one left a mixed set when killed
  between two files)."""
  with contextlib.ExitStack() as stack:
    temps = {}
    for path, data in contents.items():
      temps[path] = stack.enter_context(_temporary_file(path))
      with open(temps[path], "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    # Two writers of one set (two tests of a run directory share its lock)
    # rename in turn, so the set is one writer's or the other's.
    fd = os.open(os.path.dirname(os.path.abspath(next(iter(contents)))),
                 os.O_RDONLY)  # (flock on the directory itself)
    stack.callback(os.close, fd)
    fcntl.flock(fd, fcntl.LOCK_EX)
    for path, tmp in temps.items():
      os.replace(tmp, path)


@contextlib.contextmanager
def _temporary_file(path: str):
  """A temporary file beside ``path`` (readable as ``open`` would make it),
  removed on failure unless it has been renamed."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-",
                             dir=directory)
  os.close(fd)
  os.chmod(tmp, umask_mode(0o666))
  try:
    yield tmp
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class RunDirectoryBusyError(RuntimeError):
  """Another process is training in the run directory (or evaluating it,
  when this one would train)."""


LOCK_FILE = ".lock"


# Run directories this process holds locked: real path -> [fd, exclusive,
# depth]. flock locks belong to an open file, so a second acquisition in the
# same process must reuse the first instead of opening the file again.
_HELD: dict[str, list] = {}


@contextlib.contextmanager
def run_directory_lock(run_dir: str, exclusive: bool):
  """Holds a lock on ``run_dir`` (``flock`` on ``run_dir/.lock``): exclusive
  to train, shared to evaluate; re-entrant within a process (an exclusive
  hold covers a shared request). Two runs of one command in one directory
  used to train side by side, or crash each other's best-checkpoint writes.
  The kernel releases the lock when the process ends, however it ends, so a
  killed run never leaves the directory locked. (``flock`` may not lock
  across the hosts of a network file system.)

  Raises:
    RunDirectoryBusyError: naming the directory and, for a training
      process, its pid and host.
    RuntimeError: an exclusive request inside this process's shared hold.
  """
  os.makedirs(run_dir, exist_ok=True)
  key = os.path.realpath(run_dir)
  held = _HELD.get(key)
  if held is not None:
    if exclusive and not held[1]:
      raise RuntimeError(f"{run_dir}: this process holds the shared "
                         "(evaluation) lock; training needs it alone")
    held[2] += 1
    try:
      yield
    finally:
      held[2] -= 1
    return
  path = os.path.join(run_dir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode(0o666))
    writable = True
  except PermissionError:  # another user's (flock needs no write access)
    fd, writable = os.open(path, os.O_RDONLY), False
  try:
    try:
      fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                  | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      raise RunDirectoryBusyError(
          f"{run_dir} is in use by another process ("
          + (f"training: pid {holder}" if holder else "evaluating")
          + "); wait for it to finish, or use another run directory"
      ) from None
    # No training process holds it now: a killed one's pid goes (unless
    # the file is another user's, opened read-only).
    if writable:
      os.ftruncate(fd, 0)
      if exclusive:
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(),
                  0)
    _HELD[key] = [fd, exclusive, 1]
    try:
      yield
    finally:
      del _HELD[key]
      if exclusive and writable:
        os.ftruncate(fd, 0)
  finally:
    os.close(fd)


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
  # (An empty one was made for a replacement killed before it moved
  # anything there.)
  asides = sorted((a for a in glob.glob(os.path.join(
      glob.escape(parent), glob.escape(prefix) + "*")) if os.listdir(a)),
                  key=os.path.getmtime)
  if not asides and os.path.isdir(dst + ".old"):
    asides = [dst + ".old"]  # left by a run before 2026-11-24
  if asides:
    try:
      os.replace(asides[-1], dst)
    except FileNotFoundError:
      pass  # another process (a second evaluation) put it back first
