"""MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML").

Paper: https://arxiv.org/abs/1810.09502. Reference code:
AntreasAntoniou/HowToTrainYourMAMLPytorch (HTTYM), ``few_shot_learning_system.py``,
``inner_loop_optimizers.py`` and ``meta_neural_network_architectures.py``.

Every change to MAML is a switch of ``MAMLPPConfig``:

* MSL, multi-step loss: while ``epoch < msl_epochs`` the meta-loss is
  ``sum_j w_j(epoch) L_query(theta_{j+1})`` over the inner steps, with HTTYM's
  annealed weights (``per_step_loss_weights``); afterwards only the final
  step's query loss.
* LSLR: a learned inner learning rate per adapted weight tensor and per step
  (``[U]`` each, initialised to ``inner_lr``).
* BNWB: per-step batch-norm weights and biases: each norm parameter becomes a
  ``[U, C]`` variable and step j's forward passes use row j. Build the model
  with ``norm_scale=True`` to have a gamma as well as beta, as HTTYM does.
* BNRS: per-step batch-norm running statistics ``[U, C]`` (momentum 0.1),
  used to normalise at evaluation only with ``eval_with_running_stats``.
* DA, derivative-order annealing: first-order meta-gradients while
  ``epoch < first_order_epochs``, second order afterwards.
* Cosine annealing of the meta learning rate is the training loop's
  (``TrainConfig(lr_schedule="cosine", min_meta_lr=...)``).

An epoch is ``iterations_per_epoch`` meta-iterations (HTTYM: 500); schedules
read the ``step`` argument of ``meta_loss``. The training loop compiles one
meta-step per phase (``phase(step)``: MSL on or off, first or second order)
and passes it to ``meta_loss``. Given only a step tensor, the phases are
``tf.cond`` branches instead; XLA:CPU ran the steps after MSL 1.3x slower
that way, and TensorFlow names those branches' gradients differently in each
process, so the on-disk XLA cache missed them (README).

Running statistics (BNRS). HTTYM normalises with ``training=True`` in every
phase, so its per-step running statistics never affect results (HTTYM issues
#3, #24). Here they are tracked the same way and, by default, evaluation is
likewise transductive (current-batch statistics), which keeps HTTYM's
numerics: an inner loop meta-learned with batch statistics (and LSLR rates
tuned to them) can diverge when the statistics are frozen (measured on the
sinusoid, see the README). With ``eval_with_running_stats`` evaluation
(``evaluate``, ``adapt_and_predict``, meta-validation) normalises step j with
step j's running statistics instead (inductive), as the paper describes. The
statistics are recorded while the meta-loss runs and assigned by
``update_state``, which the training loop calls after the gradients
(``maml_tf.step_statistics``).

More evaluation than training steps (HTTYM issue #28, where per-step
parameters run out): step j >= U uses the parameters, statistics and learning
rates of step U - 1.
"""

from __future__ import annotations

import contextlib
import dataclasses

import tensorflow as tf

from maml_tf import layers as L
from maml_tf import losses
from maml_tf.maml import MAML, Params, num_tasks
from maml_tf.models import CLASSIFICATION, MetaModel
from maml_tf.step_statistics import StepStatistics, select
from maml_tf.tasks import TaskBatch


@dataclasses.dataclass(frozen=True)
class MAMLPPConfig:
  """The MAML++ switches (defaults: HTTYM's Omniglot 5-way 1-shot config).

  Attributes:
    multi_step_loss: MSL (``--mamlpp_msl``).
    msl_epochs: epochs during which MSL is used (``--mamlpp_msl_epochs``;
      HTTYM ``multi_step_loss_num_epochs`` = 10).
    learned_step_sizes: LSLR (``--mamlpp_lslr``).
    per_step_norm_weights: BNWB (``--mamlpp_bnwb``).
    per_step_running_stats: BNRS, track per-step running statistics
      (``--mamlpp_bnrs``).
    eval_with_running_stats: normalise evaluation passes with them
      (``--mamlpp_bnrs_eval``); False: current-batch statistics, as HTTYM's
      code computes.
    bn_momentum: running-statistics momentum (HTTYM: 0.1).
    first_order_epochs: DA: first order before this epoch
      (``--mamlpp_first_order_epochs``; HTTYM's
      ``first_order_to_second_order_epoch`` = N - 1; its Omniglot configs use
      -1, i.e. 0 here, the paper's text 50).
    iterations_per_epoch: meta-iterations per epoch
      (``--mamlpp_iterations_per_epoch``; HTTYM ``total_iter_per_epoch``).
  """

  multi_step_loss: bool = True
  msl_epochs: int = 10
  learned_step_sizes: bool = True
  per_step_norm_weights: bool = True
  per_step_running_stats: bool = True
  eval_with_running_stats: bool = False
  bn_momentum: float = 0.1
  first_order_epochs: int = 0
  iterations_per_epoch: int = 500

  def __post_init__(self):
    if self.msl_epochs < 0:
      raise ValueError(f"--mamlpp_msl_epochs must be >= 0, got "
                       f"{self.msl_epochs}")
    if self.first_order_epochs < 0:
      raise ValueError(f"--mamlpp_first_order_epochs must be >= 0, got "
                       f"{self.first_order_epochs}")
    if self.iterations_per_epoch < 1:
      raise ValueError(f"--mamlpp_iterations_per_epoch must be >= 1, got "
                       f"{self.iterations_per_epoch}")
    if self.eval_with_running_stats and not self.per_step_running_stats:
      raise ValueError("--mamlpp_bnrs_eval needs --mamlpp_bnrs (running "
                       "statistics to evaluate with).")
    if not 0.0 < self.bn_momentum <= 1.0:
      raise ValueError(f"bn_momentum must be in (0, 1], got "
                       f"{self.bn_momentum}")


