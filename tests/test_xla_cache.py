"""The on-disk XLA cache (``maml_tf.xla_cache``): a directory per machine,
per-process staging, and only whole entries shared."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from maml_tf import xla_cache
from tests.conftest import run_python

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse avx2 avx512f
bogomips\t: 5200.00

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
cpu MHz\t\t: 2599.998
flags\t\t: fpu sse avx2 avx512f
"""


def key(**changes):
  args = dict(tensorflow_version="2.21.0", xla_flags="",
              cpu=xla_cache.cpu_description(CPUINFO), gpus=[],
              visible_gpus=None)
  return xla_cache.machine_key(**{**args, **changes})


def test_the_cpu_is_described_by_what_compiled_code_depends_on():
  cpu = xla_cache.cpu_description(CPUINFO)
  assert cpu == {"vendor_id": "AuthenticAMD", "cpu family": "25",
                 "model": "17", "model name": "AMD EPYC",
                 "flags": "avx2 avx512f fpu sse"}
  # The clock and the flags' order change nothing.
  other_boot = CPUINFO.replace("2600.000", "3000.1").replace(
      "fpu sse avx2", "avx2 fpu sse")
  assert xla_cache.cpu_description(other_boot) == cpu
  assert xla_cache.cpu_description() != {}  # this machine's, whatever it is


def test_the_key_changes_with_everything_a_program_depends_on():
  base = key()
  assert base.startswith("tf2.21.0-") and key() == base
  no_avx512 = xla_cache.cpu_description(CPUINFO.replace(" avx512f", ""))
  others = [key(cpu=no_avx512), key(tensorflow_version="2.22.0"),
            key(xla_flags="--xla_cpu_use_fusion_emitters=false"),
            key(gpus=["NVIDIA A100-SXM4-40GB"])]
  assert len({base, *others}) == 1 + len(others)
  # Spacing in XLA_FLAGS is not a setting.
  assert key(xla_flags=" --a=1   --b=2 ") == key(xla_flags="--a=1 --b=2")
  # CUDA_VISIBLE_DEVICES picks the GPU model only on a machine that mixes
  # models; elsewhere it would only split one cache in many.
  same = ["NVIDIA A100", "NVIDIA A100"]
  assert key(gpus=same, visible_gpus="0") == key(gpus=same, visible_gpus="1")
  mixed = ["NVIDIA A100", "NVIDIA V100"]
  assert key(gpus=mixed, visible_gpus="0") != key(gpus=mixed, visible_gpus="1")


def test_gpu_models_come_from_the_driver_without_tensorflow(tmp_path):
  for index, model in enumerate(["NVIDIA A100-SXM4-40GB", "Tesla V100"]):
    (tmp_path / f"0000:0{index}:00.0").mkdir()
    (tmp_path / f"0000:0{index}:00.0" / "information").write_text(
        f"Model: \t\t {model}\nIRQ:   42\n")
  assert xla_cache.gpu_models(str(tmp_path)) == ["NVIDIA A100-SXM4-40GB",
                                                 "Tesla V100"]
  assert xla_cache.gpu_models(str(tmp_path / "absent")) == []


@pytest.fixture(autouse=True)
def environment(monkeypatch):
  """``configure`` sets ``TF_XLA_FLAGS``: recorded first, so every test
  restores the suite's own."""
  monkeypatch.setenv("TF_XLA_FLAGS", "")
  monkeypatch.setenv("XLA_FLAGS", "")


@pytest.fixture
def at_exit(monkeypatch):
  """The functions ``configure`` registers to run at exit."""
  calls = []
  monkeypatch.setattr(xla_cache.atexit, "register",
                      lambda f, *args: calls.append(lambda: f(*args)))
  return calls


def entry(size: int = 300) -> bytes:
  """A serialized cache entry's layout: key (1), HLO (2), executable (3),
  each length-delimited."""
  def field(number, payload):
    return bytes([number << 3 | 2]) + _varint(len(payload)) + payload
  return (field(1, b"k" * 20) + field(2, b"h" * size) +
          field(3, b"x" * 2 * size))


def _varint(n: int) -> bytes:
  out = b""
  while True:
    out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
    n >>= 7
    if not n:
      return out


def dead_pid() -> int:
  """The id of a process that has ended (a staging directory's dead owner)."""
  return int(subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"],
      capture_output=True, text=True, check=True).stdout)


def test_only_a_whole_entry_is_complete(tmp_path):
  data = entry()
  path = tmp_path / "e.pb"
  path.write_bytes(data)
  assert xla_cache.is_complete(str(path))
  # Every prefix, as a killed writer leaves it, including the one that ends
  # after the HLO (no executable).
  for size in [0, 1, 2, 21, 22, 23, 200, len(data) - 601, len(data) - 1]:
    path.write_bytes(data[:size])
    assert not xla_cache.is_complete(str(path)), size
  path.write_bytes(data + b"\x00")
  assert not xla_cache.is_complete(str(path))
  assert not xla_cache.is_complete(str(tmp_path / "absent.pb"))


