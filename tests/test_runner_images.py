"""runner.py on the image datasources: generated Omniglot, miniImageNet and
Quick Draw caches end to end, and the errors that name flags and paths."""

import json

import pytest

from tests import image_files

from tests.test_runner import run

TINY = ["--model=maml", "--datasource=omniglot", "--num_filters=4",
        "--meta_batch_size=2", "--update_batch_size=1", "--update_lr=0.4",
        "--num_classes=5", "--num_test_tasks=4", "--test_batch_size=4",
        "--test_num_updates=2", "--jit_compile=False", "--val_interval=10",
        "--summary_interval=10", "--print_interval=10", "--save_interval=10"]


def test_train_then_test_mode_on_a_cache(omniglot_cache, tmp_path):
  args = TINY + [f"--data_path={omniglot_cache}", f"--logdir={tmp_path}"]
  proc = run(args + ["--metatrain_iterations=20"])
  run_dir = tmp_path / "cls_5.mbs_2.ubs_1.numstep1.updatelr0.4hidden4batchnorm"
  assert "test results after 20 iterations (4 tasks" in proc.stdout
  assert (run_dir / "test_ubs1_stepsize0.4.csv").exists()
  assert "query_accuracy" in proc.stdout
  # The MAML family on images compiles with XLA's classic CPU emitters.
  assert ("--xla_cpu_use_fusion_emitters=false (--xla_cpu_emitters=auto)"
          in proc.stderr)
  proc = run(args + ["--train=False"])
  assert "val results after 20 iterations" in proc.stdout


def test_ensemble_of_the_best_validated_checkpoints(omniglot_cache, tmp_path):
  """--test_ensemble (HTTYM's MAML++ test): training keeps the best
  meta-validations' checkpoints, and the test averages their logits; test
  mode gives the same result."""
  args = TINY + [f"--data_path={omniglot_cache}", f"--logdir={tmp_path}",
                 "--test_ensemble=2", "--val_num_tasks=4"]
  proc = run(args + ["--metatrain_iterations=30"])
  run_dir = tmp_path / "cls_5.mbs_2.ubs_1.numstep1.updatelr0.4hidden4batchnorm"
  top = json.loads((run_dir / "top_checkpoints" / "top.json").read_text())
  assert len(top["checkpoints"]) == 2 and top["metric"] == "query_accuracy"
  assert "Ensemble of 2: query accuracy" in proc.stderr
  result = json.loads((run_dir / "test_ensemble2_ubs1_stepsize0.4.json")
                      .read_text())["metrics"]["ensemble_query_accuracy"]
  proc = run(args + ["--train=False", "--test_set=True"])
  assert "test results after 30 iterations" in proc.stdout
  again = json.loads((run_dir / "test_ensemble2_ubs1_stepsize0.4.json")
                     .read_text())["metrics"]["ensemble_query_accuracy"]
  assert again == result


@pytest.fixture(scope="module")
def miniimagenet_cache(tmp_path_factory):
  """A miniImageNet cache prepared from generated Ravi & Larochelle files:
  3/2/2 classes of 3 images."""
  from data_prep import miniimagenet
  root = tmp_path_factory.mktemp("mini")
  image_files.mini_csv_layout(root / "raw")
  miniimagenet.prepare(miniimagenet.MiniImageNetPrepConfig(
      str(root / "raw"), str(root / "cache")))
  return root / "cache"


def test_miniimagenet_trains_compiled_and_tests(miniimagenet_cache, tmp_path):
  """The miniImageNet path as the paper's command runs it, compiled by XLA:
  84x84x3 images, the max-pool network, and a meta-batch small enough for
  one convolution per task."""
  proc = run(["--model=maml", "--datasource=miniimagenet",
              f"--data_path={miniimagenet_cache}", f"--logdir={tmp_path}",
              "--num_classes=2", "--update_batch_size=1", "--num_query=2",
              "--num_filters=4", "--max_pool=True", "--update_lr=0.01",
              "--meta_batch_size=2", "--num_updates=1",
              "--test_num_updates=1", "--metatrain_iterations=3",
              "--num_test_tasks=4", "--test_batch_size=4", "--val_interval=3",
              "--summary_interval=3", "--print_interval=3",
              "--save_interval=3"])
  assert "test results after 3 iterations (4 tasks" in proc.stdout
  run_dir = tmp_path / ("cls_2.mbs_2.ubs_1.numstep1.updatelr0.01hidden4"
                        "maxpoolbatchnorm.numquery2")
  assert (run_dir / "test_ubs1_stepsize0.01.csv").exists(), sorted(
      p.name for p in tmp_path.iterdir())
  assert ("--xla_cpu_use_fusion_emitters=false (--xla_cpu_emitters=auto)"
          in proc.stderr)


