"""``make demo``: the whole method on the embedded digits data, end to end, in a few minutes on 2 CPUs.

1. train a dense ViT teacher from scratch (``configs/digits_dense.py``);
2. Sparsifiner phase 1 (``recon``: predictors fit the teacher's attention) and phase 2 (``distill``:
   backbone fine-tuned under the top-k mask) from the teacher (``configs/digits_sparsifiner.py``);
3. evaluate: dense teacher, Sparsifiner, and the teacher under a mask from untrained predictors (what the
   two phases buy); agreement with the teacher's predictions; attention density; attention recall (the
   share of the dense attention's probability mass inside the mask, ``evaluation.recall``); MHSA FLOPs cut;
4. evaluate the Sparsifiner checkpoint at several keep rates -> table + Pareto plot, and draw one
   connectivity picture.

Writes ``WORKDIR/demo.json``, ``summary.md``, ``sweep_table.{md,csv}``, ``pareto.png``, ``connectivity.png``
and the runs' eval JSONs, and prints the table. Runs from an installed package too (``configs`` ships
with it).
It runs on the CPU unless ``JAX_PLATFORMS`` says otherwise (with libtpu installed, JAX would otherwise
probe for a TPU at start-up and print libtpu's notices).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging
from flax import nnx

from configs import digits_dense, digits_sparsifiner
from configs.sweeps import keep_rate as keep_rate_sweep
from sparsifiner_jax import models, sweeps
from sparsifiner_jax.cli import entry, errors, parsing
from sparsifiner_jax.data import input_pipeline
from sparsifiner_jax.evaluation import report, viz
from sparsifiner_jax.io import atomic, paths, weights
from sparsifiner_jax.train import trainer



def _predictions(config, weights_path):
  """Test-set predictions [N] and labels [N] of a weights dir under ``config.model``."""
  model = weights.load_weights(weights_path, models.build_model(config))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0].argmax(-1))
  preds, labels = [], []
  for b in input_pipeline.build_eval_iterator(config.input, config.input.eval_split,
                                              img_size=config.model.img_size,
                                              local_batch_size=int(config.eval_batch_size)):
    keep = b["mask"]
    preds.append(np.asarray(fwd(state, b["image"]))[keep])
    labels.append(b["label"][keep])
  return np.concatenate(preds), np.concatenate(labels)


def _evaluate(config, weights_path: str, out: str) -> dict:
  """``eval.py``'s result for a weights dir, written to ``out`` (JSON) without printing its table."""
  result = report.evaluate_checkpoint(config, weights_path=weights_path)
  atomic.write_json(out, result, default=float)
  return result


