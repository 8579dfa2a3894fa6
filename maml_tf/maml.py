"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

Paper: https://arxiv.org/abs/1703.03400. Reference code: cbfinn/maml (TF1).

The functional core is three pure functions:

* ``support_gradients``: the support loss of every task and its gradient with
  respect to that task's fast weights (one batched computation for all tasks);
* ``inner_update``: ``theta' = theta - alpha * grad`` on the adapted weights,
  with ``stop_gradient`` on the gradient for first-order MAML (the original's
  ``--stop_grad``);
* ``inner_loop``: the adaptation trajectory ``[theta_0, ..., theta_U]``.

``MAML`` wraps them in the paper's stages: ``adapt`` (inner loop),
``meta_loss`` (query loss after adaptation, averaged over tasks) and
``meta_gradients`` (its exact second-order gradient by nested
``tf.GradientTape``s). Variants (ANIL, Meta-SGD, MAML++) subclass it and change
which weights adapt, the inner learning rates or the meta-objective.

Tasks are vectorised: weights carry a leading task axis, so a meta-batch is
one batched computation (see ``layers``). Per-task batch-norm statistics keep
tasks independent, so the gradient of the *sum* of task losses with respect to
the task-batched weights is every task's own gradient.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from maml_tf import layers as L
from maml_tf import losses
from maml_tf.models import CLASSIFICATION, MetaModel
from maml_tf.tasks import TaskBatch

Params = list  # list[tf.Tensor], aligned with the learner's parameters
LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # -> per-task [T]


def support_gradients(forward: Callable, params: Sequence[tf.Tensor],
                      adapted: Sequence[bool], x: tf.Tensor, y: tf.Tensor,
                      loss_fn: LossFn):
  """Per-task support loss and its gradient w.r.t. the adapted fast weights.

  Args:
    forward: ``forward(params, x) -> outputs [T, B, ...]``.
    params: fast weights, each ``[T, ...]``.
    adapted: one bool per entry of ``params``.
    x: support inputs ``[T, S, ...]``.
    y: support targets ``[T, S, ...]``.
    loss_fn: ``(outputs, targets) -> [T]``.

  Returns:
    ``(losses [T], outputs [T, S, ...], grads)`` where ``grads`` is aligned
    with ``params`` and is ``None`` where not adapted. If an outer tape is
    recording, the gradients are themselves differentiable (second order).
  """
  watched = [p for p, a in zip(params, adapted) if a]
  with tf.GradientTape(watch_accessed_variables=False) as tape:
    tape.watch(watched)
    outputs = forward(params, x)
    task_losses = loss_fn(outputs, y)
    total = tf.reduce_sum(task_losses)
  grads = iter(tape.gradient(total, watched,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO))
  return task_losses, outputs, [next(grads) if a else None for a in adapted]


def as_dtype(value, dtype) -> tf.Tensor:
  """``value`` as a tensor of ``dtype``. ``tf.cast`` of a Python float would
  round it to float32 first, which spoils float64 gradient checks."""
  if isinstance(value, (int, float)):
    return tf.constant(value, dtype=dtype)
  return tf.cast(value, dtype)


def inner_update(params: Sequence[tf.Tensor],
                 grads: Sequence[tf.Tensor | None],
                 learning_rates: Sequence, first_order: bool = False) -> Params:
  """One gradient step on the adapted weights: ``theta - alpha * g``.

  Args:
    params: fast weights ``[T, ...]``.
    grads: gradients aligned with ``params``; ``None`` leaves a weight as is.
    learning_rates: one step size per weight: a float, a scalar tensor, or a
      tensor broadcastable to the weight (Meta-SGD's per-element rates).
    first_order: stop the gradient through ``g`` (first-order MAML, the
      original ``stop_grad``). The query loss is still differentiated through
      the forward pass at ``theta'`` with ``d theta'/d theta = I``.

  Returns:
    The updated weights.
  """
  updated = []
  for p, g, lr in zip(params, grads, learning_rates):
    if g is None:
      updated.append(p)
      continue
    if first_order:
      g = tf.stop_gradient(g)
    lr = as_dtype(lr, p.dtype)
    if lr.shape.rank == 0 and p.shape.rank > 1:
      # Any scalar rate, so that a learned one (MAML++'s LSLR) gets its
      # gradient, a sum over every axis of the weight, from one flat axis:
      # over [T, 3, 3, C, C] XLA:CPU splits that sum into 32x32
      # reduce-windows, which took the classic emitters 1-4 s each to
      # compile. (A constant rate only gains a free reshape.)
      updated.append(p - tf.reshape(lr * tf.reshape(g, [-1]), tf.shape(p)))
    else:
      updated.append(p - lr * g)
  return updated


