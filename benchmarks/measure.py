"""Measurement helpers: timed blocks, FLOPs from XLA's HLO, peak FLOP rate."""

from __future__ import annotations

import re
import resource
import time
from typing import Callable

import numpy as np
import tensorflow as tf

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[a-z0-9]+\[([0-9,]*)\]")
_OPERANDS = re.compile(r"\s(dot|convolution)\(%?([\w.\-]+),\s*%?([\w.\-]+)\)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_LABELS = re.compile(r"dim_labels=[a-z0-9]+_([a-z0-9]+)->")
_OP = re.compile(r"=\s*[a-z0-9]+\[[0-9,]*\]\S*\s+([a-z\-]+)\(%?([\w.\-]+)"
                 r"(?:,\s*%?([\w.\-]+))?")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")
_CALLEES = re.compile(r"\b(calls|to_apply|body|true_computation|"
                      r"false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _instructions(hlo: str) -> tuple[list[str], str | None,
                                      list[tuple[str, str]]]:
  """An HLO module's computations in text order, its entry's name, and
  ``(computation, line)`` for each line inside a computation."""
  order, entry, current, lines = [], None, None, []
  for line in hlo.splitlines():
    header = _HEADER.match(line) if line[:1] not in ("", " ", "}") else None
    if header and line.rstrip().endswith("{"):
      current = header.group(1)
      order.append(current)
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      lines.append((current, line))
  return order, entry, lines


def _executions(order: list[str], entry: str | None,
                lines: list[tuple[str, str]]) -> dict[str, float]:
  """How many times each computation (``_instructions``) runs per call: a
  while loop's body runs its known trip count times (once if unknown), and
  every other callee (fusions, calls, both branches of a conditional) once
  per run of its caller."""
  callers: dict[str, list[tuple[str, float]]] = {}
  for current, line in lines:
    if " = " not in line:
      continue
    trips = _TRIP_COUNT.search(line)
    for kind, callee in _CALLEES.findall(line):
      factor = float(trips.group(1)) if kind == "body" and trips else 1.0
      callers.setdefault(callee, []).append((current, factor))
    branches = _BRANCHES.search(line)
    for callee in re.findall(r"%?([\w.\-]+)",
                             branches.group(1) if branches else ""):
      callers.setdefault(callee, []).append((current, 1.0))
  runs = {entry: 1.0}
  # HLO text lists callees before their callers, the entry last.
  for name in reversed(order):
    if name != entry:
      runs[name] = sum(runs.get(c, 0.0) * f for c, f in callers.get(name, []))
  return runs


def hlo_flops(hlo: str) -> float:
  """Floating-point operations of the dots, convolutions and sums of outer
  products that one call of an HLO module runs.

  A dot costs ``2 * prod(output) * prod(contracted lhs dims)``; a convolution
  ``2 * prod(output) * prod(kernel) / output_features``; a sum of outer
  products (a reduce of the product of two broadcasts, as
  ``maml_tf.layers.task_matmul`` computes weight gradients) ``2 *
  prod(product)``, as the dot it replaces. Other elementwise work is not
  counted (a few percent here), so this slightly undercounts. Instructions
  in a while loop's body count as many times as the loop's known trip count
  (the training loop's meta-steps per call, and its chunks of tasks); both
  branches of a conditional count.
  """
  order, entry, lines = _instructions(hlo)
  runs = _executions(order, entry, lines)
  shapes, definitions, where = {}, {}, {}
  for current, line in lines:
    m = _DEF.match(line)
    if m:
      shapes[m.group(1)] = _dims(m.group(2))
      where[m.group(1)] = runs.get(current, 0.0)
      op = _OP.search(line)
      if op:
        definitions[m.group(1)] = op.groups()
  total = 0.0
  for name, (opcode, operand, _) in definitions.items():
    product = definitions.get(operand)
    if (opcode == "reduce" and product and product[0] == "multiply" and
        all(definitions.get(f, ("",))[0] == "broadcast"
            for f in product[1:])):
      total += 2.0 * np.prod(shapes[operand]) * where[name]
  for _, line in lines:
    m, ops = _DEF.match(line), _OPERANDS.search(line)
    if not (m and ops) or ops.group(2) not in shapes:
      continue
    out, lhs = _dims(m.group(2)), shapes[ops.group(2)]
    if ops.group(1) == "dot":
      contract = _CONTRACT.search(line)
      contracted = np.prod([lhs[i] for i in _dims(contract.group(1))])
      total += 2.0 * np.prod(out) * contracted * where[m.group(1)]
    else:
      kernel = shapes.get(ops.group(3))
      labels = _LABELS.search(line)
      if kernel is None or labels is None:
        continue
      total += (2.0 * np.prod(out) * np.prod(kernel) /
                kernel[labels.group(1).index("o")] * where[m.group(1)])
  return total


def function_flops(fn: Callable, *args) -> float:
  """FLOPs of one call of an XLA-compiled ``tf.function``, counted in its
  XLA:CPU program on any host: XLA:GPU hands dots and convolutions to cuBLAS
  and cuDNN custom calls, which ``hlo_flops`` cannot read, and the count does
  not depend on the device."""
  with tf.device("/CPU:0"):
    hlo = fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
  return hlo_flops(hlo)


def peak_matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """The FLOP rate of a large float32 matmul under XLA (the attainable peak)."""
  a = tf.random.normal([n, n])
  b = tf.random.normal([n, n])
  f = tf.function(lambda x, y: x @ y, jit_compile=True)
  f(a, b).numpy()
  rates = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(repeats):
      c = f(a, b)
    c.numpy()
    rates.append(2.0 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
  return float(np.median(rates))


def timed_blocks(call: Callable[[], object], sync: Callable[[object], None],
                 block_seconds: float = 2.0, blocks: int = 5) -> list[float]:
  """Calls per second in ``blocks`` blocks of about ``block_seconds`` each,
  each ending with a host sync. Call it after warm-up."""
  start, n = time.perf_counter(), 0
  while time.perf_counter() - start < 0.5 or n < 2:
    out = call()
    n += 1
  sync(out)
  per_call = (time.perf_counter() - start) / n
  calls = max(1, int(block_seconds / per_call))
  rates = []
  for _ in range(blocks):
    start = time.perf_counter()
    for _ in range(calls):
      out = call()
    sync(out)
    rates.append(calls / (time.perf_counter() - start))
  return rates


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (Linux: KiB units)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_gpu_mb() -> float | None:
  """Peak memory TensorFlow has allocated on the first GPU (None: no GPU).
  Host RSS does not show it."""
  if not tf.config.list_logical_devices("GPU"):
    return None
  return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def gpu_names() -> list[str]:
  """The model of each GPU TensorFlow sees (empty on a CPU-only host)."""
  return [tf.config.experimental.get_device_details(gpu).get(
      "device_name", gpu.name)
          for gpu in tf.config.list_physical_devices("GPU")]
