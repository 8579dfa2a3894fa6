"""TensorFlow's on-disk XLA compilation cache, one directory per machine.

TensorFlow 2.21 saves every compiled XLA program to
``--tf_xla_persistent_cache_directory`` (in ``TF_XLA_FLAGS``) and loads it
back in a later process. It matches programs by function signature and HLO
only. Two things it does not check:

* the machine: XLA:CPU loads a program compiled for another CPU after only
  logging an error ("Machine type used for XLA:CPU compilation doesn't match
  the machine type for execution ... could lead to ... SIGILL"), so a cache
  in a home directory shared by different cluster nodes could crash them;
* ``XLA_FLAGS``: a program compiled with one choice of kernel emitters
  (``runner.py --xla_cpu_emitters``) was loaded for the other.

So the cache goes in a subdirectory of the user's cache directory named by
the TensorFlow version and a digest of the CPU, the GPUs and ``XLA_FLAGS``.

TensorFlow also writes each entry in place, not through a rename: a process
killed while writing, or a reader racing a writer (two runs of one
configuration), leaves or reads a truncated entry, and every later first
call of that program then fails ("Read less bytes than requested"). So each
process points TensorFlow at a private staging directory holding links to
the shared entries, and moves its complete new entries into the shared
directory with a rename when it exits; a later process does the same for
every staging directory when it starts (and removes those of processes that
died).

Nothing here imports TensorFlow: the flag must be set before TensorFlow
first compiles, and is read once per process.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import tempfile

CACHE_FLAG = "--tf_xla_persistent_cache_directory"
_FLAG_PATTERN = re.compile(re.escape(CACHE_FLAG) + r"=\S*")
# /proc/cpuinfo fields that decide which instructions a program may use
# (not "cpu MHz" or "bogomips", which change from boot to boot).
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags",
               "Features", "CPU implementer", "CPU part")


def cpu_description(cpuinfo: str | None = None) -> dict[str, str]:
  """The CPU fields that a compiled program depends on.

  Args:
    cpuinfo: the text of ``/proc/cpuinfo``; None reads it (on other systems
      than Linux, ``platform`` names the CPU instead).

  Returns:
    Field name to value, from the first processor's block.
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return {"machine": platform.machine(), "processor": platform.processor()}
  fields = {}
  for line in cpuinfo.split("\n\n")[0].splitlines():
    name, _, value = line.partition(":")
    name = name.strip()
    if name in _CPU_FIELDS:
      # The flags' order is the kernel's; sorting keeps the key stable.
      fields[name] = (" ".join(sorted(value.split())) if name in (
          "flags", "Features") else value.strip())
  return fields


def gpu_models(root: str = "/proc/driver/nvidia/gpus") -> list[str]:
  """The NVIDIA GPU models this machine's driver reports, without importing
  TensorFlow (which would fix its GPU settings before ``runner.py`` makes
  them); empty without the driver."""
  models = []
  for path in sorted(glob.glob(os.path.join(root, "*", "information"))):
    try:
      with open(path) as f:
        for line in f:
          if line.startswith("Model:"):
            models.append(line.partition(":")[2].strip())
    except OSError:
      pass
  return models


