"""The one entry point: meta-train and evaluate MAML-family models and LEO.

  python runner.py                       # LEO demo on synthetic embeddings
  python runner.py --data_path=$EMBEDDINGS            # LEO, as deepmind/leo
  python runner.py --model=maml --datasource=sinusoid --logdir=logs/sine \
      --metatrain_iterations=70000 --norm=None --update_batch_size=10

Every flag of cbfinn/maml's ``main.py`` and of deepmind/leo's ``config.py`` /
``runner.py`` exists here with its original name and default. Flags are defined
and read only in this file; everything below gets frozen config dataclasses.
``--flagfile`` works, and each run writes its resolved flags to
``<run dir>/flags.txt`` (a valid flagfile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import json
import math
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import maml_tf  # noqa: E402  (before TensorFlow: sets its environment)

FLAGS = flags.FLAGS

# ------------------------------------------------------------ shared flags
flags.DEFINE_enum("model", "leo",
                  ["leo", "maml", "fomaml", "anil", "metasgd", "mamlpp"],
                  "Algorithm to run: leo (Rusu et al. 2019), maml (Finn et al. "
                  "2017; first-order with --stop_grad, or fomaml, which "
                  "means --model=maml --stop_grad), anil (Raghu et al. "
                  "2020), metasgd (Li et al. 2017), mamlpp (Antoniou et al. "
                  "2019).")
flags.DEFINE_string("data_path", None,
                    "Prepared dataset directory (see data_prep/).")
flags.DEFINE_integer("seed", 0, "Seed for initialisation and task sampling.")
flags.DEFINE_boolean("jit_compile", True,
                     "Compile meta-steps with XLA (tf.function(jit_compile)).")
flags.DEFINE_string("xla_cache_dir", "~/.cache/maml_tf/xla",
                    "Persistent XLA compilation cache: a rerun, a resumed run "
                    "or a test of the same configuration skips most of the "
                    "first call's compile time. Programs go in a "
                    "subdirectory per TensorFlow version, CPU, GPUs and "
                    "XLA_FLAGS. Empty: off. Ignored when TF_XLA_FLAGS sets "
                    "--tf_xla_persistent_cache_directory.")
flags.DEFINE_boolean("allow_tf32", False,
                     "Let float32 matmuls and convolutions run as TensorFloat-32 "
                     "on NVIDIA Ampere or newer GPUs (TensorFlow's own default): "
                     "faster, but their inputs are rounded to 10-bit "
                     "mantissas, so losses and meta-gradients are no longer "
                     "float32. No effect on CPUs.")
flags.DEFINE_enum("xla_cpu_emitters", "auto", ["auto", "classic", "fusion"],
                  "XLA:CPU's kernel emitters (--xla_cpu_use_fusion_emitters). "
                  "auto: classic for the MAML family on images (a lower peak "
                  "memory, faster compiles and steps), fusion, "
                  "TensorFlow's default, for the sinusoid (faster steps) and "
                  "LEO (first calls 3-5 s shorter; classic trains LEO "
                  "1.2-1.5x faster once compiled). No effect on GPUs, nor "
                  "when XLA_FLAGS already sets the flag.")
flags.DEFINE_integer("intra_op_threads", None,
                     "Threads of TensorFlow's intra-op pool, which runs XLA's "
                     "kernels and the large matmuls on a CPU. 0: TensorFlow's "
                     "default (one per core). Unset: 1 for "
                     "--datasource=sinusoid, whose tiny kernels run faster "
                     "without a thread pool, else TensorFlow's default "
                     "(or TF_NUM_INTRAOP_THREADS when it is set).")
flags.DEFINE_enum("precision", "float32", list(maml_tf.PRECISIONS),
                  "Arithmetic of the MAML-family networks: float32, or mixed "
                  "precision (bfloat16/float16 layers; float32 variables, "
                  "inner updates, losses and batch-norm statistics).")
flags.DEFINE_string("loss_scale", "auto",
                    "Loss scaling of the float16 gradients (see "
                    "maml_tf/precision.py): 'dynamic' (start at 2^15, halve "
                    "after a non-finite step, which is skipped, double after "
                    "2000 finite ones), a fixed power of two, 1 (off), or "
                    "'auto': dynamic with --precision=float16, off otherwise.")
flags.DEFINE_integer("num_classes", 5,
                     "N: classes per task (N-way). [maml, leo]")
_SHARED_FLAGS = frozenset(FLAGS)  # with absl's own

# ------------------------------------------- cbfinn/maml main.py, verbatim
flags.DEFINE_string("datasource", "sinusoid",
                    "sinusoid or omniglot or miniimagenet (or quickdraw); "
                    "the image datasources read --data_path")
flags.DEFINE_string("baseline", None,
                    "oracle, or None (sinusoid only: the input becomes "
                    "[x, amplitude, phase]).")
flags.DEFINE_integer("pretrain_iterations", 0,
                     "number of pre-training iterations.")
flags.DEFINE_integer("metatrain_iterations", 15000,
                     "number of metatraining iterations.")
flags.DEFINE_integer("meta_batch_size", 25,
                     "number of tasks sampled per meta-update")
flags.DEFINE_float("meta_lr", 0.001, "the base learning rate of the generator")
flags.DEFINE_integer("update_batch_size", 5,
                     "number of examples used for inner gradient update (K "
                     "for K-shot learning).")
flags.DEFINE_float("update_lr", 1e-3,
                   "step size alpha for inner gradient update.")
flags.DEFINE_integer("num_updates", 1,
                     "number of inner gradient updates during training.")
flags.DEFINE_string("norm", "batch_norm", "batch_norm, layer_norm, or None")
flags.DEFINE_integer("num_filters", 64,
                     "number of filters for conv nets -- 32 for miniimagenet, "
                     "64 for omiglot.")
flags.DEFINE_bool("conv", True,
                  "whether or not to use a convolutional network, only "
                  "applicable in some cases")
flags.DEFINE_bool("max_pool", False,
                  "Whether or not to use max pooling rather than strided "
                  "convolutions")
flags.DEFINE_bool("stop_grad", False,
                  "if True, do not use second derivatives in meta-optimization "
                  "(for speed)")
flags.DEFINE_bool("log", True,
                  "if false, do not log summaries, for debugging code.")
flags.DEFINE_string("logdir", "/tmp/data",
                    "directory for summaries and checkpoints.")
flags.DEFINE_bool("resume", True,
                  "resume training if there is a model available")
flags.DEFINE_bool("train", True, "True to train, False to test.")
flags.DEFINE_integer("test_iter", -1, "iteration to load model (-1 for latest "
                     "model)")
flags.DEFINE_bool("test_set", False,
                  "Set to true to test on the the test set, False for the "
                  "validation set.")
flags.DEFINE_integer("train_update_batch_size", -1,
                     "number of examples used for gradient update during "
                     "training (use if you want to test with a different "
                     "number).")
flags.DEFINE_float("train_update_lr", -1,
                   "value of inner gradient step step during training. (use "
                   "if you want to test with a different value)")

# ------------------------------------------------------ additions (MAML)
flags.DEFINE_integer("test_num_updates", -1,
                     "Inner steps at evaluation; -1: the original's rule, "
                     "max(10, --num_updates).")
flags.DEFINE_integer("num_test_tasks", 600,
                     "Tasks in the final evaluation (the original: 600).")
flags.DEFINE_integer("test_batch_size", 100,
                     "Tasks per compiled evaluation call (does not change "
                     "results).")
flags.DEFINE_bool("test_after_train", True,
                  "After training, evaluate on the test split and write the "
                  "results table.")
flags.DEFINE_integer("steps_per_call", -1,
                     "Meta-steps per compiled call; -1: 100 for sinusoid, 1 "
                     "otherwise.")
flags.DEFINE_integer("tasks_per_chunk", None,
                     "Tasks differentiated at once: each meta-step sums the "
                     "meta-gradients of chunks of this many tasks in a "
                     "compiled loop (the same meta-gradient, a smaller "
                     "program). Must divide --meta_batch_size. Default: 1 "
                     "for image models with a meta-batch of at most 4 (not "
                     "ANIL), chunks of up to 8 tasks for larger ones; all at "
                     "once for the sinusoid and with a GPU.")
flags.DEFINE_integer("summary_interval", 100,
                     "TensorBoard summary interval (the original: 100).")
flags.DEFINE_integer("print_interval", -1,
                     "Progress-line interval; -1: 1000 for sinusoid, else 100.")
flags.DEFINE_integer("val_interval", 500,
                     "Meta-validation interval (the original: 500).")
flags.DEFINE_integer("val_num_tasks", -1,
                     "Tasks per meta-validation; -1: one meta-batch of new "
                     "tasks each time (the original). With --test_ensemble "
                     "they are the same tasks each time (HTTYM: 600).")
flags.DEFINE_integer("test_ensemble", 0,
                     "Test an ensemble of the checkpoints of the N best "
                     "meta-validation accuracies, averaging their query "
                     "logits (HowToTrainYourMAML's MAML++ protocol: 5); 0: "
                     "the final checkpoint alone (the original).")
flags.DEFINE_integer("save_interval", 1000,
                     "Checkpoint interval (the original: 1000).")
flags.DEFINE_integer("max_checkpoints", 10,
                     "Checkpoints kept (the original: 10).")
flags.DEFINE_integer("num_query", -1,
                     "Query examples per class while meta-training and in the "
                     "validation during training (image datasources); -1: "
                     "the original's rule (K; miniimagenet 15).")
flags.DEFINE_integer("num_query_test", -1,
                     "Query examples per class at meta-test time (image "
                     "datasources); -1: the original's rule (K, so 1 for "
                     "1-shot miniimagenet).")
flags.DEFINE_enum("rotation", "auto", ["auto", "task", "train", "classes",
                                        "none"],
                  "90-degree rotations of image classes: task (a random "
                  "multiple per class and task, the original's Omniglot "
                  "augmentation, on every split), train (the same on the "
                  "train split only, as HowToTrainYourMAML), classes (each "
                  "rotation is a new class), none; auto: task for omniglot, "
                  "else none.")

# ------------------------------------------ MAML family (anil, metasgd, mamlpp)
flags.DEFINE_bool("anil_cache_features", True,
                  "[anil] Run the body once per task and set and only the "
                  "head in the inner loop (same results, faster).")
flags.DEFINE_list("metasgd_init_range", ["0.005", "0.1"],
                  "[metasgd] low,high of the uniform initialisation of the "
                  "element-wise inner learning rates alpha (Li et al. 2017: "
                  "[0.005, 0.1]). --update_lr is not used.")
flags.DEFINE_bool("mamlpp_msl", True,
                  "[mamlpp] Multi-step loss: annealed per-step weights of the "
                  "query losses after every inner step (MSL).")
flags.DEFINE_integer("mamlpp_msl_epochs", 10,
                     "[mamlpp] Epochs during which the multi-step loss is used "
                     "(HTTYM multi_step_loss_num_epochs).")
flags.DEFINE_bool("mamlpp_lslr", True,
                  "[mamlpp] Learned per-layer per-step inner learning rates, "
                  "initialised to --update_lr (LSLR).")
flags.DEFINE_bool("mamlpp_bnwb", True,
                  "[mamlpp] Per-step batch-norm weights and biases (BNWB); "
                  "batch norm then learns a scale as well as an offset.")
flags.DEFINE_bool("mamlpp_bnrs", True,
                  "[mamlpp] Track per-step batch-norm running statistics "
                  "(BNRS; saved in checkpoints).")
flags.DEFINE_bool("mamlpp_bnrs_eval", False,
                  "[mamlpp] Normalise evaluation passes with the per-step "
                  "running statistics (inductive); False: current-batch "
                  "statistics, which is what HTTYM's code computes.")
flags.DEFINE_integer("mamlpp_first_order_epochs", 0,
                     "[mamlpp] Derivative-order annealing: first-order "
                     "meta-gradients for this many epochs, then second order "
                     "(HTTYM first_order_to_second_order_epoch + 1; the "
                     "paper's text: 50).")
flags.DEFINE_integer("mamlpp_iterations_per_epoch", 500,
                     "[mamlpp] Meta-iterations per epoch for the MSL and "
                     "derivative-order schedules (HTTYM total_iter_per_epoch).")
flags.DEFINE_bool("mamlpp_cosine_lr", True,
                  "[mamlpp] Cosine annealing of the meta learning rate from "
                  "--meta_lr to --mamlpp_min_meta_lr over the run.")
flags.DEFINE_float("mamlpp_min_meta_lr", 1e-5,
                   "[mamlpp] Final meta learning rate of the cosine schedule "
                   "(HTTYM min_learning_rate).")


def _float_str(value: float) -> str:
  """Python's ``str()`` of a flag value, as the original exp_string uses."""
  return str(value)


