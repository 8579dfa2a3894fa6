"""runner.py with --model=anil / metasgd / mamlpp on the sinusoid."""

import pytest
import tensorflow as tf

from tests.test_runner import run

SINE = ["--datasource=sinusoid", "--update_batch_size=5", "--update_lr=0.01",
        "--metatrain_iterations=20", "--steps_per_call=10",
        "--summary_interval=20", "--save_interval=20", "--val_interval=0",
        "--num_test_tasks=20", "--test_num_updates=3", "--meta_batch_size=5",
        "--jit_compile=False"]  # XLA is tested in the unit tests


def last_scalar(run_dir, tag):
  """The last value of a TensorBoard scalar in ``run_dir``'s event files."""
  value = None
  for path in sorted(run_dir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          value = float(tf.make_ndarray(v.tensor))
  return value


@pytest.mark.parametrize("model,flags,prefix", [
    # float16 with the default dynamic loss scale (skipped steps would delay
    # MAML++'s learning-rate schedule, checked below, so not there).
    ("anil", ["--norm=None", "--anil_cache_features=True",
              "--precision=float16"], "anil."),
    # float16 without loss scaling: the run directory says so.
    ("metasgd", ["--norm=None", "--metasgd_init_range=0.01,0.02",
                 "--precision=float16", "--loss_scale=1"], "metasgd."),
    # One inner step keeps the graphs small; the unit tests cover U > 1.
    ("mamlpp", ["--norm=batch_norm", "--num_updates=1",
                "--mamlpp_iterations_per_epoch=10", "--mamlpp_msl_epochs=1"],
     "mamlpp."),
])
def test_each_family_model_trains_and_tests(tmp_path, model, flags, prefix):
  proc = run([f"--model={model}", f"--logdir={tmp_path}"] + SINE + flags)
  assert "test results after 20 iterations" in proc.stdout
  (run_dir,) = list(tmp_path.iterdir())
  assert run_dir.name.startswith(prefix)
  scale = last_scalar(run_dir, "metatrain/loss_scale")
  if model == "metasgd":
    assert ".float16.lossscale1" in run_dir.name and scale is None
  if model == "anil":
    assert ".float16" in run_dir.name and "lossscale" not in run_dir.name
    assert 1 <= scale <= 2 ** 15  # the interval's mean of powers of two
  assert (run_dir / "checkpoints" / "model-20.index").exists()
  # MAML++ anneals the meta learning rate to --mamlpp_min_meta_lr.
  expected = 1e-5 if model == "mamlpp" else 1e-3
  assert last_scalar(run_dir, "metatrain/meta_lr") == pytest.approx(expected)
  if model == "mamlpp":  # an evaluation-only option tests the same run
    proc = run([f"--model={model}", f"--logdir={tmp_path}", "--train=False",
                "--mamlpp_bnrs_eval=True"] + SINE + flags)
    assert "val results after 20 iterations" in proc.stdout


@pytest.mark.parametrize("flag,message", [
    ("--metasgd_init_range=0.1", "--metasgd_init_range=0.1"),
    ("--mamlpp_iterations_per_epoch=0", "--mamlpp_iterations_per_epoch"),
    # 10 meta-steps per call here (SINE); MSL's phase would end mid-call.
    ("--mamlpp_iterations_per_epoch=25", "--mamlpp_iterations_per_epoch=25 "
     "must be a multiple of --steps_per_call=10"),
])
def test_bad_family_flags_are_named(tmp_path, flag, message):
  model = "metasgd" if "metasgd" in flag else "mamlpp"
  proc = run([f"--model={model}", f"--logdir={tmp_path}", flag] + SINE,
             check=False)
  assert proc.returncode != 0
  assert message in proc.stderr
