"""Repository rules: CI runs the README's command; dependencies point one way;
flags live only in runner.py; library code logs instead of printing."""

import ast
import math
import os
import pathlib
import subprocess
import sys

import pytest

import maml_tf

from tests.conftest import REPO

LIBRARIES = ("maml_tf", "leo", "data_prep")


def python_files(package):
  return sorted((REPO / package).rglob("*.py"))


def imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split(".")[0])
  return names


def test_ci_runs_exactly_the_readme_test_command():
  ci_lines = [l for l in (REPO / ".ci" / "run").read_text().splitlines()
              if "pytest" in l and not l.startswith("#")]
  assert len(ci_lines) == 1
  assert ci_lines[0].strip() in (REPO / "README.md").read_text()


def test_dependencies_point_one_way():
  for path in python_files("maml_tf"):
    assert not imports(path) & {"leo", "runner", "data_prep", "benchmarks"}, path
  for path in python_files("leo") + python_files("data_prep"):
    assert "runner" not in imports(path) and "benchmarks" not in imports(path)
  for path in python_files("data_prep"):
    assert "leo" not in imports(path) or path.name.startswith("leo"), path


def test_flags_are_defined_only_in_runner():
  for package in LIBRARIES + ("benchmarks",):
    for path in python_files(package):
      text = path.read_text()
      assert "flags.DEFINE" not in text and "FLAGS." not in text, path


def test_library_code_does_not_print():
  for package in ("maml_tf", "leo"):
    for path in python_files(package):
      tree = ast.parse(path.read_text())
      calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
               and getattr(n.func, "id", None) == "print"]
      assert not calls, f"{path}: use absl.logging"


def run_python(code: str, variable: str, value: str | None) -> str:
  """Stdout of ``python -c code`` in a fresh process, with the environment
  variable ``variable`` set to ``value`` (None: unset)."""
  env = {k: v for k, v in os.environ.items() if k != variable}
  if value is not None:
    env[variable] = value
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("entry", ["maml_tf", "leo", "runner",
                                   "benchmarks.__main__"])
@pytest.mark.parametrize("variable, ours, theirs", [
    # TF 2.21's oneDNN einsum corrupts the heap now and then.
    ("TF_ENABLE_ONEDNN_OPTS", "0", "1"),
    # XLA's per-call temporaries are reused instead of page-faulted anew.
    ("TF_CPU_ALLOCATOR_USE_BFC", "true", "false"),
    # A GPU's memory is taken as needed, not all of it at the first op.
    ("TF_FORCE_GPU_ALLOW_GROWTH", "true", "false"),
])
def test_entry_points_set_tensorflow_variables_before_it_loads(
    entry, variable, ours, theirs):
  # README, Installing: TF reads both when it starts, so they must be set
  # before it is imported, and a user's own value must stay.
  code = (f"import {entry}, os, sys; print('tensorflow' in sys.modules, "
          f"os.environ.get({variable!r}))")
  for preset, expected in ((None, ours), (theirs, theirs)):
    out = run_python(code, variable, preset)
    assert out.split() == ["False", expected], out


@pytest.mark.parametrize("enabled, preset, expected", [
    (False, None, "--xla_cpu_use_fusion_emitters=false"),
    (True, "--xla_cpu_enable_fast_min_max=false",
     "--xla_cpu_enable_fast_min_max=false --xla_cpu_use_fusion_emitters=true"),
    (False, "--xla_cpu_use_fusion_emitters=true",
     "--xla_cpu_use_fusion_emitters=true"),
])
def test_xla_cpu_emitters_are_chosen_in_xla_flags(enabled, preset, expected):
  # README, Using runner.py: importing maml_tf leaves XLA_FLAGS alone; the
  # choice joins a user's other flags, does not override a user's own value,
  # and the XLA it runs on accepts it (XLA aborts on an unknown flag, so the
  # compile below fails if a TensorFlow upgrade drops it).
  code = f"""if True:
    import os, maml_tf
    imported = os.environ.get("XLA_FLAGS")
    maml_tf.use_xla_cpu_fusion_emitters({enabled})
    import tensorflow as tf
    f = tf.function(lambda x: tf.reduce_sum(tf.sin(x) * x), jit_compile=True)
    print(float(f(tf.range(4.0))), imported == {preset!r},
          os.environ["XLA_FLAGS"])
  """
  value, unchanged, flags = run_python(code, "XLA_FLAGS", preset).split(" ", 2)
  assert unchanged == "True" and flags.strip() == expected
  assert abs(float(value) - sum(math.sin(x) * x for x in range(4))) < 1e-5


def test_xla_temporaries_are_reused_with_the_bfc_allocator():
  # The effect behind TF_CPU_ALLOCATOR_USE_BFC (README, Performance): with
  # the default allocator every call of an XLA program page-faults its large
  # temporaries in afresh; with BFC, which maml_tf turns on, it reuses them.
  code = """if True:
    import resource, maml_tf, tensorflow as tf
    f = tf.function(lambda x: tf.reduce_sum(tf.tile(x, [64, 1]) * 2.0),
                    jit_compile=True)
    x = tf.ones([4096, 256])  # the tile is a 256 MB temporary
    f(x).numpy()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      f(x).numpy()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
  """
  faults = {preset: float(run_python(code, "TF_CPU_ALLOCATOR_USE_BFC",
                                     preset).split()[-1])
            for preset in (None, "false")}
  # 256 MB is 65,536 pages of 4 KB.
  assert faults[None] < 1000 < 30000 < faults["false"], faults


def test_gpus_the_driver_lists_but_tensorflow_cannot_use(tmp_path,
                                                          monkeypatch):
  """runner.py warns when the NVIDIA driver lists GPUs that TensorFlow does
  not see (a CPU-only wheel; missing CUDA libraries): the run uses the CPU."""
  import tensorflow as tf
  for gpu in ("0000:01:00.0", "0000:02:00.0"):
    (tmp_path / gpu).mkdir()
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert maml_tf.gpus_tensorflow_cannot_use(str(tmp_path)) == 2
  assert maml_tf.gpus_tensorflow_cannot_use(str(tmp_path / "none")) == 0
  for hidden in ("", "-1"):  # on purpose
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert maml_tf.gpus_tensorflow_cannot_use(str(tmp_path)) == 0
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  monkeypatch.setattr(tf.config, "list_logical_devices",
                      lambda kind=None: ["/device:GPU:0"])
  assert maml_tf.gpus_tensorflow_cannot_use(str(tmp_path)) == 0
