"""The benchmark command and its FLOP count (the figures themselves are
measured by ``python -m benchmarks``, never asserted in tests)."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from benchmarks import measure
from tests.conftest import REPO


def test_flops_are_counted_from_the_compiled_program():
  # Hand counts: 2 * outputs * contracted size for each dot and convolution.
  def f(a, b, x, w, images, kernel):
    return (tf.reduce_sum(a @ b) +
            tf.reduce_sum(tf.einsum("tbk,tkf->tbf", x, w)) +
            tf.reduce_sum(tf.nn.conv2d(images, kernel, 1, "SAME")))
  args = [tf.ones([8, 16]), tf.ones([16, 12]), tf.ones([3, 5, 7]),
          tf.ones([3, 7, 6]), tf.ones([2, 6, 6, 3]), tf.ones([3, 3, 3, 4])]
  expected = (2 * 8 * 12 * 16 + 2 * 3 * 5 * 6 * 7 +
              2 * (2 * 6 * 6 * 4) * (3 * 3 * 3))
  fn = tf.function(f, jit_compile=True)
  assert measure.function_flops(fn, *args) == pytest.approx(expected)


def test_a_loop_body_counts_once_per_trip():
  """The training loop's meta-steps per call and its chunks of tasks are
  while loops: their bodies' FLOPs count as often as they run (a dot that
  depends on the loop's state, so that XLA cannot hoist it)."""
  def f(x, w):
    return tf.while_loop(lambda i, _: i < 3,
                         lambda i, y: (i + 1, tf.tanh(y @ w)), (0, x))[1]
  fn = tf.function(f, jit_compile=True)
  flops = measure.function_flops(fn, tf.ones([8, 16]), tf.ones([16, 16]))
  assert flops == 3 * 2 * 8 * 16 * 16
  # Nested: 2 trips of an outer loop around it.
  nested = tf.function(
      lambda x, w: tf.while_loop(lambda j, _: j < 2,
                                 lambda j, y: (j + 1, f(y, w)), (0, x))[1],
      jit_compile=True)
  assert measure.function_flops(nested, tf.ones([8, 16]),
                                tf.ones([16, 16])) == 2 * flops


def test_chunks_of_tasks_count_as_all_tasks_at_once():
  """The training step's chunks (``training.chunked_gradients``): XLA must
  know their loop's trip count, or the count would be one chunk's."""
  from maml_tf import training
  from maml_tf.tasks import TaskBatch
  w = tf.ones([16, 16])

  def compute(batch):
    return tf.reduce_mean(tf.tanh(tf.einsum("tbi,io->tbo", batch.support_x,
                                            w)))
  def chunked(tasks_per_chunk):
    return tf.function(
        lambda b: training.chunked_gradients(compute, b, tasks_per_chunk),
        jit_compile=True)

  x = tf.ones([4, 8, 16])
  batch = TaskBatch(x, tf.zeros([4, 8]), x, tf.zeros([4, 8]))
  flops = [measure.function_flops(chunked(c), batch) for c in (1, 2)]
  assert flops == [2 * 4 * 8 * 16 * 16] * 2


def test_a_sum_of_outer_products_counts_as_the_matmul_it_replaces():
  """task_matmul's weight gradients are fused sums of outer products."""
  x, d = tf.ones([3, 5, 7]), tf.ones([3, 5, 6])
  fused = tf.function(
      lambda x, d: tf.reduce_sum(x[:, :, :, None] * d[:, :, None, :], axis=1),
      jit_compile=True)
  dot = tf.function(lambda x, d: tf.einsum("tbi,tbo->tio", x, d),
                    jit_compile=True)
  assert measure.function_flops(fused, x, d) == 2 * 3 * 5 * 7 * 6
  assert measure.function_flops(dot, x, d) == 2 * 3 * 5 * 7 * 6
  # A sum of a product with one broadcast (batch norm's, say) is not counted.
  scaled = tf.function(lambda x, d: tf.reduce_sum(x * d[:, :, :1], axis=1),
                       jit_compile=True)
  assert measure.function_flops(scaled, x, d) == 0