def experiment_string() -> str:
  """cbfinn/maml's run-directory name, e.g.
  ``cls_5.mbs_25.ubs_10.numstep1.updatelr0.01nonorm``."""
  train_ubs = (FLAGS.update_batch_size if FLAGS.train_update_batch_size == -1
               else FLAGS.train_update_batch_size)
  train_lr = (FLAGS.update_lr if FLAGS.train_update_lr == -1
              else FLAGS.train_update_lr)
  s = (f"cls_{FLAGS.num_classes}.mbs_{FLAGS.meta_batch_size}.ubs_{train_ubs}"
       f".numstep{FLAGS.num_updates}.updatelr{_float_str(train_lr)}")
  if FLAGS.num_filters != 64:
    s += f"hidden{FLAGS.num_filters}"
  if FLAGS.max_pool:
    s += "maxpool"
  if FLAGS.stop_grad:
    s += "stopgrad"
  if FLAGS.baseline:
    s += FLAGS.baseline
  s += {"batch_norm": "batchnorm", "layer_norm": "layernorm",
        "None": "nonorm"}[FLAGS.norm]
  # Additions to the original's name, each only away from its default (so the
  # original's configurations keep their names): runs that differ in them
  # must not share, and resume, one run directory.
  if FLAGS.seed != 0:
    s += f".seed{FLAGS.seed}"
  if FLAGS.meta_lr != FLAGS["meta_lr"].default:
    s += f".metalr{_float_str(FLAGS.meta_lr)}"
  if FLAGS.pretrain_iterations:
    s += f".pretrain{FLAGS.pretrain_iterations}"
  if not FLAGS.conv:
    s += ".fc"
  if FLAGS.num_query != -1:
    s += f".numquery{FLAGS.num_query}"
  if FLAGS.rotation != "auto":
    s += f".rotation{FLAGS.rotation}"
  if FLAGS.precision != "float32":
    s += f".{FLAGS.precision}"
  scale = _loss_scale()
  if FLAGS.precision == "float16" and scale != "dynamic":
    s += f".lossscale{int(scale or 1)}"  # a fixed scale, or 1 (off)
  if FLAGS.model != "maml":
    s = f"{FLAGS.model}.{s}"
    # The variant's own options, where they differ from their defaults, so
    # that two configurations never share (and resume) one run directory.
    for name in _variant_flags():
      flag = FLAGS[name]
      if name not in _EVALUATION_ONLY and flag.value != flag.default:
        value = (",".join(flag.value) if isinstance(flag.value, list)
                 else flag.value)
        s += f".{name[len(FLAGS.model) + 1:]}{value}"
  return s


# Variant options that change how a trained run is computed or evaluated,
# not what it learns: a run can be tested with either value.
_EVALUATION_ONLY = ("anil_cache_features", "mamlpp_bnrs_eval")


