"""Sweeps: expand override sets, run them, and aggregate their results into tables and Pareto plots.

A sweep file (``configs/sweeps/*.py``) defines ``get_sweep(arg=None) -> list[dict[str, value]]``; each
dict is one run's config overrides, keyed by dotted config path (``{"model.keep_rate": 0.25}``). ``arg``
is the text after ``:`` in ``path.py:arg``, as for config files. The reserved key ``config_arg`` is not a
config override: it replaces the run's config argument (``--config=path.py:<config_arg>``), for config
files that build different models per argument (``configs/sweeps/patterns.py``).

Command line::

  # one run after another on this machine (or --dry-run: print the shell commands, e.g. for a cluster)
  python -m sparsifiner_jax.sweeps run --script eval.py --config configs/deit_s_sparsifiner.py \
      --sweep configs/sweeps/keep_rate.py --workdir-root runs/kr [--dry-run] [-- --weights W]
  # table (Markdown + CSV) and Pareto plot from the runs' result JSONs (written by eval.py)
  python -m sparsifiner_jax.sweeps aggregate runs/kr/*/eval.json --out runs/kr

Each run gets its own directory ``WORKDIR_ROOT/<name>`` (name built from the overrides, e.g.
``keep_rate=0.25``). ``train.py`` gets ``--workdir`` there; an eval script (``eval`` in its file name,
``train`` not) writes ``--out <dir>/eval.json``
and, unless ``--weights``/``--workdir`` are passed through, evaluates the training run in that same
directory (so a train sweep followed by an eval sweep over the same root lines up).

Result JSON schema (eval.py): ``{"method", "model", "keep_rate", "top1", "top5", "loss", "density",
"recall", "flops": {"total", "mhsa", "attention_matrix"} (MACs), "images_per_s", ...}``; only ``top1`` is
required, everything else may be missing (results written before eval.py reported ``recall`` show "–"
there). ``top1``, ``top5``, ``density`` and ``recall`` (attention recall: the share of the dense
attention's probability mass inside the sparse mask) are fractions (values above 1 are taken as percent
already); tables and plots show percent. Errors in the CLI (missing sweep file, malformed JSON) print one
line on stderr and exit with status 2.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Sequence

from absl import flags

from sparsifiner_jax.cli import errors, parsing
from sparsifiner_jax.evaluation import viz
from sparsifiner_jax.io import atomic, paths

CONFIG_ARG = "config_arg"   # sweep key: the run's config argument, not a --config.* flag


class SweepError(ValueError):
  """A user-facing problem with a sweep file, a run or a result file."""


# --------------------------------------------------------------------------------------------------
# Sweep files and flags.


def load_sweep(spec: str) -> list[dict[str, Any]]:
  """Loads ``path.py[:arg]`` and returns ``get_sweep(arg)``, validated.

  Args:
    spec: path of a sweep file, optionally followed by ``:arg`` (passed to ``get_sweep`` as a string).

  Returns:
    A non-empty list of override dicts with dotted string keys.

  Raises:
    SweepError: the file is missing, has no ``get_sweep``, or returns something other than a list of
      dicts with string keys.
  """
  path, arg = spec, None
  if not os.path.exists(path) and ":" in spec:
    path, _, arg = spec.rpartition(":")
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(
      "_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]), path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f"sweep file {path!r} failed to load: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"sweep file {path!r} defines no get_sweep(arg=None)")
  try:
    sweep = module.get_sweep(arg)
  except (ValueError, TypeError, KeyError) as e:
    raise SweepError(f"{path}: get_sweep({arg!r}) failed: {e}") from e
  if not isinstance(sweep, (list, tuple)) or not sweep:
    raise SweepError(f"{path}: get_sweep must return a non-empty list of dicts; got {sweep!r}")
  for i, overrides in enumerate(sweep):
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and k for k in overrides):
      raise SweepError(f"{path}: entry {i} must be a dict of 'dotted.key' -> value; got {overrides!r}")
  return [dict(o) for o in sweep]


def format_value(value: Any) -> str:
  """Command-line text of a config value (ml_collections ``--config.x=...`` syntax)."""
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def to_flags(overrides: dict[str, Any], prefix: str = "config") -> list[str]:
  """``{"model.keep_rate": 0.25}`` -> ``["--config.model.keep_rate=0.25"]`` (in the dict's order)."""
  return [f"--{prefix}.{key}={format_value(value)}" for key, value in overrides.items()]


def run_name(overrides: dict[str, Any]) -> str:
  """A directory-safe name for one run, from the last path component of each key.

  ``{"model.keep_rate": 0.25, "model.coef_topk": 8}`` -> ``"keep_rate=0.25,coef_topk=8"``;
  ``{}`` -> ``"default"``.
  """
  if not overrides:
    return "default"
  parts = [str(value) if key == CONFIG_ARG else f"{key.rsplit('.', 1)[-1]}={format_value(value)}"
           for key, value in overrides.items()]
  return re.sub(r"[^\w.,=+-]", "_", ",".join(parts))


def _is_eval_script(script: str) -> bool:
  stem = os.path.splitext(os.path.basename(script))[0].lower()
  return "eval" in stem and "train" not in stem


def build_commands(script: str, config: str, sweep: Sequence[dict[str, Any]], workdir_root: str,
                   extra_args: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
  """``(workdir, argv)`` per run; see the module docstring for how ``train.py``/``eval.py`` are called."""
  names = [run_name(o) for o in sweep]
  commands = []
  for i, (name, overrides) in enumerate(zip(names, sweep)):
    if names.count(name) > 1:
      name = f"{name}.{i}"
    workdir = os.path.join(workdir_root, name)
    overrides = dict(overrides)
    config_arg = overrides.pop(CONFIG_ARG, None)
    spec = config if config_arg is None else f"{config.split(':', 1)[0]}:{config_arg}"
    argv = [sys.executable, script, f"--config={spec}"]
    if _is_eval_script(script):
      if not any(a.split("=")[0] in ("--weights", "--workdir") for a in extra_args):
        argv.append(f"--workdir={workdir}")
      argv.append(f"--out={os.path.join(workdir, 'eval.json')}")
    else:
      argv.append(f"--workdir={workdir}")
    commands.append((workdir, argv + to_flags(overrides) + list(extra_args)))
  return commands


def run(script: str, config: str, sweep: Sequence[dict[str, Any]] | str, workdir_root: str, *,
        dry_run: bool = False, extra_args: Sequence[str] = (), keep_going: bool = False,
        stream=None) -> list[dict[str, Any]]:
  """Runs every override set of a sweep, one after another, with ``sys.executable``.

  Args:
    script: ``train.py`` or ``eval.py`` (or another absl script taking ``--config``/``--workdir``).
    config: config spec passed as ``--config`` (``path.py[:arg]``).
    sweep: override dicts, or a sweep-file spec for :func:`load_sweep`.
    workdir_root: parent of the per-run directories.
    dry_run: print the shell commands (one per line) instead of running them.
    extra_args: appended to every command (e.g. ``["--weights=W"]``).
    keep_going: continue after a failed run (default: stop at the first failure).
    stream: where dry-run commands and progress go (default stdout).

  Returns:
    One dict per override set: ``{"workdir", "command" (shell string), "returncode"}``; the return code
    is ``None`` for runs not started (dry run, or after a failure without ``keep_going``).
  """
  stream = stream or sys.stdout
  if isinstance(sweep, str):
    sweep = load_sweep(sweep)
  if not dry_run and not os.path.isfile(script):
    raise SweepError(f"script {script!r} not found")
  commands = build_commands(script, config, sweep, workdir_root, extra_args)
  results = [{"workdir": workdir, "command": shlex.join(argv), "returncode": None}
             for workdir, argv in commands]
  for i, ((workdir, argv), record) in enumerate(zip(commands, results)):
    if dry_run:
      print(record["command"], file=stream)
      continue
    print(f"[{i + 1}/{len(commands)}] {record['command']}", file=stream, flush=True)
    paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
    record["returncode"] = subprocess.run(argv, check=False).returncode
    if record["returncode"] != 0:
      print(f"run {i + 1} ({workdir}) failed with exit status {record['returncode']}", file=stream,
            flush=True)
      if not keep_going:
        break
  return results


# --------------------------------------------------------------------------------------------------
# Aggregation.

TABLE_COLUMNS = (  # (field, header, format)
    ("method", "method", "{}"),
    ("model", "model", "{}"),
    ("keep_rate", "keep rate", "{:g}"),
    ("top1", "top-1 %", "{:.2f}"),
    ("top5", "top-5 %", "{:.2f}"),
    ("density", "density %", "{:.2f}"),
    ("recall", "recall %", "{:.2f}"),
    ("gmacs_total", "total GMACs", "{:.3f}"),
    ("gmacs_mhsa", "MHSA GMACs", "{:.3f}"),
    ("gmacs_attention_matrix", "attn-matrix GMACs", "{:.4f}"),
    ("images_per_s", "img/s", "{:.1f}"),
)
CSV_FIELDS = ("method", "model", "keep_rate", "top1", "top5", "loss", "density", "recall",
              "gmacs_total", "gmacs_mhsa", "gmacs_attention_matrix", "images_per_s", "dense", "path")


def _number(value) -> float | None:
  if value is None or isinstance(value, bool):
    return None
  try:
    out = float(value)
  except (TypeError, ValueError):
    return None
  return out if math.isfinite(out) else None


def _as_percent(value) -> float | None:
  """Accuracies, densities and recalls are stored as fractions by eval.py; tables show percent."""
  value = _number(value)
  if value is None:
    return None
  return 100.0 * value if abs(value) <= 1.0 else value


def is_dense(record: dict[str, Any]) -> bool:
  """The dense baseline: no keep rate (or method ``dense``) and no attention sparsity."""
  method = str(record.get("method") or "").lower()
  if method.startswith("dense") or record.get("dense") is True:
    return True
  density = _number(record.get("density"))
  return record.get("keep_rate") is None and (density is None or density >= 1.0 - 1e-9)


def _row(record: dict[str, Any], path: str) -> dict[str, Any]:
  if not isinstance(record, dict):
    raise SweepError(f"{path}: a run result must be a JSON object; got {type(record).__name__}")
  if _number(record.get("top1")) is None:
    raise SweepError(f"{path}: missing or non-numeric 'top1'")
  flops = record.get("flops") if isinstance(record.get("flops"), dict) else {}
  gmacs = record.get("gmacs") if isinstance(record.get("gmacs"), dict) else {}

  def g(name):
    macs = _number(flops.get(name))
    return macs / 1e9 if macs is not None else _number(gmacs.get(name))

  keep_rate = record.get("keep_rate")
  if isinstance(keep_rate, (list, tuple)):   # per-layer keep rates: show the mean
    keep_rate = sum(keep_rate) / len(keep_rate) if keep_rate else None
  dense = is_dense(record)
  return {
      "method": str(record.get("method") or ("dense" if dense else "sparsifiner")),
      "model": str(record.get("model") or ""),
      "keep_rate": _number(keep_rate),
      "top1": _as_percent(record["top1"]),
      "top5": _as_percent(record.get("top5")),
      "loss": _number(record.get("loss")),
      "density": _as_percent(record.get("density")),
      "recall": _as_percent(record.get("recall")),
      "gmacs_total": g("total"),
      "gmacs_mhsa": g("mhsa"),
      "gmacs_attention_matrix": g("attention_matrix"),
      "images_per_s": _number(record.get("images_per_s")),
      "dense": dense,
      "path": path,
  }


def aggregate(json_paths: Iterable[str]) -> list[dict[str, Any]]:
  """Reads run result JSONs into flat table rows (percentages, GMACs).

  Each file holds one result object or a list of them. Rows are sorted by method, then by total GMACs
  (largest first). Row keys: ``CSV_FIELDS``; missing optional values are ``None``.

  Raises:
    SweepError: a file is missing, is not valid JSON, or a result lacks ``top1``.
  """
  rows = []
  for path in json_paths:
    file = paths.resolve(path, "RUN_JSON")
    if not file.exists() or file.is_dir():
      raise SweepError(f"result file {path!r} not found")
    try:
      data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise SweepError(f"{path}: malformed JSON: {e}") from e
    for record in data if isinstance(data, list) else [data]:
      rows.append(_row(record, path))
  if not rows:
    raise SweepError("no run results to aggregate")
  rows.sort(key=lambda r: (r["method"], -(r["gmacs_total"] or 0.0), -(r["keep_rate"] or 2.0)))
  return rows


def _fmt(value, fmt: str) -> str:
  if value is None:
    return "–"
  try:
    return fmt.format(value)
  except (ValueError, TypeError):
    return str(value)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
  header = "| " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
  align = "|" + "|".join(":---" if f in ("method", "model") else "---:" for f, _, _ in TABLE_COLUMNS) + "|"
  lines = [header, align]
  for row in rows:
    cells = [_fmt(row.get(f), fmt) for f, _, fmt in TABLE_COLUMNS]
    if row.get("dense"):
      cells[0] += " (dense)" if "dense" not in cells[0].lower() else ""
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], md_path: str | None, csv_path: str | None
                ) -> tuple[str | None, str | None]:
  """Writes the rows as a Markdown table and/or a CSV (all ``CSV_FIELDS``). Returns the paths."""
  if md_path:
    atomic.write_text(md_path, "Top-1/top-5/density/recall in %, FLOPs in GMACs per image (1 multiply-add "
                      "= 1 MAC); see sparsifiner_jax/evaluation/flops.py for the definitions. Recall: "
                      "the share of the dense attention's probability mass inside the sparse mask "
                      "(sparsifiner_jax/evaluation/recall.py).\n\n"
                      + format_markdown(rows))
  if csv_path:
    def write_csv(tmp):
      with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
          writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_FIELDS})
    atomic.write_file(csv_path, write_csv)
  return md_path, csv_path