def inner_loop(forward: Callable, params: Sequence[tf.Tensor],
               adapted: Sequence[bool], x: tf.Tensor, y: tf.Tensor,
               loss_fn: LossFn, num_steps: int,
               learning_rates: Callable[[int], Sequence],
               first_order: bool = False):
  """Runs ``num_steps`` inner steps on the support set.

  Args:
    forward: ``forward(params, x, step) -> outputs``; ``step`` is the inner
      step index ``0..num_steps-1``.
    params, adapted, x, y, loss_fn: as in ``support_gradients``.
    num_steps: U, a Python int.
    learning_rates: ``step -> learning rates aligned with params``.
    first_order: as in ``inner_update``.

  Returns:
    ``(trajectory, support_losses)``: ``trajectory[j]`` is the fast weights
    after j steps (``trajectory[0] = params``); ``support_losses[j]`` ``[T]`` is
    the support loss at ``trajectory[j]`` (j < U).
  """
  trajectory = [list(params)]
  support_losses = []
  for step in range(num_steps):
    task_losses, _, grads = support_gradients(
        lambda p, inputs, s=step: forward(p, inputs, s), trajectory[-1],
        adapted, x, y, loss_fn)
    support_losses.append(task_losses)
    trajectory.append(inner_update(trajectory[-1], grads,
                                   learning_rates(step), first_order))
  return trajectory, support_losses


def num_tasks(x: tf.Tensor):
  """T as a Python int when static (XLA-friendly), else a scalar tensor."""
  return L.dim(x, 0)