def _variant_flags() -> list[str]:
  """``--model``'s own flags (``--metasgd_*`` for metasgd, ...)."""
  return sorted(name for name in FLAGS if name.startswith(FLAGS.model + "_"))


# The flags that decide what a run learns (besides --model, --seed and the
# variant's own flags): one run directory holds one such configuration.
_MAML_IDENTITY = ("datasource", "num_classes", "baseline",
                  "pretrain_iterations", "meta_batch_size", "meta_lr",
                  "num_updates", "norm", "num_filters", "conv", "max_pool",
                  "stop_grad", "precision", "loss_scale", "num_query",
                  "rotation")
_LEO_IDENTITY = ("dataset_name", "embedding_crop", "train_on_val",
                 "num_classes", "num_tr_examples_per_class",
                 "num_val_examples_per_class", "total_examples_per_class",
                 "num_latents", "inner_unroll_length",
                 "finetuning_unroll_length", "inner_lr_init",
                 "finetuning_lr_init", "dropout_rate", "kl_weight",
                 "encoder_penalty_weight", "l2_penalty_weight",
                 "orthogonality_penalty_weight", "metatrain_batch_size",
                 "outer_lr", "gradient_threshold", "gradient_norm_threshold",
                 "use_64bits_dtype", "metavalid_batch_size",
                 "num_metavalid_batches")


def _training_identity(values: dict) -> dict:
  """The values, in a ``flags.json``-style dict, of the flags that decide
  what a run learns.

  For the MAML family the training K and step size are the resolved
  ``--train_update_*`` values, so a run can be tested with another K or step
  size, as in the original.
  """
  model = values.get("model")
  if model == "leo":
    names = ["model", "seed", *_LEO_IDENTITY]
  else:  # and the variant's own flags (--mamlpp_*, ...)
    names = ["model", "seed", *_MAML_IDENTITY] + [
        n for n in values
        if n.startswith(f"{model}_") and n not in _EVALUATION_ONLY]
  identity = {n: values[n] for n in names if n in values}
  if model != "leo":
    for name in ("update_batch_size", "update_lr"):
      if name in values:
        train = values.get(f"train_{name}", -1)
        identity[f"train_{name}"] = values[name] if train == -1 else train
  return identity


