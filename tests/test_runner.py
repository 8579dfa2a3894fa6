"""The command line: the original's flags, run directories, errors."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import tensorflow as tf

from maml_tf import xla_cache
from tests.conftest import REPO, run_python

SINE = ["--model=maml", "--datasource=sinusoid", "--norm=None",
        "--update_batch_size=10", "--update_lr=0.01"]


def run(args, cwd=REPO, check=True):
  proc = run_python(["runner.py", *args], cwd=cwd)
  if check and proc.returncode != 0:
    raise AssertionError(f"runner failed ({proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr[-4000:]}")
  return proc


def test_train_test_resume_and_test_mode(tmp_path):
  logdir = tmp_path / "logs"
  cache = f"--xla_cache_dir={tmp_path / 'xla'}"
  proc = run(SINE + [f"--logdir={logdir}", "--metatrain_iterations=200",
                     "--num_test_tasks=40", "--val_interval=100", cache])
  run_dir = logdir / "cls_5.mbs_25.ubs_10.numstep1.updatelr0.01nonorm"
  assert "test results after 200 iterations" in proc.stdout
  assert "step |" in proc.stdout and "  10 |" in proc.stdout
  for name in ("flags.txt", "flags.json", "test_ubs10_stepsize0.01.csv",
               "test_ubs10_stepsize0.01.json"):
    assert (run_dir / name).exists(), name
  assert (run_dir / "checkpoints" / "model-200.index").exists()
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr
  assert "First meta-step call" in proc.stderr
  assert "TensorFloat-32 matmuls and convolutions: off" in proc.stderr
  assert "TensorFlow devices: /device:CPU:0" in proc.stderr
  # The sinusoid's tiny kernels run on one thread unless a flag says else.
  assert "TensorFlow intra-op threads: 1 (--intra_op_threads)" in proc.stderr
  # ... and compile with TensorFlow's default emitters, set explicitly.
  assert ("--xla_cpu_use_fusion_emitters=true (--xla_cpu_emitters=auto)"
          in proc.stderr)
  flags = json.loads((run_dir / "flags.json").read_text())
  assert flags["metatrain_iterations"] == 200
  tags = {v.tag for f in run_dir.glob("events.out.tfevents.*")
          for event in tf.compat.v1.train.summary_iterator(str(f))
          for v in event.summary.value}
  assert {"metatest/pre_update_query_loss",
          "metatest/post_update_query_loss_step_10",
          "metaval/post_update_query_loss_step_5", "flags"} <= tags

  # Resume: a longer run continues from step 200, and compiles nothing: the
  # XLA cache matches programs by name, and restoring a checkpoint used to
  # shift every name (the cache then gained the programs again).
  def cached():
    return sorted(p.relative_to(tmp_path / "xla")
                  for p in (tmp_path / "xla").glob("*/*"))

  programs = cached()
  # The meta-step, the evaluation (summaries and validation), the test, in
  # one directory for this machine and these XLA settings.
  assert len(programs) == 3 and len({p.parent for p in programs}) == 1
  # Moved there whole at exit, from the run's staging directory (which is
  # gone); the format check agrees with what TensorFlow wrote.
  assert all(xla_cache.is_complete(str(tmp_path / "xla" / p))
             for p in programs)
  assert not list((tmp_path / "xla").glob("*/.staging-*"))
  assert f"XLA cache: {tmp_path / 'xla' / programs[0].parent}" in proc.stderr
  proc = run(SINE + [f"--logdir={logdir}", "--metatrain_iterations=300",
                     "--num_test_tasks=40", "--test_after_train=False",
                     cache])
  assert "step 200" in proc.stderr and "Meta-training from step 200" in proc.stderr
  assert (run_dir / "checkpoints" / "model-300.index").exists()
  assert cached() == programs

  # Other XLA_FLAGS (the other emitters), another directory: TensorFlow's
  # cache would load the program compiled with the emitters of the run above.
  run(SINE + [f"--logdir={logdir}", "--train=False", "--num_test_tasks=40",
              "--xla_cpu_emitters=classic", cache])
  (test_program,) = set(cached()) - set(programs)
  assert test_program.parent != programs[0].parent

  # The later invocations test test-mode logic, not XLA: they skip its
  # compile time.

  # Test mode with --test_iter loads that checkpoint; val split by default.
  # It writes no TensorBoard scalars there, so it opens no events file.
  events = sorted(run_dir.glob("events.out.tfevents.*"))
  proc = run(SINE + [f"--logdir={logdir}", "--train=False", "--test_iter=200",
                     "--num_test_tasks=40", "--jit_compile=False",
                     "--allow_tf32", "--intra_op_threads=2"])
  assert "val results after 200 iterations" in proc.stdout
  assert "TensorFloat-32 matmuls and convolutions: allowed" in proc.stderr
  assert "TensorFlow intra-op threads: 2 (--intra_op_threads)" in proc.stderr
  assert (run_dir / "val_ubs10_stepsize0.01_iter200.csv").exists()
  assert sorted(run_dir.glob("events.out.tfevents.*")) == events

  # --flagfile reproduces the run directory from the saved flags.
  proc = run([f"--flagfile={run_dir / 'flags.txt'}", "--train=False",
              "--test_set=True", "--num_test_tasks=40", "--jit_compile=False"])
  assert "test results after 300 iterations" in proc.stdout


def test_run_directories_keep_configurations_apart(tmp_path):
  """A second seed gets its own run directory; a run directory refuses a
  command whose flags would train something else; a test may change K."""
  short = SINE + [f"--logdir={tmp_path}", "--metatrain_iterations=100",
                  "--val_interval=0", "--test_after_train=False",
                  "--jit_compile=False"]
  run(short + ["--seed=1"])
  plain = tmp_path / "cls_5.mbs_25.ubs_10.numstep1.updatelr0.01nonorm"
  seed1 = tmp_path / (plain.name + ".seed1")  # not the seed-0 run's plain
  assert (seed1 / "checkpoints" / "model-100.index").exists()
  assert json.loads((seed1 / "flags.json").read_text())["seed"] == 1

  # Test mode with another K and step size (the original's train_update_*).
  proc = run(short + ["--seed=1", "--train=False", "--update_batch_size=5",
                      "--train_update_batch_size=10", "--update_lr=0.02",
                      "--train_update_lr=0.01", "--num_test_tasks=20"])
  assert "val results after 100 iterations" in proc.stdout
  assert (seed1 / "val_ubs5_stepsize0.02.csv").exists()

  # A seed-1 run in the plain directory (as an older version named it).
  plain.mkdir()
  (plain / "flags.json").write_text((seed1 / "flags.json").read_text())
  proc = run(short, check=False)
  assert proc.returncode != 0
  assert "--seed=1 there, 0 here" in proc.stderr and str(plain) in proc.stderr

  # Flags --model=maml does not read would be ignored: refused, with hints.
  proc = run(short + ["--outer_lr=0.01", "--mamlpp_msl=False"], check=False)
  assert proc.returncode != 0
  assert ("--mamlpp_msl applies to --model=mamlpp only; --outer_lr applies to "
          "--model=leo only, not --model=maml (use --meta_lr instead of "
          "--outer_lr)") in proc.stderr


def test_oracle_baseline_is_pretrained_not_meta_trained(tmp_path):
  """The original moves every meta-training iteration of the oracle into
  pretraining (Adam on the loss of the amplitude- and phase-aware input)."""
  proc = run(SINE + [f"--logdir={tmp_path}", "--baseline=oracle",
                     "--metatrain_iterations=200", "--print_interval=100",
                     "--val_interval=0", "--num_test_tasks=20",
                     "--jit_compile=False"])
  assert "pretrain step 200/200" in proc.stderr
  assert (tmp_path / "cls_5.mbs_25.ubs_10.numstep1.updatelr0.01oraclenonorm"
          / "checkpoints" / "model-200.index").exists()


def test_test_mode_without_checkpoint_fails_clearly(tmp_path):
  proc = run(SINE + [f"--logdir={tmp_path}", "--train=False"], check=False)
  assert proc.returncode != 0
  assert "no checkpoint in" in proc.stderr and str(tmp_path) in proc.stderr
  assert not list(tmp_path.iterdir())  # and it leaves nothing behind
  # --model=fomaml is --model=maml --stop_grad: its run directory.
  proc = run(SINE[1:] + ["--model=fomaml", f"--logdir={tmp_path}",
                         "--train=False"], check=False)
  assert "updatelr0.01stopgradnonorm/checkpoints" in proc.stderr


@pytest.mark.parametrize("flag,message", [
    ("--norm=batchnorm", "--norm='batchnorm'"),
    ("--meta_batch_size=0", "--meta_batch_size must be >= 1"),
    ("--intra_op_threads=-1", "--intra_op_threads=-1: expected 0"),
    ("--baseline=orcle", "--baseline='orcle'"),
    ("--loss_scale=3", "--loss_scale='3': expected 'dynamic' or a power"),
    ("--loss_scale=128", "applies to --precision=float16 only"),
    ("--save_interval=250", "--save_interval=250 must be a multiple of "
     "--steps_per_call=100"),
    ("--tasks_per_chunk=4", "--tasks_per_chunk=4 must be a divisor of "
     "--meta_batch_size=25"),
    ("--xla_cache_dir=/dev/null/xla", "--xla_cache_dir=/dev/null/xla: cannot "
     "use it as the XLA cache"),
    # These trained on a NaN rate, or stopped with a traceback.
    ("--update_lr=nan", "--update_lr must be >= 0 and finite, got nan"),
    ("--max_checkpoints=0", "--max_checkpoints must be >= 1, got 0"),
    ("--num_filters=-3", "--num_filters must be >= 1, got -3"),
    ("--meta_lr=inf", "--meta_lr must be > 0 and finite, got inf"),
    ("--train_update_lr=inf", "--train_update_lr must be >= 0 and finite"),
    ("--test_ensemble=5", "--test_ensemble=5 ranks checkpoints by "
     "meta-validation accuracy: it needs a classification datasource and a "
     "meta-validation while meta-training (every --val_interval steps; got "
     "--datasource=sinusoid, --val_interval=500, --metatrain_iterations="
     "15000)"),
])
def test_bad_flags_are_named(tmp_path, flag, message):
  proc = run(SINE + [f"--logdir={tmp_path}", flag], check=False)
  assert proc.returncode != 0
  assert "runner.py: error: " in proc.stderr and message in proc.stderr
  assert len(proc.stderr.splitlines()) < 20  # not absl's help of every flag
  assert not list(tmp_path.iterdir())


def test_unusable_run_directory_is_named(tmp_path):
  """A run directory that is a file, or under one, was a traceback from
  TensorFlow's summary writer (LEO's --checkpoint_path: FileExistsError)."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = run(SINE + [f"--logdir={blocker}"], check=False)
  assert proc.returncode != 0
  assert (f"runner.py: error: --logdir: cannot use the run directory "
          f"{blocker}/") in proc.stderr
  assert f"{blocker} is a file, not a directory" in proc.stderr
  proc = run_python(["runner.py", f"--checkpoint_path={blocker}",
                     f"--leo_synthetic_dir={tmp_path / 'syn'}"])
  assert proc.returncode != 0
  assert (f"runner.py: error: --checkpoint_path: cannot use the run "
          f"directory {blocker}: {blocker} is a file") in proc.stderr
  assert not (tmp_path / "syn").exists()  # refused before generating data