@pytest.mark.slow  # ~20 s; Omniglot's test above runs the same code path
def test_quickdraw_trains_and_tests(tmp_path):
  from data_prep import quickdraw
  raw = image_files.quickdraw_files(tmp_path / "raw", categories=12,
                                    drawings=8)
  cache = tmp_path / "cache"
  quickdraw.prepare(quickdraw.QuickDrawPrepConfig(str(raw), str(cache),
                                                  samples_per_class=4))
  proc = run(TINY[2:] + [
      "--model=maml", "--datasource=quickdraw", f"--data_path={cache}",
      f"--logdir={tmp_path / 'logs'}", "--max_pool=True", "--num_classes=2",
      "--num_query=1", "--metatrain_iterations=2", "--val_interval=0",
      "--summary_interval=2", "--print_interval=2", "--save_interval=2",
      "--test_num_updates=1"])
  assert "test results after 2 iterations (4 tasks" in proc.stdout
  assert (tmp_path / "logs" / ("cls_2.mbs_2.ubs_1.numstep1.updatelr0.4hidden4"
                               "maxpoolbatchnorm.numquery1") /
          "test_ubs1_stepsize0.4.csv").exists()


@pytest.mark.slow  # ~30 s: another TF start-up and trace for one branch
def test_fully_connected_net(omniglot_cache, tmp_path):
  proc = run(TINY + [f"--data_path={omniglot_cache}", f"--logdir={tmp_path}",
                     "--conv=False", "--metatrain_iterations=10"])
  assert "test results after 10 iterations" in proc.stdout


@pytest.mark.parametrize("extra,messages", [
    ([], ["--datasource=omniglot needs --data_path=<prepared cache>",
          "python -m data_prep.omniglot --input"]),
    (["--data_path={cache}", "--num_classes=20"],
     ["{cache} (test split): 13 classes, fewer than --num_classes=20"]),
    (["--data_path={cache}", "--num_query=2"],
     ["has 2 examples, fewer than the 3 a task needs (1 support + 2 query",
      "the support size is --update_batch_size=1", "--num_query=2"]),
    (["--data_path={cache}", "--datasource=quickdraw"],
     ["--data_path: {cache} holds 'omniglot', not 'quickdraw'"]),
    (["--datasource=imagenet"], ["--datasource='imagenet': expected"]),
    (["--data_path={cache}", "--num_classes=1"],
     ["--num_classes must be >= 2 for --datasource=omniglot, got 1"]),
    (["--data_path={cache}", "--test_ensemble=2", "--test_iter=10"],
     ["--test_iter=10 tests one checkpoint; --test_ensemble=2 the "
      "best-validated ones: give one of them"]),
    # It trained, then found nothing to test: no step 10 to validate at.
    (["--data_path={cache}", "--test_ensemble=2"],
     ["a meta-validation while meta-training (every --val_interval steps; "
      "got --datasource=omniglot, --val_interval=10, "
      "--metatrain_iterations=1)"]),
])
def test_errors_name_flags_and_paths(omniglot_cache, tmp_path, extra, messages):
  args = TINY + [f"--logdir={tmp_path}", "--metatrain_iterations=1"]
  proc = run(args + [a.format(cache=omniglot_cache) for a in extra],
             check=False)
  assert proc.returncode != 0
  for message in messages:
    assert (message.format(cache=omniglot_cache) in proc.stderr
            ), proc.stderr[-2000:]