def _check_writable_directory(path: str, flag: str) -> None:
  """Refuses a run directory that is a file, or that cannot be written or
  created, before anything runs (it used to be a traceback from TensorFlow's
  summary writer)."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise app.UsageError(f"{flag}: cannot use the run directory {path}: "
                         f"{existing} is a file, not a directory.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise app.UsageError(f"{flag}: cannot use the run directory {path}: "
                         f"{existing} is not writable.")


def _check_run_directory(run_dir: str, flag: str, training: bool) -> None:
  """Refuses to resume or test a run directory whose ``flags.json`` shows a
  run trained with other values of the flags that decide what it learns, and
  to train afresh (``--resume=False``) over a run's checkpoints.

  Args:
    run_dir: the run directory.
    flag: the flag that chose it, for the message (--logdir or
      --checkpoint_path).
    training: the command trains (else it only evaluates).
  """
  from maml_tf import training as training_lib
  _check_writable_directory(run_dir, flag)
  checkpoints = os.path.join(run_dir, "checkpoints")
  if training and not FLAGS.resume and (
      os.path.exists(os.path.join(checkpoints, "checkpoint")) or
      training_lib.checkpoints_in(checkpoints)):
    raise app.UsageError(
        f"--resume=False: run directory {run_dir} already holds a run's "
        "checkpoints, which a new run would overwrite in part; choose "
        f"another {flag} (or delete the old run).")
  path = os.path.join(run_dir, "flags.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = _training_identity(json.load(f))
  except (OSError, ValueError) as e:
    raise app.UsageError(f"{path}: unreadable ({e}); it records the flags of "
                         "the run in this directory.") from None
  current = _training_identity({name: FLAGS[name].value for name in FLAGS})
  diff = [f"--{n}={saved[n]} there, {current[n]} here" for n in saved
          if n in current and saved[n] != current[n]]
  if diff:
    raise app.UsageError(
        f"run directory {run_dir} holds a run trained with other flags: "
        f"{'; '.join(diff)} (its flags.json). Use that run's values or "
        f"another {flag}.")


def save_flags(run_dir: str) -> None:
  """Writes the resolved flags as a flagfile and as JSON, atomically."""
  from maml_tf.io_utils import atomic_write
  module_flags = FLAGS.get_flags_for_module(__name__)
  values = {f.name: f.value for f in module_flags}
  atomic_write(os.path.join(run_dir, "flags.txt"),
               "".join(f.serialize() + "\n" for f in module_flags
                       if f.serialize()))
  atomic_write(os.path.join(run_dir, "flags.json"),
               json.dumps(values, indent=1, sort_keys=True, default=str))


def flags_markdown() -> str:
  rows = [f"| {f.name} | {f.value} |"
          for f in FLAGS.get_flags_for_module(__name__)]
  return "| flag | value |\n|---|---|\n" + "\n".join(rows)


def record_flags(run_dir: str, trainer) -> None:
  """The run's flags as files in ``run_dir`` and as a TensorBoard text
  summary (MAML family and LEO alike)."""
  save_flags(run_dir)
  trainer.write_text("flags", flags_markdown())


# ------------------------------------------------------------ validation
def _check_flags() -> None:
  if FLAGS.norm not in ("batch_norm", "layer_norm", "None"):
    raise app.UsageError(f"--norm={FLAGS.norm!r}: expected batch_norm, "
                         "layer_norm or None.")
  if FLAGS.baseline not in (None, "oracle"):
    raise app.UsageError(f"--baseline={FLAGS.baseline!r}: expected oracle or "
                         "unset.")
  if FLAGS.baseline == "oracle" and FLAGS.datasource != "sinusoid":
    raise app.UsageError("--baseline=oracle needs --datasource=sinusoid.")
  for name in ("meta_batch_size", "update_batch_size", "num_classes",
               "num_test_tasks", "test_batch_size", "num_filters"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
  if FLAGS.num_updates < 1:
    raise app.UsageError(f"--num_updates must be >= 1, got {FLAGS.num_updates}")
  for name in ("metatrain_iterations", "pretrain_iterations"):
    if getattr(FLAGS, name) < 0:
      raise app.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
  # Comparisons written so that NaN fails them.
  if not 0 < FLAGS.meta_lr < math.inf:
    raise app.UsageError(f"--meta_lr must be > 0 and finite, got "
                         f"{FLAGS.meta_lr}")
  if not 0 <= FLAGS.update_lr < math.inf:
    raise app.UsageError(f"--update_lr must be >= 0 and finite, got "
                         f"{FLAGS.update_lr}")
  if not (FLAGS.train_update_batch_size == -1 or
          FLAGS.train_update_batch_size >= 1):
    raise app.UsageError("--train_update_batch_size must be >= 1 (or -1: "
                         "--update_batch_size), got "
                         f"{FLAGS.train_update_batch_size}")
  if not (FLAGS.train_update_lr == -1 or
          0 <= FLAGS.train_update_lr < math.inf):
    raise app.UsageError("--train_update_lr must be >= 0 and finite (or -1: "
                         f"--update_lr), got {FLAGS.train_update_lr}")
  if FLAGS.test_num_updates < -1:
    raise app.UsageError(f"--test_num_updates must be >= 0 (or -1: the "
                         f"original's rule), got {FLAGS.test_num_updates}")
  if not (FLAGS.val_num_tasks == -1 or FLAGS.val_num_tasks >= 1):
    raise app.UsageError("--val_num_tasks must be >= 1 (or -1: one "
                         f"meta-batch), got {FLAGS.val_num_tasks}")
  if FLAGS.test_ensemble < 0:
    raise app.UsageError("--test_ensemble must be >= 0 (0: the final "
                         f"checkpoint alone), got {FLAGS.test_ensemble}")
  if FLAGS.test_ensemble and FLAGS.test_iter > 0:
    raise app.UsageError(f"--test_iter={FLAGS.test_iter} tests one "
                         "checkpoint; --test_ensemble="
                         f"{FLAGS.test_ensemble} the best-validated ones: "
                         "give one of them")
  if FLAGS.test_ensemble and (_is_sinusoid() or FLAGS.train and (
      not FLAGS.val_interval or
      _last_validation() <= FLAGS.pretrain_iterations)):
    raise app.UsageError(
        f"--test_ensemble={FLAGS.test_ensemble} ranks checkpoints by "
        "meta-validation accuracy: it needs a classification datasource "
        "and a meta-validation while meta-training (every --val_interval "
        f"steps; got --datasource={FLAGS.datasource}, --val_interval="
        f"{FLAGS.val_interval}, --metatrain_iterations="
        f"{FLAGS.metatrain_iterations})")
  _loss_scale()
  from maml_tf import image_data
  if FLAGS.datasource not in ("sinusoid",) + image_data.DATASOURCES:
    raise app.UsageError(f"--datasource={FLAGS.datasource!r}: expected "
                         "sinusoid, omniglot, miniimagenet or quickdraw.")
  if _is_sinusoid():
    for name in ("num_query", "num_query_test"):
      if getattr(FLAGS, name) != -1:
        raise app.UsageError(f"--{name} applies to the image datasources, "
                             "not sinusoid.")
  elif FLAGS.num_classes < 2:  # one class: every prediction is right
    raise app.UsageError(f"--num_classes must be >= 2 for "
                         f"--datasource={FLAGS.datasource}, got "
                         f"{FLAGS.num_classes}")
  elif not FLAGS.data_path:
    raise app.UsageError(
        f"--datasource={FLAGS.datasource} needs --data_path=<prepared "
        "cache>; prepare it with: "
        f"{image_data.PREPARE_COMMANDS[FLAGS.datasource]}")


# ----------------------------------------------------------- MAML family
def _is_sinusoid() -> bool:
  return FLAGS.datasource == "sinusoid"


def _last_validation() -> int:
  """The last step that meta-validates (the training loop validates when the
  step is a multiple of ``--val_interval``, after pretraining)."""
  total = FLAGS.pretrain_iterations + FLAGS.metatrain_iterations
  return total - total % FLAGS.val_interval


def _test_num_updates() -> int:
  """Inner steps at test: the original's ``max(test_num_updates,
  num_updates)`` with its test-time ``test_num_updates`` of 10, unless the
  flag sets them."""
  if FLAGS.test_num_updates == -1:
    return max(10, FLAGS.num_updates)
  return FLAGS.test_num_updates


def _train_eval_updates() -> int:
  """Inner steps in the meta-train/meta-val summaries while training: the
  original's ``max(test_num_updates, num_updates)`` with its training-time
  ``test_num_updates`` (sinusoid 5, miniimagenet 1, omniglot 10)."""
  during_training = {"sinusoid": 5, "miniimagenet": 1}.get(FLAGS.datasource,
                                                           10)
  return max(FLAGS.num_updates, during_training)


def _task_sources():
  """(train, val, test) task sources for ``--datasource``."""
  from maml_tf import sinusoid
  if _is_sinusoid():
    config = sinusoid.SinusoidConfig(num_shots=FLAGS.update_batch_size,
                                     oracle=FLAGS.baseline == "oracle",
                                     seed=FLAGS.seed)
    return tuple(sinusoid.SinusoidTasks(config, split)
                 for split in ("train", "val", "test"))
  from maml_tf import image_data
  try:
    config = image_data.ImageTasksConfig(
        data_path=FLAGS.data_path, datasource=FLAGS.datasource,
        num_classes=FLAGS.num_classes, num_shots=FLAGS.update_batch_size,
        num_query=FLAGS.num_query, num_query_test=FLAGS.num_query_test,
        rotation=FLAGS.rotation, seed=FLAGS.seed)
    # --train=False evaluates the val split (unless --test_set) as a
    # meta-test: with the meta-test query size, as the original.
    return image_data.task_sources(config, val_meta_test=not FLAGS.train)
  except image_data.CacheError as e:  # no cache there, or a damaged one
    raise app.UsageError(f"--data_path: {e}") from e
  except ValueError as e:  # too few classes or examples for the flags
    raise app.UsageError(str(e)) from e


def _build_model():
  import math

  from maml_tf import models
  if _is_sinusoid():
    return models.build("mlp_sinusoid",
                        input_dim=3 if FLAGS.baseline == "oracle" else 1,
                        norm=FLAGS.norm, seed=FLAGS.seed,
                        **_family_model_kwargs())
  from maml_tf import image_data
  shape = tuple(image_data.read_index(FLAGS.data_path,
                                      FLAGS.datasource)["image_shape"])
  if not FLAGS.conv:  # the original's fully connected net, any image size
    return models.build("mlp_omniglot", num_classes=FLAGS.num_classes,
                        norm=FLAGS.norm, input_dim=math.prod(shape),
                        seed=FLAGS.seed, **_family_model_kwargs())
  name = ("conv4_miniimagenet" if FLAGS.datasource == "miniimagenet" else
          "conv4_omniglot")
  return models.build(name, num_classes=FLAGS.num_classes, norm=FLAGS.norm,
                      num_filters=FLAGS.num_filters, max_pool=FLAGS.max_pool,
                      image_shape=shape, seed=FLAGS.seed,
                      **_family_model_kwargs())


def _family_model_kwargs() -> dict:
  """Network options: ``--precision`` and ``--loss_scale``, and MAML++'s
  per-step batch-norm weights and biases learn a scale gamma too (HTTYM's
  MetaBatchNormLayer)."""
  kwargs = {"compute_dtype": FLAGS.precision, "loss_scale": _loss_scale()}
  if FLAGS.model == "mamlpp" and FLAGS.mamlpp_bnwb:
    kwargs["norm_scale"] = True
  return kwargs


def _loss_scale() -> str | float | None:
  """``--loss_scale`` as ``models.build`` takes it (None: no scaling)."""
  from maml_tf import precision
  if FLAGS.loss_scale == "auto":
    return precision.DYNAMIC if FLAGS.precision == "float16" else None
  try:
    scale = precision.parse_loss_scale(FLAGS.loss_scale)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if scale is not None and FLAGS.precision != "float16":
    raise app.UsageError(f"--loss_scale={FLAGS.loss_scale} applies to "
                         "--precision=float16 only (bfloat16 has float32's "
                         "exponent range and needs no scaling).")
  return scale


def _metasgd_init_range() -> tuple[float, float]:
  try:
    low, high = (float(v) for v in FLAGS.metasgd_init_range)
  except ValueError:
    value = ",".join(FLAGS.metasgd_init_range)
    raise app.UsageError(f"--metasgd_init_range={value}: expected two numbers "
                         "'low,high'.") from None
  return low, high


def _build_learner(model):
  """The ``--model`` learner (MAML family) around ``model``."""
  import maml_tf
  common = dict(first_order=FLAGS.stop_grad,
                num_inner_steps_eval=_train_eval_updates(),
                jit_compile=FLAGS.jit_compile)
  try:
    if FLAGS.model == "maml":
      return maml_tf.MAML(model, FLAGS.update_lr, FLAGS.num_updates, **common)
    if FLAGS.model == "anil":
      return maml_tf.ANIL(model, FLAGS.update_lr, FLAGS.num_updates,
                          cache_features=FLAGS.anil_cache_features, **common)
    if FLAGS.model == "metasgd":
      return maml_tf.MetaSGD(model, FLAGS.num_updates,
                             init_range=_metasgd_init_range(), seed=FLAGS.seed,
                             **common)
    if FLAGS.model == "mamlpp":
      config = maml_tf.MAMLPPConfig(
          multi_step_loss=FLAGS.mamlpp_msl,
          msl_epochs=FLAGS.mamlpp_msl_epochs,
          learned_step_sizes=FLAGS.mamlpp_lslr,
          per_step_norm_weights=FLAGS.mamlpp_bnwb,
          per_step_running_stats=FLAGS.mamlpp_bnrs,
          eval_with_running_stats=FLAGS.mamlpp_bnrs_eval,
          first_order_epochs=FLAGS.mamlpp_first_order_epochs,
          iterations_per_epoch=FLAGS.mamlpp_iterations_per_epoch)
      return maml_tf.MAMLPlusPlus(model, FLAGS.update_lr, FLAGS.num_updates,
                                  config=config, **common)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  raise app.UsageError(f"--model={FLAGS.model} is not a MAML-family model.")


def _train_config(run_dir: str):
  steps_per_call = FLAGS.steps_per_call
  if steps_per_call == -1:
    steps_per_call = 100 if _is_sinusoid() else 1
  if (FLAGS.model == "mamlpp" and FLAGS.mamlpp_iterations_per_epoch %
      steps_per_call and (FLAGS.mamlpp_msl and FLAGS.mamlpp_msl_epochs
                          or FLAGS.mamlpp_first_order_epochs)):
    raise app.UsageError(
        f"--mamlpp_iterations_per_epoch={FLAGS.mamlpp_iterations_per_epoch} "
        f"must be a multiple of --steps_per_call={steps_per_call}: MAML++ "
        "compiles one meta-step per phase (MSL, first order), and its phases "
        "change at epoch boundaries")
  print_interval = FLAGS.print_interval
  if print_interval == -1:
    print_interval = 1000 if _is_sinusoid() else 100
  pretrain, metatrain = FLAGS.pretrain_iterations, FLAGS.metatrain_iterations
  if FLAGS.baseline == "oracle":
    # The original's oracle moves every meta-training iteration into
    # pretraining: Adam on the loss of the amplitude- and phase-aware input.
    pretrain, metatrain = pretrain + metatrain, 0
  try:
    return _make_train_config(run_dir, pretrain, metatrain, print_interval,
                              steps_per_call)
  except ValueError as e:  # in TrainConfig's names: give the flags' names
    message = str(e)
    for field, flag in [("log_every", "--summary_interval"),
                        ("print_every", "--print_interval"),
                        ("val_every", "--val_interval"),
                        ("save_every", "--save_interval"),
                        ("pretrain_iterations", "--pretrain_iterations"),
                        ("max_to_keep", "--max_checkpoints"),
                        ("steps_per_call", "--steps_per_call"),
                        ("tasks_per_chunk", "--tasks_per_chunk"),
                        ("meta_batch_size=", "--meta_batch_size=")]:
      message = message.replace(field, flag)
    if "--steps_per_call" in message:
      message += (" (--steps_per_call meta-steps run per compiled call: 100 "
                  "by default for the sinusoid, else 1)")
    raise app.UsageError(message) from None


def _make_train_config(run_dir: str, pretrain: int, metatrain: int,
                       print_interval: int, steps_per_call: int):
  from maml_tf.training import TrainConfig
  return TrainConfig(
      run_dir=run_dir,
      num_iterations=metatrain,
      pretrain_iterations=pretrain,
      meta_batch_size=FLAGS.meta_batch_size,
      meta_lr=FLAGS.meta_lr,
      lr_schedule=("cosine" if FLAGS.model == "mamlpp" and
                   FLAGS.mamlpp_cosine_lr else "constant"),
      min_meta_lr=FLAGS.mamlpp_min_meta_lr,
      clip_value=10.0 if FLAGS.datasource == "miniimagenet" else 0.0,
      log_every=FLAGS.summary_interval,
      print_every=print_interval,
      val_every=FLAGS.val_interval,
      val_num_tasks=None if FLAGS.val_num_tasks == -1 else FLAGS.val_num_tasks,
      # HTTYM ranks its epochs on the same validation tasks.
      val_fixed_tasks=FLAGS.test_ensemble > 0,
      keep_best="query_accuracy" if FLAGS.test_ensemble else None,
      keep_top=FLAGS.test_ensemble,
      save_every=FLAGS.save_interval,
      max_to_keep=FLAGS.max_checkpoints,
      steps_per_call=steps_per_call,
      tasks_per_chunk=FLAGS.tasks_per_chunk,
      jit_compile=FLAGS.jit_compile,
      resume=FLAGS.resume,
      seed=FLAGS.seed,
      log=FLAGS.log)


def _evaluate_and_report(learner, trainer, source, split: str) -> None:
  """The original's ``test()``: per-step metrics over ``--num_test_tasks``
  tasks, written as CSV/JSON/NPZ and printed as a table."""
  from maml_tf import evaluation
  steps = _test_num_updates()
  step = int(trainer.step.numpy())
  logging.info("Evaluating on %d %s tasks, %d inner steps...",
               FLAGS.num_test_tasks, split, steps)
  batch_size = min(FLAGS.test_batch_size, FLAGS.num_test_tasks)
  if FLAGS.test_ensemble:
    members = _ensemble_restores(trainer)
    result = evaluation.evaluate_ensemble(
        lambda batch: learner.evaluate(batch, num_steps=steps,
                                       return_outputs=True),
        members, source, FLAGS.num_test_tasks, batch_size,
        jit_compile=FLAGS.jit_compile)
  else:
    result = evaluation.evaluate(
        lambda batch: learner.evaluate(batch, num_steps=steps), source,
        FLAGS.num_test_tasks, batch_size, jit_compile=FLAGS.jit_compile)
  result.warn_nonfinite()
  # An ensemble's names count the members there were (a warning if fewer).
  kind = f"{split}_ensemble{len(members)}" if FLAGS.test_ensemble else split
  basename = (f"{kind}_ubs{FLAGS.update_batch_size}"
              f"_stepsize{_float_str(FLAGS.update_lr)}")
  if not FLAGS.train and FLAGS.test_iter > 0:  # keep the final results
    basename += f"_iter{FLAGS.test_iter}"
  paths = result.write(trainer.config.run_dir, basename)
  if split == "test":  # the test-split means, as LEO's metatest/ scalars
    trainer.write_eval_summaries("metatest", result.values, step)
    trainer.writer.flush()
  table = result.table()
  print(f"\n{split} results after {step} iterations "
        f"({FLAGS.num_test_tasks} tasks, {result.seconds:.1f} s):\n{table}\n"
        f"written to {paths[0]}, {paths[1]}", flush=True)


def _ensemble_restores(trainer) -> list:
  """``--test_ensemble``: a function per kept checkpoint that restores it."""
  from maml_tf import training
  run_dir = trainer.config.run_dir
  top = training.top_checkpoints(run_dir)[:FLAGS.test_ensemble]
  if not top:
    raise app.UsageError(
        f"--test_ensemble={FLAGS.test_ensemble}: {run_dir} kept no "
        "best-validated checkpoints (top_checkpoints/); they are kept at "
        "each meta-validation of a training run with --test_ensemble")
  if len(top) < FLAGS.test_ensemble:
    logging.warning("--test_ensemble=%d: only %d meta-validations were "
                    "kept; the ensemble has %d members.", FLAGS.test_ensemble,
                    len(top), len(top))
  logging.info("Ensemble: the checkpoints of steps %s (meta-validation "
               "accuracies %s).", [e["step"] for e in top],
               [round(e["value"], 4) for e in top])
  return [lambda path=e["path"]: trainer.restore(path, weights_only=True)
          for e in top]


def _maml_main() -> None:
  import tensorflow as tf

  from maml_tf import io_utils, training
  _check_flags()
  tf.random.set_seed(FLAGS.seed)
  run_dir = os.path.join(FLAGS.logdir, experiment_string())
  _check_run_directory(run_dir, "--logdir", training=FLAGS.train)
  config = _train_config(run_dir)
  if not FLAGS.train:  # never silently evaluate random weights (the original)
    _test_checkpoint(run_dir)  # (fails before the data loads; chosen below)
    if not FLAGS.test_set:  # writes no scalars: no empty TensorBoard file
      config = dataclasses.replace(config, log=False)
  train_source, val_source, test_source = _task_sources()
  learner = _build_learner(_build_model())
  # Only now, with the flags and the data checked, does the run directory
  # get anything (the lock; the Trainer's TensorBoard file). The lock comes
  # first, so a run that is refused writes nothing else: exclusive to train;
  # shared to test, with the checkpoint chosen under it (not one a training
  # run has since replaced).
  with io_utils.run_directory_lock(run_dir, exclusive=FLAGS.train):
    trainer = training.Trainer(learner, config)
    if FLAGS.train:
      with _stop_on_signals(trainer) as stopped_by:
        record_flags(run_dir, trainer)
        result = trainer.train(train_source, val_source)
      logging.info("Training done: %s", result)
      _exit_if_stopped(result, stopped_by)
      if FLAGS.test_after_train:
        _evaluate_and_report(learner, trainer, test_source, "test")
      return
    trainer.restore(_test_checkpoint(run_dir))
    split = "test" if FLAGS.test_set else "val"
    _evaluate_and_report(learner, trainer,
                         test_source if FLAGS.test_set else val_source, split)


class _Signalled(KeyboardInterrupt):
  """SIGTERM or SIGINT outside training (or a second one during it)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def _stop_on_signals(trainer):
  """While training: SIGTERM (a scheduler preempting the job) and SIGINT
  (Ctrl-C) end it after the current call, with a checkpoint of the step
  reached; a second signal stops at once. They used to stop it at once, with
  a traceback from inside TensorFlow (SIGINT) or no message (SIGTERM), and
  the steps since the last checkpoint lost.

  Yields:
    A list that gets the number of the signal that stopped training.
  """
  import signal
  received = []

  def handler(signum, frame):
    if received or not trainer.in_training:  # (LEO: validating, testing)
      raise _Signalled(signum)
    received.append(signum)
    trainer.stop_requested.set()
    logging.warning("%s: stopping after the current call, with a checkpoint "
                    "(send it again to stop at once).",
                    signal.Signals(signum).name)

  previous = {}
  for s in (signal.SIGTERM, signal.SIGINT):
    if signal.getsignal(s) is not signal.SIG_IGN:  # (a background job's)
      previous[s] = signal.signal(s, handler)
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _exit_if_stopped(result: dict | None, stopped_by: list) -> None:
  """Ends the process as the signal that stopped training asked (exit status
  128 + its number, so a scheduler sees the job unfinished), in one line."""
  if result and stopped_by:  # (also when the signal came in the last call)
    import signal
    sys.stderr.write(
        f"runner.py: stopped by {signal.Signals(stopped_by[0]).name} at step "
        f"{result['step']}, with a checkpoint; the same command resumes.\n")
    sys.exit(128 + stopped_by[0])