class MAML(tf.Module):
  """Second-order MAML with the original's semantics.

  Args:
    model: a ``MetaModel`` (``maml_tf.models.build``).
    inner_lr: alpha, the inner step size (``--update_lr``).
    num_inner_steps: U, inner steps during meta-training (``--num_updates``);
      the meta-loss is the query loss after exactly U steps.
    first_order: first-order MAML (``--stop_grad``).
    num_inner_steps_eval: inner steps at evaluation (the original's
      ``test_num_updates``); defaults to ``num_inner_steps``.
    adapted_roles: which weights the inner loop adapts, by role. The original
      adapts conv/dense kernels, biases and the head, but not the norm offsets
      (they are not in its fast-weight dict), hence the default.
    loss_scaling: 'original' (sum of CE / K, see ``losses``) or 'mean'.
    jit_compile: compile the public methods with XLA.
    use_tf_function: wrap the public methods in ``tf.function`` at all
      (False runs eagerly; for debugging and tests).

  Example:
    >>> model = maml_tf.models.build("mlp_sinusoid")
    >>> maml = MAML(model, inner_lr=0.01, num_inner_steps=1)
    >>> loss, grads = maml.meta_gradients(batch)
    >>> optimizer.apply_gradients(zip(grads, maml.trainable_variables))
  """

  # The ``training`` flag of forward passes at evaluation and adaptation: True
  # uses the current batch's batch-norm statistics, as the original does;
  # MAML++ with per-step running statistics sets it to False.
  eval_training: bool = True

  def __init__(self, model: MetaModel, inner_lr: float, num_inner_steps: int,
               first_order: bool = False, *,
               num_inner_steps_eval: int | None = None,
               adapted_roles: Sequence[str] = (L.WEIGHT, L.HEAD),
               loss_scaling: str = "original", jit_compile: bool = True,
               use_tf_function: bool = True, name: str | None = None):
    super().__init__(name=name)
    if num_inner_steps < 0:
      raise ValueError(f"num_inner_steps must be >= 0, got {num_inner_steps}")
    if loss_scaling not in ("original", "mean"):
      raise ValueError(
          f"loss_scaling must be 'original' or 'mean', got {loss_scaling!r}")
    self.model = model
    self.inner_lr = float(inner_lr)
    self.num_inner_steps = int(num_inner_steps)
    self.num_inner_steps_eval = int(
        num_inner_steps if num_inner_steps_eval is None else num_inner_steps_eval)
    self.first_order = bool(first_order)
    self.adapted_roles = tuple(adapted_roles)
    self.loss_scaling = loss_scaling
    self.jit_compile = jit_compile
    self.use_tf_function = use_tf_function
    self._compiled = {}

  # ---------------------------------------------------------------- parameters
  @property
  def trainable_variables(self) -> list:
    """Meta-parameters: the model's variables, then the algorithm's own."""
    return list(self.model.trainable_variables) + list(self.extra_variables)

  @property
  def extra_variables(self) -> list:
    """Meta-learned variables that are not model weights (e.g. learning rates)."""
    return []

  @property
  def adapted_mask(self) -> list[bool]:
    """Which model weights the inner loop adapts."""
    return [role in self.adapted_roles for role in self.model.param_roles]

  def inner_learning_rates(self, step: int) -> list:
    """Step sizes for inner step ``step``, aligned with the model weights."""
    return [self.inner_lr if a else None for a in self.adapted_mask]

  def default_tasks_per_chunk(self, num_tasks: int) -> int:
    """How many tasks a training meta-step differentiates at once, by
    default (``training.chunked_gradients``; the meta-gradient is the same).

    Convolutional models take one task at a time in a meta-batch of at most
    4 (miniImageNet's), where each task already has its own convolutions:
    XLA then compiles one task's program, not four, and needs about half the
    memory. Larger meta-batches go in chunks of up to 8 tasks (Omniglot's 32
    as 4 x 8: faster, and less memory, than 32 at once). The sinusoid's
    small networks take every task at once, and so does every model when a
    GPU is visible (measured on CPUs only: README, Performance).
    """
    if len(self.model.example_shape) != 3 or L.gpu_visible():
      return num_tasks
    if num_tasks <= L.MAX_PER_TASK_CONV_TASKS:
      return 1
    return max(c for c in range(1, 9) if num_tasks % c == 0)

  # -------------------------------------------------------------------- losses
  def task_loss(self, outputs: tf.Tensor, targets: tf.Tensor,
                shots: int) -> tf.Tensor:
    """Per-task loss ``[T]`` with the original's scaling."""
    if self.model.task_type != CLASSIFICATION:
      return losses.mse(outputs, targets)
    if self.loss_scaling == "original":
      return losses.scaled_cross_entropy(outputs, targets, shots)
    return losses.mean_cross_entropy(outputs, targets)

  def shots(self, batch: TaskBatch) -> int:
    """K: support examples per class (per task for regression)."""
    support = int(batch.support_x.shape[1])
    if self.model.task_type != CLASSIFICATION:
      return support
    return max(support // self.model.num_outputs, 1)

  def query_step(self, num_updates: int) -> int:
    """The step index a query forward uses after ``num_updates`` updates.

    Per-step layers (MAML++) evaluate the query after update j+1 with the
    statistics/parameters of step j, as in HowToTrainYourMAMLPytorch.
    """
    return max(num_updates - 1, 0)

  # ------------------------------------------------------------- the network
  def forward(self, params: Params, x: tf.Tensor, step: int,
              training: bool) -> tf.Tensor:
    """The network at fast weights ``params`` on inputs from ``encode``.

    Args:
      params: fast weights aligned with ``model.trainable_variables``, each
        ``[T, ...]``.
      x: ``encode``'s output for a support or query set, ``[T, B, ...]``.
      step: the inner step index (per-step layers, MAML++).
      training: training-mode call.

    Returns:
      ``[T, B, num_outputs]``. Variants override this (ANIL's cached head,
      MAML++'s per-step parameters).
    """
    return self.model.forward(params, x, step, training)

  def encode(self, params: Params, x: tf.Tensor, training: bool):
    """The part of the network the inner loop does not change, computed once
    per task and set (identity for MAML; ANIL's body with cached features).

    It is evaluated at theta_0, so it may only read weights that are not
    adapted.
    """
    del params, training
    return x

  # -------------------------------------------------------------------- stages
  def initial_fast_weights(self, num_tasks) -> Params:
    """theta_0 for every task: the meta-parameters broadcast to ``[T, ...]``."""
    return self.model.tile_params(num_tasks)

  def adapt_encoded(self, params: Params, support, support_y: tf.Tensor,
                    shots: int, num_steps: int, training: bool,
                    first_order: bool | None = None):
    """The inner loop from ``params`` on encoded support inputs.

    Returns:
      ``(trajectory, support_losses)`` as ``inner_loop``.
    """
    return inner_loop(
        lambda p, x, s: self.forward(p, x, s, training), params,
        self.adapted_mask, support, support_y,
        lambda out, y: self.task_loss(out, y, shots), num_steps,
        self.inner_learning_rates,
        self.first_order if first_order is None else first_order)

  def adapt_batch(self, batch: TaskBatch, num_steps: int,
                  training: bool = True, first_order: bool | None = None):
    """The inner loop for every task of ``batch``.

    Returns:
      ``(trajectory, support_losses)`` as ``inner_loop``.
    """
    params = self.initial_fast_weights(num_tasks(batch.support_x))
    support = self.encode(params, batch.support_x, training)
    return self.adapt_encoded(params, support, batch.support_y,
                              self.shots(batch), num_steps, training,
                              first_order)

  def query_outputs(self, fast_weights: Params, query_x: tf.Tensor,
                    num_updates: int, training: bool = True) -> tf.Tensor:
    """Outputs on raw query inputs ``[T, Q, ...]`` after ``num_updates``."""
    return self.forward(fast_weights,
                        self.encode(fast_weights, query_x, training),
                        self.query_step(num_updates), training)

  def meta_loss(self, batch: TaskBatch, step=None, training: bool = True):
    """The MAML objective: mean over tasks of the query loss after U steps.

    Args:
      batch: a ``TaskBatch``.
      step: the global meta-iteration (unused by MAML; schedules use it).
      training: training-mode forward passes.

    Returns:
      ``(loss, metrics)``; metrics are scalars: ``pre_update_loss`` (support
      loss before adaptation, the original's ``total_loss1``),
      ``post_update_loss`` (query loss after U steps) and, for
      classification, ``post_update_accuracy`` (query accuracy after U
      steps).
    """
    del step
    with L.final_weight_gradient_sums(not self.first_order):
      params = self.initial_fast_weights(num_tasks(batch.support_x))
      shots = self.shots(batch)
      trajectory, support_losses = self.adapt_encoded(
          params, self.encode(params, batch.support_x, training),
          batch.support_y, shots, self.num_inner_steps, training)
      outputs = self.forward(trajectory[-1],
                             self.encode(params, batch.query_x, training),
                             self.query_step(self.num_inner_steps), training)
    query_losses = self.task_loss(outputs, batch.query_y, shots)
    loss = tf.reduce_mean(query_losses)
    metrics = {"post_update_loss": loss}
    if support_losses:
      metrics["pre_update_loss"] = tf.reduce_mean(support_losses[0])
    if self.model.task_type == CLASSIFICATION:
      metrics["post_update_accuracy"] = tf.reduce_mean(
          losses.accuracy(outputs, batch.query_y))
    metrics.update(self.state_metrics())
    return loss, metrics

  def update_state(self, finite=True) -> None:
    """Adjusts a dynamic float16 loss scale after a meta-step (halved when
    the step was not finite); the training loop calls it."""
    if self.model.loss_scale is not None:
      self.model.loss_scale.update(tf.convert_to_tensor(finite))

  def state_metrics(self) -> dict:
    """``{"loss_scale": S}`` (the scale of this step's float16 gradients)
    with loss scaling, else ``{}``: reported with the objective's metrics."""
    if self.model.loss_scale is None:
      return {}
    return {"loss_scale": tf.convert_to_tensor(self.model.loss_scale.scale)}

  def pretrain_loss(self, batch: TaskBatch, step=None, training: bool = True):
    """The original's multi-task baseline objective (``--pretrain_iterations``):
    the pre-update support loss, with no adaptation."""
    del step
    params = self.initial_fast_weights(num_tasks(batch.support_x))
    outputs = self.forward(params,
                           self.encode(params, batch.support_x, training), 0,
                           training)
    loss = tf.reduce_mean(self.task_loss(outputs, batch.support_y,
                                         self.shots(batch)))
    return loss, {"pre_update_loss": loss, **self.state_metrics()}

  def evaluate(self, batch: TaskBatch, num_steps: int | None = None,
               training: bool | None = None,
               return_outputs: bool = False) -> dict:
    """Per-task, per-step evaluation (no meta-gradient).

    Args:
      batch: a ``TaskBatch`` of T tasks.
      num_steps: inner steps (default ``num_inner_steps_eval``).
      training: forward mode (default ``eval_training``); the original
        evaluates in training mode (batch-norm statistics of the current
        batch).
      return_outputs: also return the query outputs after the last step
        (an ensemble of checkpoints averages them, HTTYM's MAML++ test).

    Returns:
      ``query_loss`` ``[T, U+1]`` (column j: after j inner steps),
      ``support_loss`` ``[T]`` (before adaptation; column 0 of the original's
      test output), and for classification ``query_accuracy`` ``[T, U+1]`` and
      ``support_accuracy`` ``[T]``. With ``return_outputs``, also
      ``query_outputs`` ``[T, Q, out]`` (logits, for classification) and
      ``query_y`` ``[T, Q]``.
    """
    num_steps = self.num_inner_steps_eval if num_steps is None else num_steps
    training = self.eval_training if training is None else training
    batch = TaskBatch(*(tf.stop_gradient(t) for t in batch))
    shots = self.shots(batch)
    params = self.initial_fast_weights(num_tasks(batch.support_x))
    support = self.encode(params, batch.support_x, training)
    query = self.encode(params, batch.query_x, training)
    trajectory, _ = self.adapt_encoded(params, support, batch.support_y,
                                       shots, num_steps, training,
                                       first_order=True)
    query_losses, query_accuracies = [], []
    for j, fast in enumerate(trajectory):
      outputs = self.forward([tf.stop_gradient(p) for p in fast], query,
                             self.query_step(j), training)
      query_losses.append(self.task_loss(outputs, batch.query_y, shots))
      if self.model.task_type == CLASSIFICATION:
        query_accuracies.append(losses.accuracy(outputs, batch.query_y))
    support_out = self.forward(trajectory[0], support, 0, training)
    results = {
        "query_loss": tf.stack(query_losses, axis=1),
        "support_loss": self.task_loss(support_out, batch.support_y, shots),
    }
    if self.model.task_type == CLASSIFICATION:
      results["query_accuracy"] = tf.stack(query_accuracies, axis=1)
      results["support_accuracy"] = losses.accuracy(support_out,
                                                    batch.support_y)
    if return_outputs:
      results["query_outputs"] = outputs
      results["query_y"] = batch.query_y
    return results

  # ---------------------------------------------------------------- public API
  def _function(self, name: str, fn: Callable) -> Callable:
    if not self.use_tf_function:
      return fn
    if name not in self._compiled:
      self._compiled[name] = tf.function(fn, jit_compile=self.jit_compile,
                                            autograph=False)
    return self._compiled[name]

  def _meta_gradients(self, batch: TaskBatch, step=None):
    variables = self.trainable_variables
    with tf.GradientTape() as tape:
      loss, _ = self.meta_loss(batch, step)
    return loss, tape.gradient(loss, variables,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)

  def meta_gradients(self, batch: TaskBatch, step=None):
    """The meta-loss and its gradient (second order unless ``first_order``).

    Args:
      batch: a ``TaskBatch`` (leading task axis).
      step: the global meta-iteration, for learners with schedules (MAML++);
        None: the learner's default.

    Returns:
      ``(loss, grads)``, ``grads`` aligned with ``self.trainable_variables``
      (for MAML: ``model.trainable_variables``).
    """
    batch = TaskBatch(*batch).to_tensors()
    if step is not None:
      step = tf.convert_to_tensor(step, tf.int64)
    return self._function("meta_gradients", self._meta_gradients)(batch, step)

  def _adapt_one(self, support_x, support_y, num_steps: int):
    batch = TaskBatch(support_x[None], support_y[None], support_x[None],
                      support_y[None])
    trajectory, _ = self.adapt_batch(batch, num_steps, self.eval_training,
                                     first_order=True)
    return [p[0] for p in trajectory[-1]]

  def adapt(self, support_x, support_y, num_steps: int | None = None) -> list:
    """Adapts to one task.

    Args:
      support_x: ``[S, *example_shape]``.
      support_y: ``[S]`` class ids or ``[S, 1]`` targets.
      num_steps: inner steps (default ``num_inner_steps_eval``).

    Returns:
      Fast weights aligned with ``model.trainable_variables``.
    """
    num_steps = self.num_inner_steps_eval if num_steps is None else num_steps
    fn = self._function(f"adapt_{num_steps}",
                        lambda x, y: self._adapt_one(x, y, num_steps))
    return fn(tf.convert_to_tensor(support_x), tf.convert_to_tensor(support_y))

  def adapt_and_predict(self, support_x, support_y, query_x,
                        num_steps: int | None = None) -> tf.Tensor:
    """Adapts to one task and returns the query outputs ``[Q, num_outputs]``."""
    num_steps = self.num_inner_steps_eval if num_steps is None else num_steps

    def run(x, y, qx):
      fast = self._adapt_one(x, y, num_steps)
      return self.query_outputs([p[None] for p in fast], qx[None],
                                num_steps, self.eval_training)[0]

    fn = self._function(f"adapt_and_predict_{num_steps}", run)
    return fn(tf.convert_to_tensor(support_x), tf.convert_to_tensor(support_y),
              tf.convert_to_tensor(query_x))