def aggregate_to_dir(json_paths: Sequence[str], out_dir: str, *, title: str | None = None
                     ) -> dict[str, str]:
  """``aggregate`` + ``write_table`` + ``pareto_plot`` into ``out_dir`` (results.md, .csv, pareto.png)."""
  rows = aggregate(json_paths)
  md, csv_path = write_table(rows, os.path.join(out_dir, "results.md"),
                             os.path.join(out_dir, "results.csv"))
  png = viz.pareto_plot(rows, os.path.join(out_dir, "pareto.png"), title=title)
  return {"markdown": md, "csv": csv_path, "plot": png, "rows": str(len(rows))}


# --------------------------------------------------------------------------------------------------
# Command line.


PROG = "python -m sparsifiner_jax.sweeps"
USAGE = ("aggregate RUN_JSON... --out DIR [--title T]\n"
         "       run --config C --sweep S --workdir-root R [--script eval.py] [--dry-run] [--keep-going] "
         "[-- ARGS...]")


def define_flags(command: str) -> flags.FlagValues:
  """The flags of ``command`` (``aggregate`` or ``run``), in a flag set of their own."""
  fv = parsing.new_flags()
  if command == "aggregate":
    flags.DEFINE_string("out", None, "Output directory (required).", flag_values=fv)
    flags.DEFINE_string("title", None, "The Pareto plot's title.", flag_values=fv)
  else:
    flags.DEFINE_string("script", "eval.py", "train.py or eval.py.", flag_values=fv)
    flags.DEFINE_string("config", None, "Config spec, path.py[:arg] (required).", flag_values=fv)
    flags.DEFINE_string("sweep", None, "Sweep spec, configs/sweeps/X.py[:arg] (required).", flag_values=fv)
    flags.DEFINE_string("workdir-root", None, "Where each run gets its directory (required).",
                        flag_values=fv)
    flags.DEFINE_bool("dry-run", False, "Print the shell commands only.", flag_values=fv)
    flags.DEFINE_bool("keep-going", False, "Continue after a failed run.", flag_values=fv)
  return fv