def _test_checkpoint(run_dir: str) -> str:
  """The checkpoint ``--train=False`` evaluates: ``--test_iter``'s, else the
  latest."""
  import tensorflow as tf
  directory = os.path.join(run_dir, "checkpoints")
  if FLAGS.test_iter > 0:
    path = os.path.join(directory, f"model-{FLAGS.test_iter}")
    if not tf.io.gfile.exists(path + ".index"):
      raise app.UsageError(f"--test_iter={FLAGS.test_iter}: no checkpoint "
                           f"{path}.")
    return path
  from maml_tf import training
  paths = training.checkpoints_in(directory)
  if not paths:
    raise app.UsageError(f"--train=False: no checkpoint in {directory}; "
                         "train first, or check --logdir and the flags that "
                         "name the run directory.")
  return paths[-1]


# ------------------------------------------------------------------ LEO
_MAML_FLAGS = frozenset(FLAGS) - _SHARED_FLAGS
# deepmind/leo config.py, verbatim (data_path and num_classes are shared, above)
flags.DEFINE_string(
    "dataset_name", "miniImageNet", "Name of the dataset to "
    "train on, which will be mapped to data.MetaDataset.")
flags.DEFINE_string(
    "embedding_crop", "center", "Type of the cropping, which "
    "will be mapped to data.EmbeddingCrop.")
