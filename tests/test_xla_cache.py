"""The on-disk XLA cache's directory per machine (``maml_tf.xla_cache``)."""

import os

import pytest

from maml_tf import xla_cache

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


def test_configure_sets_this_machines_directory(tmp_path, monkeypatch):
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_cpu_global_jit")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
  path = xla_cache.configure(str(tmp_path / "cache"))
  assert os.path.isdir(path)
  assert os.path.dirname(path) == str(tmp_path / "cache")
  assert os.environ["TF_XLA_FLAGS"] == (
      f"--tf_xla_cpu_global_jit {xla_cache.CACHE_FLAG}={path}")
  # Other XLA_FLAGS, another directory.
  monkeypatch.setenv("TF_XLA_FLAGS", "")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
  other = xla_cache.configure(str(tmp_path / "cache"))
  assert os.path.dirname(other) == os.path.dirname(path) and other != path


def test_configure_keeps_a_cache_directory_the_user_chose(tmp_path,
                                                          monkeypatch):
  flags = f"{xla_cache.CACHE_FLAG}=/their/cache --tf_xla_cpu_global_jit"
  monkeypatch.setenv("TF_XLA_FLAGS", flags)
  assert xla_cache.configure(str(tmp_path / "cache")) is None
  assert os.environ["TF_XLA_FLAGS"] == flags
  assert not (tmp_path / "cache").exists()
  # The benchmark replaces it with its own, keeping the other flags.
  assert xla_cache.with_cache_directory(flags, "/fresh") == (
      f"--tf_xla_cpu_global_jit {xla_cache.CACHE_FLAG}=/fresh")


def test_configure_fails_on_a_root_that_is_a_file(tmp_path, monkeypatch):
  monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
  (tmp_path / "file").write_text("")
  with pytest.raises(OSError):
    xla_cache.configure(str(tmp_path / "file"))
  assert "TF_XLA_FLAGS" not in os.environ
