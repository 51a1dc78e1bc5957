r"""Markdown reports of evaluator results: one section per evaluator (or baseline), one table
per kind of result, deterministic text (the same metrics always give the same bytes, so
reports diff cleanly between runs).

A section is any evaluator's metrics dict; it is rendered by the shape of its values:
- scalars (and strings, None as "n/a") -> one `metric | value` table; a metric `m` with an
  interval `m_ci = [low, high]` is one cell `0.912 [0.905, 0.919]`;
- "slices" = eval/slices.py's {"slices", "worst"} -> one row per slice, the worst slice of
  each headline metric in bold;
- "confusion_matrix" (list of lists) -> rows = true class, columns = predicted class;
- a list of dicts (e.g. "per_class") -> one row per item;
- a dict of dicts -> one row per key; a dict of scalars -> a `key | value` table.
`comparison_table` puts several sections side by side ("model vs baseline").
"""
import json
import math
import os

CI_SUFFIX = "_ci"   # metric m has its 95% interval in m + CI_SUFFIX (see eval/common.py)


def fmt(value) -> str:
  """Numbers to fixed, readable text: ints as is, floats to 3 decimals (or exponent)."""
  if value is None:
    return "n/a"
  if isinstance(value, bool) or isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if math.isnan(value) or math.isinf(value):
      return str(value)
    if value != 0 and abs(value) < 0.001:
      return f"{value:.2e}"
    return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.3f}"
  if isinstance(value, (list, tuple)):
    return ", ".join(fmt(v) for v in value)
  return str(value).replace("|", "\\|").replace("\n", " ")


def cell(metrics: dict, key: str) -> str:
  """metrics[key] with its CI when there is one; "-" when the key is missing."""
  if key not in metrics:
    return "-"
  ci = metrics.get(key + CI_SUFFIX)
  text = fmt(metrics[key])
  return f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci and metrics[key] is not None else text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _is_plain(value) -> bool:
  """Rendered in a one-cell form: numbers, strings, None, lists of those."""
  if isinstance(value, (list, tuple)):
    return all(_is_plain(v) and not isinstance(v, (list, tuple)) for v in value)
  return value is None or isinstance(value, (int, float, str))


def _is_float_metric(value) -> bool:
  return value is None or isinstance(value, float)


def _slice_table(result: dict) -> str:
  slices, worst = result.get("slices", {}), result.get("worst", {})
  if not slices:
    return "(no slices)"
  columns = []
  for metrics in slices.values():
    columns += [k for k, v in metrics.items() if _is_float_metric(v) and k not in columns]
  worst_of = {(w["slice"], metric) for metric, w in worst.items()}
  rows = []
  for name, metrics in slices.items():
    row = [fmt(name), cell(metrics, "count")]
    for column in columns:
      text = cell(metrics, column)
      row.append(f"**{text}**" if (name, column) in worst_of else text)
    rows.append(row)
  table = markdown_table(["slice", "count"] + columns, rows)
  if worst:
    table += "\n\nBold: the worst slice for that metric (" + "; ".join(
        f"{metric}: {w['slice']}" for metric, w in worst.items()) + ")."
  return table


def _confusion_table(matrix: list[list]) -> str:
  header = ["true \\ predicted"] + [str(j) for j in range(len(matrix[0]))]
  return markdown_table(header, [[str(i)] + [fmt(v) for v in row] for i, row in enumerate(matrix)])


def _rows_table(items: list[dict], names=None, name_header: str = "") -> str:
  """One row per dict; with `names`, a first column naming each row."""
  columns = []
  for item in items:
    columns += [k for k in item if k not in columns and not k.endswith(CI_SUFFIX)]
  rows = [[cell(item, c) for c in columns] for item in items]
  if names is None:
    return markdown_table(columns, rows)
  return markdown_table([name_header] + columns, [[fmt(n)] + r for n, r in zip(names, rows)])


def render_section(metrics: dict) -> str:
  """One evaluator's metrics as Markdown tables (no heading of its own)."""
  scalars = [[k, cell(metrics, k)] for k, v in metrics.items()
             if _is_plain(v) and not k.endswith(CI_SUFFIX)]
  parts = [markdown_table(["metric", "value"], scalars)] if scalars else []
  for key, value in metrics.items():
    if _is_plain(value):
      continue
    if key == "slices" and isinstance(value, dict) and "slices" in value:
      body = _slice_table(value)
    elif key == "confusion_matrix" and value:
      body = _confusion_table(value)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
      body = _rows_table(value)
    elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
      body = _rows_table(list(value.values()), list(value), key)
    elif isinstance(value, dict):
      body = markdown_table([key, "value"], [[fmt(k), cell(value, k)] for k in value
                                             if not k.endswith(CI_SUFFIX)])
    else:
      body = "```\n" + json.dumps(value, indent=1, sort_keys=True) + "\n```"
    parts.append(f"### {key.replace('_', ' ')}\n\n{body}")
  return "\n\n".join(parts) + "\n"


def comparison_table(rows: dict[str, dict], columns: list[str]) -> str:
  """One row per entry of `rows` ({name: metrics}), one column per metric (with CIs)."""
  return markdown_table([""] + list(columns),
                        [[fmt(name)] + [cell(m, c) for c in columns] for name, m in rows.items()])


def render_report(title: str, sections: dict[str, dict], notes=()) -> str:
  parts = [f"# {title}\n"]
  if notes:
    parts.append("\n".join(f"- {note}" for note in notes) + "\n")
  for name, metrics in sections.items():
    parts.append(f"## {name}\n\n{render_section(metrics)}")
  return "\n".join(parts)


def write_report(path: str, title: str, sections: dict[str, dict], notes=()) -> str:
  """Writes the Markdown report to `path` and returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(render_report(title, sections, notes))
  return path
