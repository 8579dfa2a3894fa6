"""Atomic output: complete or absent, readable as ordinary files are."""

import fcntl
import os
import stat
import time

import pytest

from maml_tf import io_utils


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_permissions_of_ordinary_files(tmp_path, umask_022):
  """tempfile makes files 0600 and directories 0700: a results file or a
  dataset cache would be unreadable by the rest of a team."""
  io_utils.atomic_write(str(tmp_path / "results.json"), "{}")
  assert mode(tmp_path / "results.json") == 0o644
  directory = io_utils.make_temp_dir(".tmp-cache-", str(tmp_path))
  assert mode(directory) == 0o755


def test_failed_write_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError):
    with io_utils.atomic_path(str(tmp_path / "out.csv")) as tmp:
      with open(tmp, "w") as f:
        f.write("partial")
      raise RuntimeError("killed")
  assert not list(tmp_path.iterdir())


def test_replaced_directory_survives_a_kill_between_the_renames(tmp_path):
  best = tmp_path / "best"
  for value in ("old", "new"):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "value").write_text(value)
    io_utils.atomic_replace_dir(str(staging), str(best))
  assert (best / "value").read_text() == "new"
  assert sorted(os.listdir(tmp_path)) == ["best"]
  os.rename(best, tmp_path / ".best.replaced-x1")  # killed after 1st rename
  io_utils.recover_replaced_dir(str(best))
  assert (best / "value").read_text() == "new"
  io_utils.recover_replaced_dir(str(best))  # nothing to do
  assert sorted(os.listdir(tmp_path)) == ["best"]
  # An empty aside (a replacement killed before it moved anything) is not
  # taken for the old copy.
  os.rename(best, tmp_path / ".best.replaced-x2")
  time.sleep(0.01)
  (tmp_path / ".best.replaced-x3").mkdir()
  io_utils.recover_replaced_dir(str(best))
  assert (best / "value").read_text() == "new"
  (tmp_path / ".best.replaced-x3").rmdir()
  # The aside name of runs before 2026-11-24.
  os.rename(best, str(best) + ".old")
  io_utils.recover_replaced_dir(str(best))
  assert sorted(os.listdir(tmp_path)) == ["best"]


def test_replacing_a_directory_keeps_the_users_dot_old(tmp_path):
  """``<dst>.old`` was the aside name: replacing a data_prep --output
  deleted the user's own ``<output>.old`` (or failed when it was a file)."""
  out, theirs, stale = (tmp_path / "out", tmp_path / "out.old",
                        tmp_path / ".out.replaced-killed")
  for d in (out, theirs, stale):
    d.mkdir()
  (theirs / "IMPORTANT.txt").write_text("backup")
  staging = tmp_path / "staging"
  staging.mkdir()
  (staging / "value").write_text("new")
  io_utils.atomic_replace_dir(str(staging), str(out))
  assert (out / "value").read_text() == "new"
  assert (theirs / "IMPORTANT.txt").read_text() == "backup"
  assert sorted(os.listdir(tmp_path)) == ["out", "out.old"]  # stale removed


def test_run_directory_lock(tmp_path):
  """Exclusive to train, shared to evaluate, re-entrant in a process;
  another holder (here: another open file, as another process has) is
  named. The kernel releases a dead process's lock."""
  run_dir = str(tmp_path / "run")

  def other(exclusive, pid_line=""):
    fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    os.pwrite(fd, pid_line.encode(), 0)
    return fd

  os.makedirs(run_dir)
  fd = other(True, "4242 on elsewhere\n")
  for exclusive in (True, False):
    with pytest.raises(io_utils.RunDirectoryBusyError,
                       match=f"{run_dir} is in use by another process "
                       r"\(training: pid 4242 on elsewhere\)"):
      with io_utils.run_directory_lock(run_dir, exclusive):
        pass
  os.close(fd)  # as when that process dies
  fd = other(False)
  with io_utils.run_directory_lock(run_dir, exclusive=False):
    pass  # evaluations share it
  with pytest.raises(io_utils.RunDirectoryBusyError, match="evaluating"):
    with io_utils.run_directory_lock(run_dir, exclusive=True):
      pass
  os.close(fd)
  with io_utils.run_directory_lock(run_dir, exclusive=True):
    with io_utils.run_directory_lock(run_dir, exclusive=False):
      with io_utils.run_directory_lock(run_dir, exclusive=True):
        pass  # re-entrant
    with open(os.path.join(run_dir, ".lock")) as f:
      assert f.read().startswith(f"{os.getpid()} on ")
  with io_utils.run_directory_lock(run_dir, exclusive=False):
    with pytest.raises(RuntimeError, match="holds the shared"):
      with io_utils.run_directory_lock(run_dir, exclusive=True):
        pass


def test_files_written_together_and_a_killed_writes_leftovers(tmp_path):
  # A set whose second file fails leaves the first one as it was (written
  # one by one, the first was already replaced).
  (tmp_path / "r.csv").write_text("old")
  with pytest.raises(TypeError):
    io_utils.atomic_write_files({str(tmp_path / "r.csv"): "new",
                                 str(tmp_path / "r.json"): 3})
  assert (tmp_path / "r.csv").read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["r.csv"]
  (tmp_path / ".tmp-r.json-killed").write_text("partial")  # SIGKILL's
  io_utils.atomic_write_files({str(tmp_path / "r.csv"): "new",
                               str(tmp_path / "r.json"): b"{}"})
  assert (tmp_path / "r.csv").read_text() == "new"
  io_utils.remove_stale_temporary_files(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.json"]