def per_step_loss_weights(num_steps: int, msl_epochs: int, epoch,
                          dtype=tf.float32) -> tf.Tensor:
  """HTTYM's ``get_per_step_loss_importance_vector`` as a tensor ``[U]``.

  At epoch 0 every step weighs 1/U; each epoch moves 1/(U * msl_epochs) of
  weight from every non-final step to the final one, with non-final weights
  floored at 0.03/U and the final one capped at ``1 - (U-1) 0.03/U``.

  Args:
    num_steps: U.
    msl_epochs: epochs of the annealing (> 0).
    epoch: current epoch (int or scalar tensor).
    dtype: float dtype of the result.
  """
  u = float(num_steps)
  decay = 1.0 / u / max(msl_epochs, 1)
  floor = 0.03 / u
  e = tf.cast(epoch, dtype)
  non_final = tf.maximum(1.0 / u - e * decay, floor)
  final = tf.minimum(1.0 / u + e * (u - 1.0) * decay, 1.0 - (u - 1.0) * floor)
  return tf.concat([tf.fill([num_steps - 1], non_final), final[None]], 0)


class _Scratch:
  """Trace-time bookkeeping kept out of ``tf.Module`` attribute tracking."""

  def __init__(self):
    self.pending = None  # statistics of the last meta-loss, for update_state