flags.DEFINE_boolean("train_on_val", False, "Whether to train on the "
                     "validation data.")
flags.DEFINE_integer(
    "inner_unroll_length", 5, "Number of unroll steps in the "
    "inner loop of leo (number of adaptation steps in the "
    "latent space).")
flags.DEFINE_integer(
    "finetuning_unroll_length", 5, "Number of unroll steps "
    "in the loop performing finetuning (number of adaptation "
    "steps in the parameter space).")
flags.DEFINE_integer("num_latents", 64, "The dimensionality of the latent "
                     "space.")
flags.DEFINE_float(
    "inner_lr_init", 1.0, "The initialization value for the "
    "learning rate of the inner loop of leo.")
flags.DEFINE_float(
    "finetuning_lr_init", 0.001, "The initialization value for "
    "learning rate of the finetuning loop.")
flags.DEFINE_float("dropout_rate", 0.5, "Rate of dropout: probability of "
                   "dropping a given unit.")
flags.DEFINE_float(
    "kl_weight", 1e-3, "The weight measuring importance of the "
    "KL in the final loss. β in the paper.")
flags.DEFINE_float(
    "encoder_penalty_weight", 1e-9, "The weight measuring "
    "importance of the encoder penalty in the final loss. γ in "
    "the paper.")
flags.DEFINE_float("l2_penalty_weight", 1e-8, "The weight measuring the "
                   "importance of the l2 regularization in the final loss. λ₁ "
                   "in the paper.")
flags.DEFINE_float("orthogonality_penalty_weight", 1e-3, "The weight measuring "
                   "the importance of the decoder orthogonality regularization "
                   "in the final loss. λ₂ in the paper.")
flags.DEFINE_integer(
    "num_tr_examples_per_class", 1, "Number of training samples per class, "
    "K in K-shot classification.")
flags.DEFINE_integer(
    "num_val_examples_per_class", 15, "Number of validation samples per class "
    "in a task instance.")
flags.DEFINE_integer("metatrain_batch_size", 12, "Number of problem instances "
                     "in a batch.")
flags.DEFINE_integer("metavalid_batch_size", 200, "Number of meta-validation "
                     "problem instances.")
flags.DEFINE_integer("metatest_batch_size", 200, "Number of meta-testing "
                     "problem instances.")
flags.DEFINE_integer("num_steps_limit", int(1e5), "Number of steps to train "
                     "for.")
flags.DEFINE_float("outer_lr", 1e-4, "Outer (metatraining) loop learning "
                   "rate.")
flags.DEFINE_float(
    "gradient_threshold", 0.1, "The cutoff for the gradient "
    "clipping. Gradients will be clipped to "
    "[-gradient_threshold, gradient_threshold]")
flags.DEFINE_float(
    "gradient_norm_threshold", 0.1, "The cutoff for clipping of "
    "the gradient norm. Gradient norm clipping will be applied "
    "after pointwise clipping (described above).")
# deepmind/leo runner.py, verbatim
flags.DEFINE_string("checkpoint_path", "/tmp/leo", "Path to restore from and "
                    "save to checkpoints.")
flags.DEFINE_integer(
    "checkpoint_steps", 1000, "The frequency, in number of "
    "steps, of saving the checkpoints.")
