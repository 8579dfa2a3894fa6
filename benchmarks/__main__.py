"""Meta-learning throughput benchmarks: ``python -m benchmarks``.

For every workload x algorithm x XLA setting, a fresh process builds the
learner and the real training step (meta-gradient + Adam, as the Trainer runs
it) and reports:

* meta-steps/s: the median of timed blocks (about 2 s each) after the first
  call and two warm-up calls (one for ``leo_test``), and ms per step;
* compile: the first call (tracing + XLA compilation), and the first call
  of a second process that finds the program in the on-disk XLA cache the
  first one filled (``runner.py --xla_cache_dir``; a fresh cache per
  configuration, so the first figure is always a cold compile);
* peak RSS of that process, taken before the FLOP count (which compiles
  the step a second time);
* input ms/step: the task sampler's time to produce one meta-batch
  (single-threaded; training overlaps it with compute through tf.data);
* GFLOP per step counted from XLA's optimised HLO (dots and convolutions),
  achieved GFLOP/s, and the fraction of the peak rate a large float32 matmul
  reaches on this machine in the same run.

Results are printed as a table and written as JSON; ``--report FILE...``
prints such files as the README's markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import maml_tf  # noqa: E402  (before TensorFlow: sets its environment)
from maml_tf import xla_cache  # noqa: E402


def _same_loss(a: float, b: float) -> bool:
  """Equal, or both NaN (float16's first step can overflow: a skipped step
  reports a NaN loss, and so does its cached program)."""
  return a == b or (math.isnan(a) and math.isnan(b))


def _cache_entries(directory: str) -> list[str]:
  """The programs in an on-disk XLA cache directory."""
  return sorted(f for f in os.listdir(directory) if f.endswith(".pb"))


def _run_one(spec: dict) -> dict:
  import numpy as np
  import tensorflow as tf

  from benchmarks import measure
  from benchmarks import workloads as wl
  from maml_tf import training
  from maml_tf.tasks import TaskBatch

  workload = wl.workloads(spec.get("omniglot_cache"))[spec["workload"]]
  # As runner.py --xla_cpu_emitters=auto (before the first compilation).
  maml_tf.use_xla_cpu_fusion_emitters(workload.fusion_emitters)
  # As runner.py --intra_op_threads (before TensorFlow's runtime starts).
  threads = spec.get("intra_op_threads", -1)
  if threads < 0:  # the workload's default, unless the environment sets it
    threads = (0 if "TF_NUM_INTRAOP_THREADS" in os.environ else
               workload.intra_op_threads)
  if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
  threads = tf.config.threading.get_intra_op_parallelism_threads()
  settings = {"intra_op_threads": threads,
              "xla_flags": os.environ.get("XLA_FLAGS")}
  # As runner.py --allow_tf32 (off by default): TF32 changes GPU figures only.
  tf.config.experimental.enable_tensor_float_32_execution(
      spec.get("allow_tf32", False))
  if spec.get("steps_per_call"):
    workload = dataclasses.replace(workload,
                                   steps_per_call=spec["steps_per_call"])
  learner = wl.build_learner(spec["algorithm"], workload, spec["xla"],
                             precision=spec.get("precision", "float32"))
  # Nothing is written there (no summaries, no checkpoints); removed when
  # this function returns.
  run_dir = tempfile.TemporaryDirectory(prefix="benchmark-run-")
  config = training.TrainConfig(
      run_dir=run_dir.name, num_iterations=1,
      meta_batch_size=workload.meta_batch_size,
      clip_value=workload.clip_value,
      clip_norm=workload.clip_norm, steps_per_call=workload.steps_per_call,
      # LEO takes every task at once (its learner has no default chunks).
      tasks_per_chunk=(spec.get("tasks_per_chunk") or None
                       if workload.model else None),
      log_every=workload.steps_per_call, print_every=workload.steps_per_call,
      save_every=workload.steps_per_call, val_every=0,
      jit_compile=spec["xla"], log=False, resume=False)
  trainer = training.Trainer(learner, config)
  settings["tasks_per_chunk"] = trainer.tasks_per_chunk(
      workload.meta_batch_size)
  source = workload.source()

  # Input cost: the sampler producing meta-batches (host side); evaluation
  # samples TF tensors (``tensor_batch``), as ``maml_tf.evaluation`` does.
  sample = (source.tensor_batch if workload.evaluation else source.batch)
  sample(8, workload.meta_batch_size)  # one-time set-up out of the timing
  start = time.perf_counter()
  batches = [sample(i, workload.meta_batch_size) for i in range(8)]
  input_ms = (time.perf_counter() - start) / len(batches) * 1e3

  if workload.evaluation:
    return dict(_run_evaluation(spec, workload, learner, source, batches,
                                input_ms), **settings)
  k = workload.steps_per_call
  block = TaskBatch(*(tf.constant(np.stack([batches[i % len(batches)][f]
                                            for i in range(k)]))
                      for f in range(4)))
  step = tf.constant(0, tf.int64)
  # The compiled step of step 0's phase, as training runs it (MAML++: MSL).
  fn = trainer.train_function(phase=trainer.phase(0, k))
  start = time.perf_counter()
  out = fn(block, step)
  first_value = training.finite_mean(out["loss"].numpy())
  compile_s = time.perf_counter() - start
  if spec.get("first_call_only"):
    return {"compile_s": compile_s, "first_loss": first_value}
  for _ in range(2):
    out = fn(block, step)
  out["loss"].numpy()
  rates = measure.timed_blocks(lambda: fn(block, step),
                               lambda o: o["loss"].numpy(),
                               spec["block_seconds"], spec["blocks"])
  steps_per_s = float(np.median(rates)) * k
  # Before the FLOP count, whose second XLA compile is not part of training.
  peak_rss_mb = measure.peak_rss_mb()
  flops = measure.function_flops(fn, block, step) if spec["xla"] else None
  return {
      "workload": spec["workload"], "algorithm": spec["algorithm"],
      "xla": spec["xla"], "precision": spec.get("precision", "float32"), "meta_batch_size": workload.meta_batch_size,
      "steps_per_call": k, "steps_per_s": steps_per_s,
      "ms_per_step": 1e3 / steps_per_s,
      "block_rates": [r * k for r in rates], "compile_s": compile_s,
      "first_loss": first_value, "peak_rss_mb": peak_rss_mb,
      "peak_gpu_mb": measure.peak_gpu_mb(),
      "input_ms_per_step": input_ms,
      # The count is the call's: k meta-steps (its loop's trip count).
      "gflop_per_step": None if flops is None else flops / 1e9 / k,
      **settings,
  }


def _run_evaluation(spec, workload, learner, source, batches,
                    input_ms) -> dict:
  """Test-evaluation throughput: tasks/s of ``learner.evaluate``."""
  import numpy as np
  import tensorflow as tf

  from benchmarks import measure
  from maml_tf.tasks import TaskBatch
  fn = tf.function(learner.evaluate, jit_compile=spec["xla"], autograph=False)
  batch = TaskBatch(*(tf.constant(t) for t in batches[0]))
  start = time.perf_counter()
  first_value = float(np.mean(fn(batch)["query_loss"].numpy()))
  compile_s = time.perf_counter() - start
  if spec.get("first_call_only"):
    return {"compile_s": compile_s, "first_loss": first_value}
  fn(batch)["query_accuracy"].numpy()
  rates = measure.timed_blocks(lambda: fn(batch),
                               lambda o: o["query_accuracy"].numpy(),
                               spec["block_seconds"], spec["blocks"])
  tasks_per_s = float(np.median(rates)) * workload.meta_batch_size
  # End to end, as the protocol runs: sampling on a thread beside the calls.
  from maml_tf import evaluation
  num_tasks = 30 * workload.meta_batch_size
  result = evaluation.evaluate(fn, source, num_tasks, workload.meta_batch_size,
                               start_index=100, jit_compile=None)
  peak_rss_mb = measure.peak_rss_mb()  # before the FLOP count's compile
  flops = measure.function_flops(fn, batch) if spec["xla"] else None
  return {
      "workload": spec["workload"], "algorithm": spec["algorithm"],
      "xla": spec["xla"], "precision": spec.get("precision", "float32"),
      "meta_batch_size": workload.meta_batch_size, "steps_per_call": 1,
      # one "step" = one task here
      "steps_per_s": tasks_per_s, "ms_per_step": 1e3 / tasks_per_s,
      "block_rates": [r * workload.meta_batch_size for r in rates],
      "compile_s": compile_s, "first_loss": first_value,
      "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": measure.peak_gpu_mb(),
      "input_ms_per_step": input_ms / workload.meta_batch_size,
      "gflop_per_step": (None if flops is None else
                         flops / 1e9 / workload.meta_batch_size),
      "unit": "tasks",
      "end_to_end_tasks_per_s": num_tasks / result.seconds,
  }


def _format_table(rows: list[dict], peak: float) -> str:
  header = (f"{'workload':<13} {'algorithm':<9} {'prec':<9} {'xla':<4} "
            f"{'steps/s*':>9} "
            f"{'ms/step':>9} {'compile s':>9} {'cached s':>8} {'RSS MB':>7} "
            f"{'input ms':>8} "
            f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>6}")
  lines = [header, "-" * len(header)]
  notes = "* leo_test: tasks/s, ms per task, GFLOP per task"
  for r in rows:
    if "error" in r:
      lines.append(f"{r['workload']:<13} {r['algorithm']:<9} "
                   f"{r['precision']:<9} {'on' if r['xla'] else 'off':<4} "
                   f"ERROR {r['error'][:80]}")
      continue
    gflop = r.get("gflop_per_step")
    rate = gflop * r["steps_per_s"] if gflop else None
    lines.append(
        f"{r['workload']:<13} {r['algorithm']:<9} {r['precision']:<9} "
        f"{'on' if r['xla'] else 'off':<4} {r['steps_per_s']:>9.2f} "
        f"{r['ms_per_step']:>9.3f} {r['compile_s']:>9.1f} "
        f"{r.get('compile_cached_s', float('nan')):>8.1f} "
        f"{r['peak_rss_mb']:>7.0f} {r['input_ms_per_step']:>8.2f} "
        f"{gflop if gflop else float('nan'):>10.4f} "
        f"{rate if rate else float('nan'):>8.1f} "
        f"{100 * rate / peak if rate else float('nan'):>6.1f}")
  if any(r.get("unit") == "tasks" for r in rows):
    lines.append(notes)
  for r in rows:
    if "cached_error" in r:
      lines.append(f"  {r['workload']} {r['algorithm']}: the cached first call "
                   f"failed: {r['cached_error'][:80]}")
    elif "cached_first_loss" in r and not _same_loss(r["cached_first_loss"],
                                                    r["first_loss"]):
      lines.append(f"  {r['workload']} {r['algorithm']}: the cached program's "
                   f"first loss {r['cached_first_loss']} differs from "
                   f"{r['first_loss']}")
    elif r.get("cache_hit") is False:
      lines.append(f"  {r['workload']} {r['algorithm']}: the second process "
                   "did not find the program in the XLA cache (it compiled "
                   "it again)")
  for r in rows:
    if "end_to_end_tasks_per_s" in r:
      lines.append(f"  {r['workload']} (XLA {'on' if r['xla'] else 'off'}) "
                   "end to end, sampling included: "
                   f"{r['end_to_end_tasks_per_s']:.0f} tasks/s")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                   description=__doc__.splitlines()[0])
  parser.add_argument(
      "--workloads",
      default="sinusoid,omniglot,miniimagenet,leo_1shot,leo_5shot,leo_test")
  parser.add_argument("--algorithms",
                      default="maml,fomaml,anil,metasgd,mamlpp",
                      help="MAML-family algorithms; LEO workloads run LEO")
  parser.add_argument("--xla", default="on,off",
                      help="comma list of on/off")
  parser.add_argument("--precisions", default="float32",
                      help="comma list of float32/bfloat16/float16")
  parser.add_argument("--steps_per_call", type=int, default=0,
                      help="meta-steps per compiled call (0: each workload's "
                      "default: 100 for sinusoid, else 1)")
  parser.add_argument("--tasks_per_chunk", type=int, default=0,
                      help="tasks a MAML-family meta-step differentiates at "
                      "once, as runner.py --tasks_per_chunk (0: the "
                      "learner's default; the meta-batch size: all at once)")
  parser.add_argument("--intra_op_threads", type=int, default=-1,
                      help="TensorFlow intra-op threads (-1: each workload's "
                      "default, as runner.py: 1 for sinusoid; 0: TensorFlow's "
                      "default, one per core)")
  parser.add_argument("--blocks", type=int, default=5)
  parser.add_argument("--block_seconds", type=float, default=2.0)
  parser.add_argument("--omniglot_cache", default=None,
                      help="a prepared Omniglot cache to sample from")
  parser.add_argument("--allow_tf32", action="store_true",
                      help="let GPU matmuls and convolutions use TensorFloat-32, "
                      "as runner.py --allow_tf32 (off: exact float32)")
  parser.add_argument("--cached_first_call",
                      action=argparse.BooleanOptionalAction, default=True,
                      help="also time the first call of a second process that "
                      "loads the program from the XLA cache the first one "
                      "wrote (XLA rows only)")
  parser.add_argument("--out", default=None, help="JSON output path")
  parser.add_argument("--report", nargs="+", metavar="JSON", default=None,
                      help="print the results table of these JSON files in "
                      "the README's markdown format, and measure nothing")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.one:  # child process: one configuration
    print("RESULT " + json.dumps(_run_one(json.loads(args.one))), flush=True)
    return
  if args.report:
    from benchmarks import report
    results = []
    for path in args.report:
      try:
        with open(path) as f:
          result = json.load(f)
      except (OSError, ValueError) as e:
        parser.error(f"--report: cannot read {path} as benchmark JSON: {e}")
      if not isinstance(result, dict) or not {
          "rows", "peak_matmul_gflops", "date", "machine"} <= result.keys():
        parser.error(f"--report: {path} is not a benchmark result (expected "
                     "the JSON that python -m benchmarks writes)")
      results.append(result)
    print(report.markdown_table(results))
    return
  if args.blocks < 1 or args.block_seconds <= 0:
    parser.error(f"--blocks={args.blocks} and --block_seconds="
                 f"{args.block_seconds}: expected at least 1 block of more "
                 "than 0 s")
  if args.intra_op_threads < -1:
    parser.error(f"--intra_op_threads={args.intra_op_threads}: expected -1 "
                 "(each workload's default), 0 (TensorFlow's) or a number of "
                 "threads")
  if args.steps_per_call < 0:
    parser.error(f"--steps_per_call={args.steps_per_call}: expected >= 1, "
                 "or 0 for each workload's default")
  if args.tasks_per_chunk < 0:
    parser.error(f"--tasks_per_chunk={args.tasks_per_chunk}: expected a "
                 "divisor of the meta-batch size, or 0 for the learner's "
                 "default")

  from benchmarks import workloads as wl
  known = wl.workloads()
  requested = args.algorithms.split(",")
  for flag, values, allowed in [
      ("--algorithms", requested, wl.MAML_FAMILY + ("leo",)),
      ("--xla", args.xla.split(","), ("on", "off")),
      ("--precisions", args.precisions.split(","), maml_tf.PRECISIONS)]:
    for value in values:
      if value not in allowed:
        parser.error(f"{flag}: unknown value {value!r}; expected some of "
                     f"{','.join(allowed)}")
  if args.omniglot_cache and not os.path.isdir(args.omniglot_cache):
    parser.error(f"--omniglot_cache={args.omniglot_cache}: not a directory "
                 "(a cache from python -m data_prep.omniglot)")
  configs = []
  for workload in args.workloads.split(","):
    if workload not in known:
      parser.error(f"--workloads: unknown workload {workload!r}; expected "
                   f"some of {','.join(known)}")
    # LEO's workloads run LEO whatever --algorithms says (its default names
    # the MAML family only); the others run the requested ones they support.
    supported = known[workload].algorithms
    algorithms = ([a for a in requested if a in supported]
                  if supported != ("leo",) else ["leo"])
    if not algorithms:
      parser.error(f"--algorithms={args.algorithms}: none runs on "
                   f"--workloads {workload} (expected some of "
                   f"{','.join(supported)})")
    configs += itertools.product([workload], algorithms,
                                 args.precisions.split(","),
                                 args.xla.split(","))

  import tensorflow as tf

  from benchmarks import measure
  # The peak is taken with the same matmul precision as the workloads.
  tf.config.experimental.enable_tensor_float_32_execution(args.allow_tf32)
  peak = measure.peak_matmul_gflops()
  print(f"peak float32 matmul (2048^3, XLA): {peak:.1f} GFLOP/s", flush=True)
  rows = []
  flops = {}  # the XLA row's count, reused for the same maths without XLA
  for workload, algorithm, precision, xla in configs:
    spec = {"workload": workload, "algorithm": algorithm,
            "precision": precision, "xla": xla == "on",
            "blocks": args.blocks, "block_seconds": args.block_seconds,
            "steps_per_call": args.steps_per_call,
            "tasks_per_chunk": args.tasks_per_chunk,
            "intra_op_threads": args.intra_op_threads,
            "omniglot_cache": args.omniglot_cache,
            "allow_tf32": args.allow_tf32}
    with tempfile.TemporaryDirectory(prefix="xla-cache-") as cache:
      # A fresh on-disk XLA cache for each configuration (any cache of the
      # user's is replaced): the first process compiles, the second loads.
      env = dict(os.environ, TF_XLA_FLAGS=xla_cache.with_cache_directory(
          os.environ.get("TF_XLA_FLAGS", ""), cache))
      row = _run_child(spec, env)
      if spec["xla"] and args.cached_first_call and "error" not in row:
        entries = _cache_entries(cache)
        cached = _run_child(dict(spec, first_call_only=True), env)
        if "error" in cached:
          row["cached_error"] = cached["error"]
        else:
          row["compile_cached_s"] = cached["compile_s"]
          row["cached_first_loss"] = cached["first_loss"]
          # A program the second process did not find, it compiled and
          # wrote as a new entry.
          row["cache_hit"] = bool(entries) and _cache_entries(cache) == entries
    if "error" not in row:
      key = (workload, algorithm, precision)
      if row["gflop_per_step"] is None:
        row["gflop_per_step"] = flops.get(key)
      flops[key] = row["gflop_per_step"]
    rows.append(row)
    print("\n".join(_format_table([row], peak).splitlines()[2:]), flush=True)
  table = _format_table(rows, peak)
  print("\n" + table)
  out = args.out or os.path.join(
      os.path.dirname(__file__), "results",
      datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S") + ".json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  from maml_tf.io_utils import atomic_write
  atomic_write(out, json.dumps({
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"processor": _cpu_name(), "cpus": os.cpu_count(),
                  "gpus": measure.gpu_names(),
                  "python": platform.python_version()},
      # Settings that change the figures (maml_tf sets the first two; the
      # malloc ones change the peak memory, README "Peak memory").
      "environment": {k: os.environ.get(k) for k in (
          "TF_ENABLE_ONEDNN_OPTS", "TF_CPU_ALLOCATOR_USE_BFC", "XLA_FLAGS",
          "TF_XLA_FLAGS", "TF_NUM_INTRAOP_THREADS", "LD_PRELOAD",
          "MALLOC_CONF", "MALLOC_ARENA_MAX")} | {
              "allow_tf32": args.allow_tf32},
      "peak_matmul_gflops": peak, "rows": rows}, indent=1))
  print(f"\nwritten to {out}")


def _run_child(spec: dict, env: dict) -> dict:
  """``_run_one(spec)`` in a fresh process with environment ``env``: its
  result, or ``spec`` with the error that ended it."""
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks", "--one", json.dumps(spec)],
      capture_output=True, text=True, env=env)
  result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not result:
    return dict(spec, error=(proc.stderr.strip().splitlines() or
                             ["failed"])[-1])
  return json.loads(result[0][len("RESULT "):])


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  main()