class MAMLPlusPlus(MAML):
  """MAML with the MAML++ training tricks.

  Args:
    model: a ``MetaModel`` (``norm_scale=True`` for HTTYM's per-step gamma).
    inner_lr: the inner step size (LSLR's initial value; HTTYM 0.1).
    num_inner_steps: U (HTTYM: 5); per-step parameters have U rows.
    first_order: always first order (overrides DA).
    config: a ``MAMLPPConfig``.
    loss_scaling: 'mean' (HTTYM's ``F.cross_entropy``) or 'original'.
    **kwargs: other ``MAML`` options.

  ``adapt`` returns the adapted model weights only; with BNWB the norm
  parameters of each step live in ``norm_weights``, so predict with
  ``adapt_and_predict`` (or ``forward``), which applies them.

  Example:
    >>> model = models.build("conv4_omniglot", norm_scale=True)
    >>> learner = MAMLPlusPlus(model, inner_lr=0.1, num_inner_steps=5)
    >>> loss, metrics = learner.meta_loss(batch, step=tf.constant(0))
  """

  def __init__(self, model: MetaModel, inner_lr: float, num_inner_steps: int,
               first_order: bool = False, *,
               config: MAMLPPConfig = MAMLPPConfig(),
               loss_scaling: str = "mean", **kwargs):
    if num_inner_steps < 1:
      raise ValueError(f"MAML++ needs num_inner_steps >= 1, got "
                       f"{num_inner_steps}")
    super().__init__(model, inner_lr, num_inner_steps, first_order,
                     loss_scaling=loss_scaling, **kwargs)
    self.config = config
    roles = model.param_roles
    if config.per_step_norm_weights and L.NORM in self.adapted_roles:
      raise ValueError("per-step norm weights (BNWB) are meta-learned only; "
                       "do not adapt role 'norm' with them.")
    u = self.num_inner_steps
    variables = model.trainable_variables
    self.step_sizes = [
        tf.Variable(tf.fill([u], tf.constant(inner_lr, v.dtype)),
                    name=f"lslr_{i}")
        for i, v in enumerate(variables) if self.adapted_mask[i]
    ] if config.learned_step_sizes else []
    self._norm_index = ([i for i, r in enumerate(roles) if r == L.NORM]
                        if config.per_step_norm_weights else [])
    self.norm_weights = [
        tf.Variable(tf.tile(tf.convert_to_tensor(variables[i])[None],
                            [u] + [1] * len(variables[i].shape)),
                    name=f"bnwb_{i}") for i in self._norm_index
    ]
    self.statistics = (StepStatistics(model, u, config.bn_momentum)
                       if config.per_step_running_stats else None)
    if self.statistics is not None and not self.statistics.num_layers:
      self.statistics = None  # no batch norm in the model
    self.eval_training = not (self.statistics is not None and
                              config.eval_with_running_stats)
    self._scratch = _Scratch()

  # ---------------------------------------------------------------- variables
  @property
  def trainable_variables(self) -> list:
    """The model's variables (less the norm parameters that BNWB replaces by
    per-step copies), then LSLR rates, then per-step norm parameters."""
    replaced = set(self._norm_index)
    own = [v for i, v in enumerate(self.model.trainable_variables)
           if i not in replaced]
    return own + self.extra_variables

  @property
  def extra_variables(self) -> list:
    return list(self.step_sizes) + list(self.norm_weights)

  def step_index(self, step: int) -> int:
    """Row of per-step parameters for inner step ``step`` (clamped, #28)."""
    return min(int(step), self.num_inner_steps - 1)

  def inner_learning_rates(self, step: int) -> list:
    if not self.step_sizes:
      return super().inner_learning_rates(step)
    rates = iter(self.step_sizes)
    s = self.step_index(step)
    return [next(rates)[s] if a else None for a in self.adapted_mask]

  # ---------------------------------------------------------------- schedules
  def epoch(self, step):
    """``step // iterations_per_epoch``; step None counts as 0."""
    if step is None:
      return 0
    if isinstance(step, int):
      return step // self.config.iterations_per_epoch
    return tf.cast(step, tf.int64) // self.config.iterations_per_epoch

  def uses_first_order(self, step):
    """DA: whether ``step`` is in the first-order phase (bool or tensor)."""
    if self.first_order:
      return True
    if self.config.first_order_epochs == 0:
      return False
    return self.epoch(step) < self.config.first_order_epochs

  def uses_multi_step_loss(self, step):
    """MSL: bool (or bool tensor) whether ``step`` uses the weighted loss."""
    if not self.config.multi_step_loss or self.config.msl_epochs == 0:
      return False
    epoch = self.epoch(step)
    return epoch < self.config.msl_epochs

  def phase(self, step: int) -> tuple[bool, bool]:
    """The phase at meta-iteration ``step`` (a Python int):
    ``(first_order, multi_step_loss)``, as ``meta_loss(..., phase=...)``
    takes it. The training loop compiles one meta-step per phase."""
    return bool(self.uses_first_order(step)), bool(
        self.uses_multi_step_loss(step))

  def loss_weights(self, step, dtype=tf.float32) -> tf.Tensor:
    """MSL's per-step weights ``[U]`` at ``step``."""
    return per_step_loss_weights(self.num_inner_steps, self.config.msl_epochs,
                                 self.epoch(step), dtype)

  # ---------------------------------------------------------------- network
  def forward(self, params: Params, x: tf.Tensor, step: int,
              training: bool) -> tf.Tensor:
    """The network with step ``step``'s norm parameters and statistics."""
    if self.norm_weights:
      params = list(params)
      s = self.step_index(step)
      for i, weights in zip(self._norm_index, self.norm_weights):
        params[i] = tf.broadcast_to(weights[s][None], tf.shape(params[i]))
    if self.statistics is None:
      return self.model.forward(params, x, step, training)
    with L.batch_norm_statistics(self.statistics.hook(training)):
      return self.model.forward(params, x, step, training)

  # ------------------------------------------------------------- objective
  def _query_loss(self, fast: Params, query, batch: TaskBatch, step: int,
                  shots: int, training: bool):
    outputs = self.forward(fast, query, step, training)
    loss = tf.reduce_mean(self.task_loss(outputs, batch.query_y, shots))
    return loss, outputs

  def _guarded_query_loss(self, msl, fast: Params, query, batch: TaskBatch,
                          step: int, shots: int, training: bool):
    """A non-final step's query loss, computed only in the MSL phase."""
    def compute():
      return self._query_loss(fast, query, batch, step, shots, training)[0]

    def skip():
      return tf.zeros([], self.model.trainable_variables[0].dtype)

    if self.statistics is None:
      return select(msl, compute, skip)
    return self.statistics.select(msl, compute, skip, step)

  def _objective(self, batch: TaskBatch, msl, weights: tf.Tensor,
                 first_order: bool, training: bool):
    """Query loss: the final step's, or MSL's weighted sum while ``msl``.

    Args:
      batch: a ``TaskBatch``.
      msl: bool or bool tensor: use the weighted multi-step loss.
      weights: MSL's per-step weights ``[U]``.
      first_order: derivative order of this objective (a Python bool).
      training: training-mode forward passes (and statistics recording).

    Returns:
      ``(loss, metrics, statistics)``; statistics are per BN layer
      ``(mean_sum [U, C], var_sum [U, C], count [U])`` of the recorded batch
      moments (empty without BNRS or when not training).
    """
    u = self.num_inner_steps
    recording = (self.statistics.recording(training)
                 if self.statistics is not None else
                 contextlib.nullcontext())
    with recording as recorded, L.final_weight_gradient_sums(not first_order):
      params = self.initial_fast_weights(num_tasks(batch.support_x))
      shots = self.shots(batch)
      trajectory, support_losses = self.adapt_encoded(
          params, self.encode(params, batch.support_x, training),
          batch.support_y, shots, u, training, first_order)
      query = self.encode(params, batch.query_x, training)
      final_loss, outputs = self._query_loss(trajectory[u], query, batch,
                                             u - 1, shots, training)
      step_losses = [final_loss]
      if msl is not False:
        step_losses = [
            self._guarded_query_loss(msl, trajectory[j + 1], query, batch, j,
                                     shots, training) for j in range(u - 1)
        ] + step_losses
    if msl is False:
      loss = final_loss
    else:
      weighted = tf.reduce_sum(tf.cast(weights, final_loss.dtype) *
                               tf.stack(step_losses))
      loss = weighted if msl is True else tf.where(msl, weighted, final_loss)
    final_weight = tf.cast(weights[-1], tf.float32)
    metrics = {
        "post_update_loss": final_loss,
        "pre_update_loss": tf.reduce_mean(support_losses[0]),
        "first_order": tf.constant(float(first_order)),
        "final_step_weight": (tf.constant(1.0) if msl is False else
                              final_weight if msl is True else
                              tf.where(msl, final_weight, 1.0)),
    }
    if self.model.task_type == CLASSIFICATION:
      metrics["post_update_accuracy"] = tf.reduce_mean(
          losses.accuracy(outputs, batch.query_y))
    statistics = (self.statistics.summarise(recorded)
                  if self.statistics is not None and training else [])
    return loss, metrics, statistics

  def meta_loss(self, batch: TaskBatch, step=None, training: bool = True,
                phase: tuple[bool, bool] | None = None):
    """MAML++'s objective at meta-iteration ``step``.

    Args:
      batch: a ``TaskBatch``.
      step: global meta-iteration (int, scalar tensor or None = 0); selects
        the MSL weights, and the derivative order and MSL unless ``phase``.
      training: training-mode forward passes (and statistics recording).
      phase: ``phase(step)``, computed in Python: the derivative order and
        MSL are then fixed in the graph, with no ``tf.cond``.

    Returns:
      ``(loss, metrics)``; metrics add ``first_order`` (1 in the first-order
      phase) and ``final_step_weight`` (MSL's weight of the last step).
    """
    first_order, msl = (phase if phase is not None else
                        (self.uses_first_order(step),
                         self.uses_multi_step_loss(step)))
    msl = msl if training else False
    if tf.executing_eagerly():
      first_order, msl = bool(first_order), bool(msl)
    weights = self.loss_weights(step, self.model.trainable_variables[0].dtype)
    # The derivative order changes the whole graph: two branches, each
    # compiled once (only when derivative-order annealing is on).
    loss, metrics, statistics = select(
        first_order,
        lambda: self._objective(batch, msl, weights, True, training),
        lambda: self._objective(batch, msl, weights, False, training))
    self._scratch.pending = statistics or None
    return loss, {**metrics, **self.state_metrics()}

  def pretrain_loss(self, batch: TaskBatch, step=None, training: bool = True):
    self._scratch.pending = None
    return super().pretrain_loss(batch, step, training)

  @property
  def pending_statistics(self) -> list | None:
    """The last meta-loss's recorded batch moments (``_objective``'s
    statistics, means over its tasks), until ``update_state`` uses them."""
    return self._scratch.pending

  @pending_statistics.setter
  def pending_statistics(self, value: list | None) -> None:
    self._scratch.pending = value

  def update_state(self, finite=True) -> None:
    """Blends the last meta-loss's batch statistics into the per-step running
    statistics (BNRS), and adjusts the loss scale (``MAML.update_state``). The
    training loop calls it after the gradients."""
    pending, self._scratch.pending = self._scratch.pending, None
    if pending:
      self.statistics.update(pending, finite)
    super().update_state(finite)