def run(workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  teacher_dir = os.path.join(workdir, "dense")
  sparse_dir = os.path.join(workdir, "sparsifiner")

  print("[1/4] dense teacher on digits", flush=True)
  dense_cfg = digits_dense.get_config()
  trainer.train(dense_cfg, teacher_dir)
  teacher_w = os.path.join(teacher_dir, "final")

  print("[2/4] Sparsifiner: recon + distill phases", flush=True)
  sp_cfg = digits_sparsifiner.get_config()
  sp_cfg.init = teacher_w
  sp_cfg.teacher.weights = teacher_w
  trainer.train(sp_cfg, sparse_dir)
  sparse_w = os.path.join(sparse_dir, "final")

  print("[3/4] evaluation", flush=True)
  dense_eval = _evaluate(dense_cfg, teacher_w, os.path.join(workdir, "eval_dense.json"))
  sparse_eval = _evaluate(sp_cfg, sparse_w, os.path.join(workdir, "eval_sparsifiner.json"))
  untrained_eval = _evaluate(sp_cfg, teacher_w, os.path.join(workdir, "eval_untrained_mask.json"))
  p_dense, labels = _predictions(dense_cfg, teacher_w)
  p_sparse, _ = _predictions(sp_cfg, sparse_w)
  agreement = float(np.mean(p_dense == p_sparse))

  print("[4/4] keep-rate sweep, Pareto plot, connectivity picture", flush=True)
  run_jsons = [os.path.join(workdir, "eval_dense.json")]
  for rate in keep_rate_sweep.KEEP_RATES:
    cfg = digits_sparsifiner.get_config()
    cfg.model.keep_rate = rate
    run_jsons.append(os.path.join(workdir, "sweep", f"keep_{rate}.json"))
    _evaluate(cfg, sparse_w, run_jsons[-1])
  rows = sweeps.aggregate(run_jsons)
  table_md = os.path.join(workdir, "sweep_table.md")
  sweeps.write_table(rows, table_md, os.path.join(workdir, "sweep_table.csv"))
  pareto = viz.pareto_plot(rows, os.path.join(workdir, "pareto.png"))
  picture = _connectivity_picture(sp_cfg, sparse_w, os.path.join(workdir, "connectivity.png"))

  mhsa_cut = 1 - sparse_eval["flops"]["attention_matrix"] / sparse_eval["flops"]["attention_matrix_dense"]
  summary = dict(
      dense_top1=dense_eval["top1"], sparsifiner_top1=sparse_eval["top1"],
      untrained_mask_top1=untrained_eval["top1"], agreement_with_teacher=agreement,
      keep_rate=sp_cfg.model.keep_rate, attention_density=sparse_eval["density"],
      untrained_mask_density=untrained_eval["density"], dense_recall=dense_eval["recall"],
      attention_recall=sparse_eval["recall"], untrained_mask_recall=untrained_eval["recall"],
      attention_matrix_flops_cut=mhsa_cut,
      mhsa_flops_cut=1 - sparse_eval["flops"]["mhsa"] / sparse_eval["flops"]["mhsa_dense"],
      total_flops_cut=1 - sparse_eval["flops"]["total"] / sparse_eval["flops"]["total_dense"],
      test_examples=int(len(labels)), minutes=(time.time() - t0) / 60,
      files=dict(table=table_md, pareto=pareto, connectivity=picture))
  lines = summary_lines(summary)
  atomic.write_text(os.path.join(workdir, "summary.md"), "\n".join(lines) + "\n")
  atomic.write_json(os.path.join(workdir, "demo.json"), summary)
  print("\n".join(lines))
  for k, v in summary["files"].items():
    print(f"{k}: {v}")
  print(f"summary: {os.path.join(workdir, 'demo.json')} ({summary['minutes']:.1f} min)")
  return summary


def summary_lines(summary: dict) -> list[str]:
  """``summary.md``'s lines (a Markdown table and a FLOPs sentence) from ``run``'s summary dict:
  fractions in, percent out; one row per model with top-1, attention density, attention recall (the
  mean over layers of the kept share of the dense attention's probability mass) and agreement."""
  def pct(key, digits=2):
    return f"{100 * summary[key]:.{digits}f}"

  return [
      "| model | test top-1 % | attention density % | attention recall % | agreement with teacher % |",
      "|---|---|---|---|---|",
      f"| dense ViT (teacher) | {pct('dense_top1')} | 100.00 | {pct('dense_recall')} | 100.00 |",
      f"| Sparsifiner keep {summary['keep_rate']} | {pct('sparsifiner_top1')} | "
      f"{pct('attention_density')} | {pct('attention_recall')} | {pct('agreement_with_teacher')} |",
      f"| teacher + untrained predictor mask | {pct('untrained_mask_top1')} | "
      f"{pct('untrained_mask_density')} | {pct('untrained_mask_recall')} | - |",
      "",
      f"Attention-matrix MACs (QK^T, AV + predictor) cut: {pct('attention_matrix_flops_cut', 1)} %; "
      f"MHSA MACs cut: {pct('mhsa_flops_cut', 1)} %; total: {pct('total_flops_cut', 1)} %.",
  ]


def _connectivity_picture(config, weights_path, out):
  model = weights.load_weights(weights_path, models.build_model(config))
  batch = next(iter(input_pipeline.build_eval_iterator(
      config.input, config.input.eval_split, img_size=config.model.img_size, local_batch_size=8)))
  _, aux = model(jnp.asarray(batch["image"]))
  mean, std = np.asarray(config.input.mean), np.asarray(config.input.std)
  image = np.clip(batch["image"][0] * std + mean, 0, 1)
  g = model.config.grid_size
  return viz.connectivity_grid(image, aux["masks"], query_patch=(g // 2, g // 2), grid_size=g,
                               out_path=out, token_order=model.config.token_order)


PROG = "python -m sparsifiner_jax.demo"


def define_flags() -> flags.FlagValues:
  """The command's flags, in a flag set of their own (``cli.entry`` defines train.py's in the global one)."""
  fv = parsing.new_flags()
  flags.DEFINE_string("workdir", "workdirs/demo", "Where the demo writes its runs and results.",
                      flag_values=fv)
  flags.DEFINE_bool("debug", False, "Show the traceback on errors.", flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> int:
  """Runs the demo on ``argv`` (program name first); returns the exit code."""
  fv = define_flags()
  positional = parsing.parse(fv, argv, prog=PROG, usage="[--workdir DIR] [--debug]")
  if positional:
    parsing.fail(PROG, f"takes no positional arguments, got {positional}")
  workdir, debug = fv["workdir"].value, fv["debug"].value
  if "JAX_PLATFORMS" not in os.environ:   # a CPU-sized run: never probe for accelerators
    jax.config.update("jax_platforms", "cpu")
  absl_logging.set_verbosity(absl_logging.INFO if debug else absl_logging.ERROR)
  try:
    paths.require_local(workdir, "--workdir")
    run(workdir)
  except Exception as e:  # pylint: disable=broad-except
    return errors.report(e, entry.USER_ERRORS, debug=debug)
  return 0


if __name__ == "__main__":
  parsing.run(main)
