"""The README's results table from benchmark JSON files:
``python -m benchmarks --report results/*.json``."""

from __future__ import annotations

COLUMNS = ("workload", "algorithm", "XLA", "precision", "steps/s", "ms/step",
           "first call (s)", "cached first call (s)", "peak RSS (GiB)",
           "input ms/step", "GFLOP/step", "GFLOP/s", "% of peak")


def _rate(value: float) -> str:
  if value >= 100:
    return f"{value:,.0f}"
  return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def markdown_table(results: list[dict]) -> str:
  """One markdown row per configuration of ``results`` (parsed JSON files).

  Each row's % of peak uses the peak matmul rate of its own file. Rows
  without a FLOP count (XLA off) take it from an XLA row of the same
  workload, algorithm and precision in any of the files: the maths is the
  same.
  """
  def key(row):
    return row["workload"], row["algorithm"], row.get("precision", "float32")

  known = {key(r): r["gflop_per_step"] for result in results
           for r in result["rows"] if r.get("gflop_per_step")}
  lines = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * len(COLUMNS)]
  for result in results:
    peak = result["peak_matmul_gflops"]
    for r in result["rows"]:
      cells = [r["workload"], r["algorithm"], "on" if r["xla"] else "off",
               r.get("precision", "float32")]
      notes = []
      if r["workload"] == "sinusoid":
        notes.append(f"{r.get('steps_per_call', 1)}/call")
      threads = r.get("intra_op_threads")  # 0 or absent: TF's default
      if threads:
        notes.append(f"{threads} thread" + ("s" if threads > 1 else ""))
      chunk = r.get("tasks_per_chunk")  # absent: before chunks existed
      if chunk and chunk != r.get("meta_batch_size"):
        notes.append(f"chunks of {chunk}")
      if notes:
        cells[1] += f" ({', '.join(notes)})"
      if "error" in r:
        lines.append("| " + " | ".join(cells) + f" | error: {r['error'][:80]} |")
        continue
      gflop = r.get("gflop_per_step") or known.get(key(r))
      rate = gflop * r["steps_per_s"] if gflop else None
      unit = " tasks" if r.get("unit") == "tasks" else ""
      cells += [_rate(r["steps_per_s"]) + unit, f"{r['ms_per_step']:.2f}",
                f"{r['compile_s']:.1f}",
                (f"{r['compile_cached_s']:.1f}" if "compile_cached_s" in r
                 else "n/a"), f"{r['peak_rss_mb'] / 1024:.2f}",
                f"{r['input_ms_per_step']:.2f}"]
      cells += ([f"{gflop:.3g}", f"{rate:.1f}", f"{100 * rate / peak:.1f}"]
                if gflop else ["n/a"] * 3)
      lines.append("| " + " | ".join(cells) + " |")
  dates = ", ".join(result["date"] for result in results)
  peaks = ", ".join(f"{result['peak_matmul_gflops']:.0f}"
                    for result in results)
  machine = results[0]["machine"] if results else {}
  lines.append("")
  lines.append(f"Measured {dates} on {machine.get('processor')} "
               f"({machine.get('cpus')} CPUs, Python {machine.get('python')}); "
               f"float32 matmul peak {peaks} GFLOP/s.")
  for result in results:
    for r in result["rows"]:
      if "end_to_end_tasks_per_s" in r:
        lines.append(f"{r['workload']} end to end, with sampling: "
                     f"{r['end_to_end_tasks_per_s']:.0f} tasks/s.")
  return "\n".join(lines)