def machine_key(tensorflow_version: str | None, xla_flags: str,
                cpu: dict[str, str], gpus: list[str],
                visible_gpus: str | None) -> str:
  """The cache subdirectory's name for a machine and its XLA settings.

  Args:
    tensorflow_version: e.g. "2.21.0" (None: not installed as a wheel).
    xla_flags: the process's ``XLA_FLAGS``.
    cpu: ``cpu_description()``.
    gpus: ``gpu_models()``.
    visible_gpus: ``CUDA_VISIBLE_DEVICES``; it decides which model a program
      is compiled for only when the machine mixes models, so it is part of
      the key only then.

  Returns:
    ``tf<version>-<16 hex digits>``.
  """
  description = {"xla_flags": " ".join(xla_flags.split()), "cpu": cpu,
                 "gpus": gpus}
  if len(set(gpus)) > 1:
    description["visible_gpus"] = visible_gpus
  digest = hashlib.sha256(
      json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
  return f"tf{tensorflow_version or 'unknown'}-{digest}"


def with_cache_directory(tf_xla_flags: str, directory: str) -> str:
  """``TF_XLA_FLAGS`` with its cache directory set to ``directory`` (any
  other flags kept)."""
  others = _FLAG_PATTERN.sub("", tf_xla_flags).split()
  return " ".join(others + [f"{CACHE_FLAG}={directory}"])


def is_complete(path: str) -> bool:
  """Whether ``path`` holds a whole serialized cache entry.

  An entry (``tensorflow.XlaSerializedCacheEntry``) is a protobuf message
  whose fields are its key (1), HLO (2) and executable (3), serialized in
  that order. Any prefix of one either ends inside a field or lacks the
  executable, so walking the fields is enough to tell it from the whole.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError:
    return False
  position, fields = 0, set()
  while position < len(data):
    tag, position = _varint(data, position)
    if tag is None or tag & 7 != 2:  # every field is length-delimited
      return False
    length, position = _varint(data, position)
    if length is None or position + length > len(data):
      return False
    fields.add(tag >> 3)
    position += length
  return {1, 2, 3} <= fields


def _varint(data: bytes, position: int) -> tuple[int | None, int]:
  value = shift = 0
  while position < len(data) and shift < 64:
    byte = data[position]
    position += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, position
    shift += 7
  return None, position


_STAGING_PREFIX = ".staging-"


def publish(staging: str, shared: str) -> list[str]:
  """Moves the complete new entries of ``staging`` into ``shared``.

  Each move is a rename within one file system, so readers of ``shared``
  see an entry whole or not at all. Incomplete entries stay behind.

  Returns:
    The names of the entries moved.
  """
  moved = []
  for name in sorted(os.listdir(staging)):
    path = os.path.join(staging, name)
    if (name.endswith(".pb") and not os.path.islink(path)
        and is_complete(path)):
      os.replace(path, os.path.join(shared, name))
      moved.append(name)
  return moved


def _staging_owner_is_dead(name: str) -> bool:
  """Whether the process that made staging directory ``name`` (on this
  host) has ended; False for other hosts' directories, which are never
  removed (their owners cannot be checked from here)."""
  host, _, rest = name[len(_STAGING_PREFIX):].rpartition("-pid")
  pid = rest.split("-")[0]
  if host != socket.gethostname() or not pid.isdigit():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except OSError:  # alive, but another user's
    return False
  return False


def _recover(shared: str) -> None:
  """Publishes the complete entries of every staging directory, and removes
  the directories of this host's dead processes.

  A complete entry is safe to move even from a live process: TensorFlow
  writes an entry once, and it already holds the program in memory. So a run
  started beside a long one finds the programs that one has compiled so far.
  """
  for name in os.listdir(shared):
    path = os.path.join(shared, name)
    if name.startswith(_STAGING_PREFIX) and os.path.isdir(path):
      try:
        publish(path, shared)
      except OSError:  # its owner removed it meanwhile
        continue
      if _staging_owner_is_dead(name):
        shutil.rmtree(path, ignore_errors=True)


def _finish(staging: str, shared: str) -> None:
  """At exit: publish the new entries, then remove the staging directory."""
  try:
    publish(staging, shared)
  except OSError:  # e.g. the directory is gone: nothing more to share
    pass
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def configure(root: str) -> str | None:
  """Points TensorFlow's XLA cache at this machine's subdirectory of
  ``root``, through ``TF_XLA_FLAGS`` and a staging directory (see the module
  docstring).

  Call it before TensorFlow compiles anything, and after ``XLA_FLAGS`` is
  final (``maml_tf.use_xla_cpu_fusion_emitters``), since the key includes
  them. New programs reach the shared directory when the process exits, or
  earlier when another process configures the same directory.

  Args:
    root: the user's cache directory (``~`` is expanded).

  Returns:
    The shared directory, or None when ``TF_XLA_FLAGS`` already names a
    cache directory (the user's choice is kept as it is).

  Raises:
    OSError: the directory cannot be created or written.
  """
  tf_xla_flags = os.environ.get("TF_XLA_FLAGS", "")
  if _FLAG_PATTERN.search(tf_xla_flags):
    return None
  from maml_tf import _tensorflow_version
  key = machine_key(_tensorflow_version(), os.environ.get("XLA_FLAGS", ""),
                    cpu_description(), gpu_models(),
                    os.environ.get("CUDA_VISIBLE_DEVICES"))
  shared = os.path.join(os.path.expanduser(root), key)
  os.makedirs(shared, exist_ok=True)
  if not os.access(shared, os.W_OK):
    raise PermissionError(f"{shared} is not writable")
  _recover(shared)
  staging = tempfile.mkdtemp(
      prefix=f"{_STAGING_PREFIX}{socket.gethostname()}-pid{os.getpid()}-",
      dir=shared)
  for name in os.listdir(shared):
    if name.endswith(".pb"):
      os.symlink(os.path.join(shared, name), os.path.join(staging, name))
  atexit.register(_finish, staging, shared)
  os.environ["TF_XLA_FLAGS"] = with_cache_directory(tf_xla_flags, staging)
  return shared