def _required(fv: flags.FlagValues, *names: str) -> None:
  missing = [f"--{name}" for name in names if fv[name].value is None]
  if missing:
    parsing.fail(PROG, f"the following flags are required: {', '.join(missing)}")


def main(argv: Sequence[str]) -> int:
  """Runs ``aggregate`` or ``run`` on ``argv`` (program name first); returns the exit code. ``run``: the
  arguments after ``--`` are appended to every command."""
  command = argv[1] if len(argv) > 1 else ""
  if command not in ("aggregate", "run"):
    if command in ("--help", "-h"):
      print(f"usage: {PROG} {USAGE}")
      return 0
    parsing.fail(PROG, f"the first argument must be the command 'aggregate' or 'run', got {command!r}")
  fv = define_flags(command)
  positional = parsing.parse(fv, [argv[0], *argv[2:]], prog=f"{PROG} {command}", usage=USAGE)
  try:
    if command == "aggregate":
      _required(fv, "out")
      if not positional:
        parsing.fail(PROG, "the following arguments are required: RUN_JSON")
      paths.check_reachable(fv["out"].value, "--out")   # a bad URL or bucket: one line before anything runs
      out = aggregate_to_dir(positional, fv["out"].value, title=fv["title"].value)
      print(f"aggregated {out['rows']} runs: {out['markdown']}, {out['csv']}, {out['plot']}")
      return 0
    _required(fv, "config", "sweep", "workdir-root")
    paths.check_reachable(fv["workdir-root"].value, "--workdir-root")
    results = run(fv["script"].value, fv["config"].value, fv["sweep"].value, fv["workdir-root"].value,
                  dry_run=fv["dry-run"].value, extra_args=positional, keep_going=fv["keep-going"].value)
    failed = [r for r in results if r["returncode"] not in (0, None)]
    if failed:
      not_run = sum(r["returncode"] is None for r in results)
      print(f"{PROG}: error: {len(failed)} of {len(results)} runs failed "
            f"(first: {failed[0]['workdir']})" + (f"; {not_run} not run" if not_run else ""),
            file=sys.stderr)
      return 1
    return 0
  except Exception as e:  # pylint: disable=broad-except
    return errors.report(e, (SweepError, OSError, paths.PathError), prog=PROG)


if __name__ == "__main__":
  parsing.run(main)