def test_configure_stages_and_publishes_whole_entries(tmp_path, monkeypatch,
                                                      at_exit):
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_cpu_global_jit")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
  root = tmp_path / "cache"
  shared = xla_cache.configure(str(root))
  assert os.path.dirname(shared) == str(root) and os.path.isdir(shared)
  old = pathlib.Path(shared) / "old.pb"
  old.write_bytes(entry())
  # A second process finds the shared entries through links in its own
  # staging directory, where TensorFlow writes.
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_cpu_global_jit")
  assert xla_cache.configure(str(root)) == shared
  flags = os.environ["TF_XLA_FLAGS"].split()
  assert flags[0] == "--tf_xla_cpu_global_jit"
  staging = flags[1].partition("=")[2]
  assert os.path.dirname(staging) == shared
  assert os.path.realpath(os.path.join(staging, "old.pb")) == str(old)
  (pathlib.Path(staging) / "new.pb").write_bytes(entry(500))
  (pathlib.Path(staging) / "cut.pb").write_bytes(entry(500)[:-1])
  for finish in at_exit:
    finish()
  # At exit the whole new entry is renamed into the shared directory; the
  # truncated one is dropped with the staging directories.
  assert sorted(os.listdir(shared)) == ["new.pb", "old.pb"]
  assert xla_cache.is_complete(os.path.join(shared, "new.pb"))
  # Other XLA_FLAGS, another shared directory.
  monkeypatch.setenv("TF_XLA_FLAGS", "")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
  other = xla_cache.configure(str(root))
  assert os.path.dirname(other) == str(root) and other != shared


def test_other_processes_whole_entries_are_published(tmp_path, monkeypatch,
                                                     at_exit):
  shared = xla_cache.configure(str(tmp_path))
  dead = dead_pid()
  host = socket.gethostname()
  killed = os.path.join(shared, f".staging-{host}-pid{dead}-abc")
  elsewhere = os.path.join(shared, f".staging-{host}x-pid{dead}-abc")
  alive = os.path.join(shared, f".staging-{host}-pid{os.getpid()}-abc")
  for path in (killed, elsewhere, alive):
    os.mkdir(path)
    with open(os.path.join(path, os.path.basename(path) + ".pb"), "wb") as f:
      f.write(entry())
  with open(os.path.join(killed, "cut.pb"), "wb") as f:
    f.write(entry()[:100])  # killed while TensorFlow wrote it
  with open(os.path.join(alive, "writing.pb"), "wb") as f:
    f.write(entry()[:-1])  # being written
  monkeypatch.setenv("TF_XLA_FLAGS", "")
  xla_cache.configure(str(tmp_path))
  # Every whole entry is shared, from a live process's directory too (a run
  # started beside a long one gets its programs); a partial one never.
  assert sorted(n for n in os.listdir(shared) if n.endswith(".pb")) == sorted(
      os.path.basename(p) + ".pb" for p in (killed, elsewhere, alive))
  # Only this host's dead process's directory is removed.
  assert not os.path.exists(killed)
  assert os.listdir(elsewhere) == []
  assert os.listdir(alive) == ["writing.pb"]


def test_configure_keeps_a_cache_directory_the_user_chose(tmp_path,
                                                          monkeypatch,
                                                          at_exit):
  flags = f"{xla_cache.CACHE_FLAG}=/their/cache --tf_xla_cpu_global_jit"
  monkeypatch.setenv("TF_XLA_FLAGS", flags)
  assert xla_cache.configure(str(tmp_path / "cache")) is None
  assert os.environ["TF_XLA_FLAGS"] == flags
  assert not (tmp_path / "cache").exists()
  # The benchmark replaces it with its own, keeping the other flags.
  assert xla_cache.with_cache_directory(flags, "/fresh") == (
      f"--tf_xla_cpu_global_jit {xla_cache.CACHE_FLAG}=/fresh")


def test_configure_fails_on_a_root_that_is_a_file(tmp_path, monkeypatch,
                                                  at_exit):
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError):
    xla_cache.configure(str(tmp_path / "file"))
  assert os.environ["TF_XLA_FLAGS"] == ""


_COMPILE = """
import sys
from maml_tf import xla_cache
xla_cache.configure(sys.argv[1])
import tensorflow as tf
f = tf.function(lambda x: tf.reduce_sum(tf.sin(x) * 3.0), jit_compile=True)
print(float(f(tf.ones([7]))))
"""


def test_a_killed_writers_partial_entry_is_never_read(tmp_path):
  """With TensorFlow: a truncated entry used to fail every later first call
  of its program ("Read less bytes than requested")."""
  def compile_once():
    proc = run_python(["-c", _COMPILE, str(tmp_path)], TF_XLA_FLAGS="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  value = compile_once()
  (shared,) = tmp_path.iterdir()
  (path,) = shared.glob("*.pb")
  whole = path.read_bytes()
  assert xla_cache.is_complete(str(path))
  # As a process killed while TensorFlow wrote the entry leaves it.
  path.unlink()
  staging = shared / f".staging-{socket.gethostname()}-pid{dead_pid()}-x"
  staging.mkdir()
  (staging / path.name).write_bytes(whole[:len(whole) // 2])
  assert compile_once() == value  # compiled again, not read
  assert xla_cache.is_complete(str(path)) and not staging.exists()


def test_every_public_name_of_the_package_resolves():
  """The package docstring lists ``xla_cache``; it was not exported."""
  import maml_tf
  for name in maml_tf.__all__:
    assert getattr(maml_tf, name) is not None, name
  assert maml_tf.xla_cache.configure is xla_cache.configure