def test_benchmark_command_writes_its_table_as_json(tmp_path):
  out = tmp_path / "bench.json"
  temporary = tmp_path / "tmp"
  temporary.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks", "--workloads", "sinusoid",
       "--algorithms", "maml", "--xla", "on", "--blocks", "2",
       "--block_seconds", "0.2", "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**{k: v for k, v in os.environ.items()
              if k not in ("XLA_FLAGS", "TF_NUM_INTRAOP_THREADS")},
           "MALLOC_ARENA_MAX": "4", "TMPDIR": str(temporary)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not list(temporary.iterdir())  # its run and cache directories
  result = json.loads(out.read_text())
  (row,) = result["rows"]
  assert row["workload"] == "sinusoid" and row["algorithm"] == "maml"
  assert row["steps_per_s"] > 0 and len(row["block_rates"]) == 2
  assert row["steps_per_call"] == 100 and row["compile_s"] > 0
  # A second process loaded the program from the XLA cache the first wrote
  # (it wrote no entry of its own), and it computes the same first loss.
  assert row["compile_cached_s"] > 0 and row["cache_hit"] is True
  assert row["cached_first_loss"] == row["first_loss"]
  assert row["intra_op_threads"] == 1  # as runner.py runs the sinusoid
  assert row["tasks_per_chunk"] == 25  # all at once, as training does
  assert row["xla_flags"] == "--xla_cpu_use_fusion_emitters=true"  # as well
  assert 0 < row["gflop_per_step"] < 1 and result["peak_matmul_gflops"] > 0
  assert result["environment"]["allow_tf32"] is False
  assert result["environment"]["TF_CPU_ALLOCATOR_USE_BFC"] == "true"
  assert result["environment"]["MALLOC_ARENA_MAX"] == "4"
  # GPU memory and models, recorded on a GPU host (this suite hides GPUs).
  assert row["peak_gpu_mb"] is None and result["machine"]["gpus"] == []
  assert "sinusoid      maml" in proc.stdout


def test_report_renders_the_readme_table():
  from benchmarks import report
  row = dict(workload="omniglot", algorithm="maml", xla=True,
             precision="float32", steps_per_call=1, steps_per_s=2.0,
             ms_per_step=500.0, compile_s=12.34, peak_rss_mb=1536.0,
             input_ms_per_step=8.0, gflop_per_step=10.0)
  off = dict(row, xla=False, gflop_per_step=None, steps_per_s=0.5)
  result = dict(date="2026-11-22T00:00:00", peak_matmul_gflops=100.0,
                machine=dict(processor="cpu", cpus=2, python="3.11"),
                rows=[row, off])
  row["compile_cached_s"] = 4.56
  lines = report.markdown_table([result]).splitlines()
  # 2 steps/s x 10 GFLOP = 20 GFLOP/s = 20% of a 100 GFLOP/s peak; the
  # XLA-off row takes the FLOP count of the XLA row (the same maths), and has
  # no cached first call.
  assert lines[2] == ("| omniglot | maml | on | float32 | 2.00 | 500.00 | 12.3 "
                      "| 4.6 | 1.50 | 8.00 | 10 | 20.0 | 20.0 |")
  assert "| 0.50 | 500.00 | 12.3 | n/a | 1.50 |" in lines[3]
  assert lines[3].endswith("| 10 | 5.0 | 5.0 |")
  sine = dict(row, workload="sinusoid", steps_per_call=100, intra_op_threads=1)
  assert report.markdown_table([dict(result, rows=[sine])]).splitlines()[2] \
      .startswith("| sinusoid | maml (100/call, 1 thread) | on |")
  chunks = dict(row, meta_batch_size=32, tasks_per_chunk=8)
  assert report.markdown_table([dict(result, rows=[chunks])]).splitlines()[2] \
      .startswith("| omniglot | maml (chunks of 8) | on |")


def test_console_table_notes_cache_misses_and_differing_losses():
  """A float16 row whose first step overflowed (a NaN first loss), run with
  --no-cached_first_call, used to end the whole benchmark in a KeyError
  before any result was written."""
  from benchmarks import __main__ as bench
  row = dict(workload="omniglot", algorithm="maml", xla=True,
             precision="float16", steps_per_call=1, steps_per_s=2.0,
             ms_per_step=500.0, compile_s=12.3, peak_rss_mb=1536.0,
             input_ms_per_step=8.0, gflop_per_step=10.0,
             first_loss=float("nan"))

  def notes(**changes):
    return bench._format_table([dict(row, **changes)], 100.0).splitlines()[3:]

  assert notes() == []
  assert notes(cached_first_loss=float("nan"), cache_hit=True) == []
  assert "differs from" in notes(first_loss=1.5, cached_first_loss=1.25)[0]
  assert "did not find the program" in notes(
      first_loss=1.5, cached_first_loss=1.5, cache_hit=False)[0]


def test_report_names_a_file_that_is_not_a_result(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('{"rows": []}')
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "--report",
                         str(bad)], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode != 0
  assert f"--report: {bad} is not a benchmark result" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--algorithms", "mamI"], "--algorithms: unknown value 'mamI'"),
    (["--workloads", "omniglot", "--algorithms", "leo"],
     "--algorithms=leo: none runs on --workloads omniglot"),
    (["--omniglot_cache", "/nonexistent"],
     "--omniglot_cache=/nonexistent: not a directory"),
    (["--tasks_per_chunk", "-1"], "--tasks_per_chunk=-1: expected a divisor"),
])
def test_bad_options_are_named_before_anything_runs(tmp_path, args, message):
  """(--xla and --precisions are checked by the same loop as --algorithms.)
  LEO on Omniglot used to be tried when no MAML-family algorithm applied."""
  proc = subprocess.run([sys.executable, "-m", "benchmarks", *args,
                         "--out", str(tmp_path / "bench.json")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "peak float32 matmul" not in proc.stdout  # nothing was measured
  assert not (tmp_path / "bench.json").exists()