def test_sigterm_saves_and_a_second_run_of_the_directory_is_refused(tmp_path):
  """SIGTERM (a scheduler's preemption) used to end the run at once with no
  message, losing the steps since the last checkpoint; and a second run of
  the same command trained into the same directory beside the first."""
  args = SINE + [f"--logdir={tmp_path}", "--metatrain_iterations=1000000",
                 "--steps_per_call=100", "--save_interval=100000",
                 "--print_interval=100", "--val_interval=0",
                 "--num_test_tasks=10",
                 "--jit_compile=False", "--xla_cache_dir="]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  first = subprocess.Popen([sys.executable, "runner.py", *args], cwd=REPO,
                           env=env, stderr=subprocess.PIPE, text=True)
  watchdog = threading.Timer(300, first.kill)
  watchdog.start()
  try:
    for line in first.stderr:
      if " steps/s | ETA" in line:
        break  # training, past the first call
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    second = run(args, check=False)
    assert second.returncode == 1
    assert (f"runner.py: error: {run_dir} is in use by another process "
            f"(training: pid {first.pid} on ") in second.stderr
    first.send_signal(signal.SIGTERM)
    rest = first.stderr.read()
    assert first.wait() == 128 + signal.SIGTERM
  finally:
    watchdog.cancel()
    first.kill()
  stopped = re.search(r"runner.py: stopped by SIGTERM at step (\d+), with a "
                      "checkpoint; the same command resumes", rest)
  assert stopped, rest[-2000:]
  step = int(stopped.group(1))
  assert (run_dir / "checkpoints" / f"model-{step}.index").exists()
  resumed = run([a for a in args if not a.startswith("--metatrain_it")]
                + [f"--metatrain_iterations={step + 100}"])
  assert f"Meta-training from step {step} to {step + 100}" in resumed.stderr


def test_more_than_ten_training_steps_are_all_tested(tmp_path):
  """The original tests ``max(test_num_updates, num_updates)`` steps."""
  proc = run(SINE + [f"--logdir={tmp_path}", "--num_updates=11",
                     "--metatrain_iterations=2", "--val_interval=0",
                     "--num_test_tasks=4", "--jit_compile=False"])
  assert "Evaluating on 4 test tasks, 11 inner steps" in proc.stderr
  (result,) = tmp_path.glob("*/test_ubs10_stepsize0.01.json")
  means = json.loads(result.read_text())["metrics"]["query_loss"]["mean"]
  assert len(means) == 12  # before adaptation, then after each of 11 steps