flags.DEFINE_boolean("evaluation_mode", False, "Whether to run in an "
                     "evaluation-only mode.")

# ------------------------------------------------------- additions (LEO)
flags.DEFINE_integer("total_examples_per_class", 600,
                     "Images per class in a meta-validation/test task, "
                     "support included (hard-coded 600 in the original).")
flags.DEFINE_integer("num_metavalid_batches", 10,
                     "Meta-validation batches per validation (the original: "
                     "10).")
flags.DEFINE_integer("num_metatest_tasks", 10000,
                     "Test tasks in --evaluation_mode, in whole "
                     "--metatest_batch_size batches (the original: 10000).")
flags.DEFINE_integer("eval_batch_size", 10,
                     "Tasks per compiled evaluation call: bounds memory, does "
                     "not change results.")
flags.DEFINE_boolean("use_64bits_dtype", False,
                     "Build LEO in float64 (the original's model default; its "
                     "runner uses float32).")
flags.DEFINE_string("leo_synthetic_dir", "~/.cache/maml_tf/leo_synthetic",
                    "Where the demo's synthetic embeddings are generated "
                    "(once) when --data_path is not set.")

_LEO_FLAGS = frozenset(FLAGS) - _SHARED_FLAGS - _MAML_FLAGS
# Flags of the MAML section that LEO reads too.
_READ_BY_LEO = frozenset({"steps_per_call", "test_after_train", "resume",
                          "log"})
# What a user of one family probably meant, in the other's flag names.
_COUNTERPARTS = {"train": "evaluation_mode", "logdir": "checkpoint_path",
                 "meta_lr": "outer_lr", "metatrain_iterations":
                 "num_steps_limit", "meta_batch_size": "metatrain_batch_size",
                 "update_batch_size": "num_tr_examples_per_class",
                 "save_interval": "checkpoint_steps",
                 "num_test_tasks": "num_metatest_tasks"}
_COUNTERPARTS.update({v: k for k, v in _COUNTERPARTS.items()})


def _flag_owner(name: str) -> str | None:
  """Which ``--model`` values read ``--name``, when not all of them do."""
  if name in _LEO_FLAGS:
    return "--model=leo"
  if name in _MAML_FLAGS - _READ_BY_LEO:
    variant = name.split("_")[0]
    if variant != "maml" and variant in FLAGS["model"].parser.enum_values:
      return f"--model={variant}"  # a variant's own flag: --anil_*, ...
    return "the MAML-family models"
  return None


def _check_family_flags() -> None:
  """A flag that ``--model`` does not read, set away from its default, is an
  error: it would otherwise be silently ignored. (Flagfiles written by
  ``save_flags`` hold every flag at its value, hence the default test.)"""
  problems, hints = [], []
  for name in sorted(FLAGS):
    flag, owner = FLAGS[name], _flag_owner(name)
    if (owner is None or not flag.present or flag.value == flag.default or
        owner == f"--model={FLAGS.model}" or
        owner == "the MAML-family models" and FLAGS.model != "leo"):
      continue
    problems.append(f"--{name} applies to {owner} only")
    if name in _COUNTERPARTS:
      hints.append(f"--{_COUNTERPARTS[name]} instead of --{name}")
  if problems:
    raise app.UsageError(
        f"{'; '.join(problems)}, not --model={FLAGS.model}"
        + (f" (use {', '.join(hints)})" if hints else "") + ".")


def _leo_demo_checkpoint_path() -> str:
  """The demo's run directory, one per user: the temporary directory is shared
  by everyone on a machine, and another user's demo run would be resumed,
  re-tested or refused instead of running yours."""
  try:
    user = getpass.getuser()
  except (KeyError, OSError):  # no passwd entry, as in some containers
    user = str(os.getuid())
  return os.path.join(tempfile.gettempdir(), f"leo_synthetic_demo_{user}")


# Without --data_path: a short run on synthetic embeddings, for the flags the
# user did not set. Everything else keeps the original's defaults.
# (--checkpoint_path gets _leo_demo_checkpoint_path(), found only for the demo.)
_LEO_DEMO = {
    "total_examples_per_class": 200,
    "num_steps_limit": 1000,
    "checkpoint_steps": 250,
    "metavalid_batch_size": 100,
    "num_metavalid_batches": 2,
    "metatest_batch_size": 100,
    "num_metatest_tasks": 1000,
    "eval_batch_size": 20,
}


def _leo_apply_demo_defaults() -> None:
  """Sets the demo's values of the flags the user did not set."""
  changed = {}
  demo = {"checkpoint_path": _leo_demo_checkpoint_path(), **_LEO_DEMO}
  for name, value in demo.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value
      changed[name] = value
  logging.info("No --data_path: LEO demo on synthetic miniImageNet-format "
               "embeddings (not the paper's task). Demo values for flags you "
               "did not set: %s", ", ".join(f"--{k}={v}" for k, v in
                                            changed.items()) or "none")


def _leo_configs(data_path: str):
  from leo import config as leo_config
  data = leo_config.DataConfig(
      data_path=data_path, dataset_name=FLAGS.dataset_name,
      embedding_crop=FLAGS.embedding_crop, train_on_val=FLAGS.train_on_val,
      total_examples_per_class=FLAGS.total_examples_per_class)
  model = leo_config.ModelConfig(
      inner_unroll_length=FLAGS.inner_unroll_length,
      finetuning_unroll_length=FLAGS.finetuning_unroll_length,
      num_latents=FLAGS.num_latents, inner_lr_init=FLAGS.inner_lr_init,
      finetuning_lr_init=FLAGS.finetuning_lr_init,
      dropout_rate=FLAGS.dropout_rate, kl_weight=FLAGS.kl_weight,
      encoder_penalty_weight=FLAGS.encoder_penalty_weight,
      l2_penalty_weight=FLAGS.l2_penalty_weight,
      orthogonality_penalty_weight=FLAGS.orthogonality_penalty_weight,
      num_classes=FLAGS.num_classes,
      dtype="float64" if FLAGS.use_64bits_dtype else "float32",
      seed=FLAGS.seed)
  outer = leo_config.OuterConfig(
      num_classes=FLAGS.num_classes,
      num_tr_examples_per_class=FLAGS.num_tr_examples_per_class,
      num_val_examples_per_class=FLAGS.num_val_examples_per_class,
      metatrain_batch_size=FLAGS.metatrain_batch_size,
      metavalid_batch_size=FLAGS.metavalid_batch_size,
      metatest_batch_size=FLAGS.metatest_batch_size,
      num_steps_limit=FLAGS.num_steps_limit, outer_lr=FLAGS.outer_lr,
      gradient_threshold=FLAGS.gradient_threshold,
      gradient_norm_threshold=FLAGS.gradient_norm_threshold,
      checkpoint_path=FLAGS.checkpoint_path,
      checkpoint_steps=FLAGS.checkpoint_steps,
      evaluation_mode=FLAGS.evaluation_mode,
      num_metavalid_batches=FLAGS.num_metavalid_batches,
      num_metatest_tasks=FLAGS.num_metatest_tasks,
      eval_batch_size=FLAGS.eval_batch_size)
  return data, model, outer


def _leo_main() -> None:
  if FLAGS.precision != "float32" or FLAGS.loss_scale != "auto":
    raise app.UsageError("--precision and --loss_scale apply to the "
                         "MAML-family models; LEO runs in float32 (or float64: "
                         "--use_64bits_dtype).")
  demo = FLAGS.data_path is None
  if demo:
    _leo_apply_demo_defaults()
  if FLAGS.evaluation_mode:  # (it writes the test results there)
    _check_writable_directory(FLAGS.checkpoint_path, "--checkpoint_path")
  else:
    _check_run_directory(FLAGS.checkpoint_path, "--checkpoint_path",
                         training=True)
  if demo:
    from leo import synthetic
    data_path = synthetic.ensure_synthetic_embeddings(FLAGS.leo_synthetic_dir)
  else:
    data_path = FLAGS.data_path
  try:
    data_config, model_config, outer = _leo_configs(data_path)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  import tensorflow as tf

  from leo import experiment
  tf.random.set_seed(FLAGS.seed)
  steps_per_call = 1 if FLAGS.steps_per_call == -1 else FLAGS.steps_per_call
  with contextlib.ExitStack() as signals:
    stopped_by = []

    def before_training(trainer):
      # Once the data has loaded: a failing command leaves the flags of the
      # run already in the directory as they were.
      record_flags(outer.checkpoint_path, trainer)
      stopped_by.append(signals.enter_context(_stop_on_signals(trainer)))

    try:
      results = experiment.run(
          data_config, model_config, outer, seed=FLAGS.seed,
          jit_compile=FLAGS.jit_compile, steps_per_call=steps_per_call,
          test_after_train=FLAGS.test_after_train, log=FLAGS.log,
          before_training=before_training)
    except experiment.DATA_ERRORS as e:
      raise app.UsageError(str(e)) from e
  _exit_if_stopped(results["train"], stopped_by[0] if stopped_by else [])
  test = results["test"]
  if test is not None:
    print(f"\nMetatest accuracy: {test['accuracy']:.4f} ± {test['ci95']:.4f} "
          f"(95% CI over {test['num_tasks']} tasks; {test['which']} "
          f"checkpoint, step {test['step']}; {test['seconds']:.1f} s)"
          + (" on SYNTHETIC embeddings" if demo else "")
          + f"\nwritten to {test['paths'][0]}, {test['paths'][1]}",
          flush=True)


def _configure_xla_cache() -> None:
  """Points TensorFlow's XLA compilation cache at this machine's
  subdirectory of ``--xla_cache_dir`` (``maml_tf.xla_cache``).

  It runs after ``--xla_cpu_emitters`` has set ``XLA_FLAGS``, which are part
  of the key, and before anything is compiled (TF reads TF_XLA_FLAGS once).
  """
  if not FLAGS.xla_cache_dir:
    return
  from maml_tf import xla_cache
  try:
    path = xla_cache.configure(FLAGS.xla_cache_dir)
  except OSError as e:
    raise app.UsageError(
        f"--xla_cache_dir={FLAGS.xla_cache_dir}: cannot use it as the XLA "
        f"cache ({e}); expected a writable directory, or '' for no cache")
  logging.info("XLA cache: %s (--xla_cache_dir)",
               path or f"as TF_XLA_FLAGS sets it ({os.environ['TF_XLA_FLAGS']})")


def _configure_xla_emitters() -> None:
  """Applies ``--xla_cpu_emitters`` (before anything is compiled)."""
  choice = FLAGS.xla_cpu_emitters
  if choice == "auto":
    choice = "fusion" if FLAGS.model == "leo" or _is_sinusoid() else "classic"
  maml_tf.use_xla_cpu_fusion_emitters(choice == "fusion")
  logging.info("XLA_FLAGS: %s (--xla_cpu_emitters=%s)",
               os.environ.get("XLA_FLAGS", ""), FLAGS.xla_cpu_emitters)


def _configure_threads() -> None:
  """Applies ``--intra_op_threads`` (before TensorFlow's runtime starts)."""
  threads = FLAGS.intra_op_threads
  if threads is not None and threads < 0:
    raise app.UsageError(f"--intra_op_threads={threads}: expected 0 "
                         "(TensorFlow's default) or a number of threads")
  if threads is None:
    if (FLAGS.model == "leo" or not _is_sinusoid()
        or "TF_NUM_INTRAOP_THREADS" in os.environ):
      threads = 0
    else:
      from maml_tf import sinusoid
      threads = sinusoid.INTRA_OP_THREADS
  import tensorflow as tf
  if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
  logging.info("TensorFlow intra-op threads: %s (--intra_op_threads)",
               tf.config.threading.get_intra_op_parallelism_threads()
               or os.environ.get("TF_NUM_INTRAOP_THREADS",
                                 "TensorFlow's default, one per core"))


def _configure_tf32() -> None:
  """Applies ``--allow_tf32``: TensorFlow enables TensorFloat-32 by default,
  which on Ampere or newer GPUs silently rounds every float32 matmul and
  convolution (XLA's included) to 10-bit mantissas."""
  import tensorflow as tf
  tf.config.experimental.enable_tensor_float_32_execution(FLAGS.allow_tf32)
  logging.info("TensorFloat-32 matmuls and convolutions: %s (--allow_tf32)",
               "allowed" if FLAGS.allow_tf32 else "off, exact float32")


def _log_devices() -> None:
  import tensorflow as tf
  logging.info("TensorFlow devices: %s", ", ".join(
      d.name for d in tf.config.list_logical_devices()))
  unused = maml_tf.gpus_tensorflow_cannot_use()
  if unused:
    logging.warning(
        "The NVIDIA driver lists %d GPU(s), but TensorFlow sees none: this "
        "run uses the CPU. Install TensorFlow with CUDA: pip install "
        "\"tensorflow[and-cuda]==2.21.0\" (README, Installing).", unused)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if FLAGS.model == "fomaml":  # the original's spelling is --stop_grad
    FLAGS.model, FLAGS.stop_grad = "maml", True
  _check_family_flags()
  _configure_xla_emitters()
  _configure_xla_cache()
  _configure_threads()
  _configure_tf32()
  _log_devices()
  if FLAGS.model == "leo":
    _leo_main()
  else:
    _maml_main()


def _main(argv) -> None:
  """``main``, with a usage error reported in one line: absl would print
  the help of every flag of this module (some 300 lines) above it."""
  import signal

  from maml_tf.io_utils import (CheckpointUnreadableError,
                                RunDirectoryBusyError)

  def terminate(signum, frame):  # (training installs its own, gentler one)
    raise _Signalled(signum)

  if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
    signal.signal(signal.SIGTERM, terminate)  # one line, not a silent end
  try:
    main(argv)
  except app.UsageError as e:
    sys.stderr.write(f"runner.py: error: {e}\n(python runner.py --helpfull "
                     "lists every flag.)\n")
    sys.exit(1)
  # A damaged or busy run directory.
  except (CheckpointUnreadableError, RunDirectoryBusyError) as e:
    sys.stderr.write(f"runner.py: error: {e}\n")
    sys.exit(1)
  except KeyboardInterrupt as e:  # (a second signal, or one outside training)
    _report_interrupt(e)
  except Exception as e:  # a full disk: one line, not TensorFlow's traceback
    interrupt = e.__context__ or e.__cause__
    if isinstance(interrupt, KeyboardInterrupt):
      # (Raised inside TensorFlow's C++ code, it can come out as another
      # exception, a SystemError, with the interrupt as its context.)
      _report_interrupt(interrupt)
    if not _is_disk_full(e):
      raise
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    sys.stderr.write(f"runner.py: error: the disk is full ({first_line}); "
                     "the same command resumes from the run's last complete "
                     "checkpoint once there is space.\n")
    sys.exit(1)


def _report_interrupt(interrupt: KeyboardInterrupt) -> None:
  import signal
  signum = getattr(interrupt, "signum", signal.SIGINT)
  sys.stderr.write(f"runner.py: interrupted by {signal.Signals(signum).name};"
                   " the same command resumes from the run's last "
                   "checkpoint.\n")
  sys.exit(128 + signum)


def _is_disk_full(error: Exception) -> bool:
  if isinstance(error, OSError):
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
  tf = sys.modules.get("tensorflow")
  return (tf is not None and isinstance(error, tf.errors.OpError) and
          ("No space left on device" in str(error) or
           "Disk quota exceeded" in str(error)))


if __name__ == "__main__":
  app.run(_main)
