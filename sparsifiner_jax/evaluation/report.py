"""``eval.py``: evaluate a checkpoint on any split; JSON + a printed table.

Weights come from ``--weights DIR`` (a weights dir: ours, or converted timm weights), from a training
checkpoint of the workdir (``--step N``, or ``--step latest``), or else from the workdir's ``final/``,
then ``best/``, then its newest training checkpoint (a run still in progress). The model is built from
the config, so sparsity knobs can differ from training: ``--config.model.keep_rate=0.1`` evaluates the
same checkpoint at another keep rate.

Reported: top-1, top-5, loss, realised attention density (overall and per layer), attention recall
(overall and per layer: the share of the dense attention's probability mass inside the sparse mask,
``evaluation.recall``; 1 for a dense layer), FLOPs (analytic, with the realised mask and basis sparsity:
total, MHSA, attention matrix, and their dense references), images/s of the jitted forward, peak memory.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from sparsifiner_jax import config_check, models, sharding
from sparsifiner_jax.evaluation import flops
from sparsifiner_jax.evaluation.evaluator import Evaluator
from sparsifiner_jax.io import atomic, checkpoint, paths, weights
from sparsifiner_jax.models.vit import token_schedule


def parse_step(step: str | None) -> int | None:
  """``--step``: None (not given), ``"latest"`` (-1) or a non-negative step number."""
  if step is None:
    return None
  if step == "latest":
    return -1
  if not step.isdigit():
    raise ValueError(f"--step={step!r} is not allowed; allowed: a step number or 'latest'")
  return int(step)


def resolve_weights(workdir: epath.Path | None, weights_path: str | None, step: int | None = None
                    ) -> tuple[str, int | None]:
  """Where to read parameters: ``(weights dir, None)`` or ``(checkpoint dir, step)`` with step -1 for
  the newest (see the module docstring for the order). ``workdir``: resolved (``paths.check_reachable``)."""
  if weights_path:
    if step is not None:
      raise ValueError("give either --weights or --step, not both")
    return os.fspath(weights_path), None
  if not workdir:
    raise ValueError("give --weights DIR or --workdir DIR (a training run)")
  ckpt = workdir / "ckpt"
  if step is not None:
    return os.fspath(ckpt), step
  for name in ("final", "best"):
    if (workdir / name).is_dir():
      return os.fspath(workdir / name), None
  if ckpt.is_dir() and any(d.name.isdigit() for d in ckpt.iterdir()):
    return os.fspath(ckpt), -1
  raise FileNotFoundError(f"workdir {os.fspath(workdir)!r} has no final/ or best/ weights and no "
                          "training checkpoint; train first or pass --weights DIR")


def load_params(model: nnx.Module, source: str, step: int | None, mesh) -> str:
  """Loads ``source`` (``resolve_weights``) into ``model`` in place; returns what was read, for the
  report (a weights dir, or ``<ckpt dir>@<step>``)."""
  path = paths.resolve(source)
  if step is None:
    weights.load_weights(path, model)
    return os.fspath(path)
  _, params, _ = models.split_params(model)
  abstract = sharding.abstract(params, sharding.tree_shardings(mesh, params))
  step, params = checkpoint.restore_params(path, abstract, None if step < 0 else step)
  nnx.update(model, params["predictor"], params["backbone"])
  return f"{os.fspath(path)}@{step}"


def peak_memory_bytes() -> int:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # host RSS (CPU backend)


def throughput(model, batch: int, img_size: int, in_chans: int, reps: int = 3) -> float:
  graphdef, state = nnx.split(model)
  state = models.cast_kernels(state, model.config.dtype)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  x = jnp.zeros((batch, img_size, img_size, in_chans), jnp.float32)
  fwd(state, x).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fwd(state, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return batch / float(np.median(times))


def evaluate_checkpoint(config, *, workdir=None, weights_path=None, step=None) -> dict[str, Any]:
  """:func:`evaluate` from the library: validates ``config`` (``config_check.validate(config, "eval")``)
  and resolves ``workdir`` (a local path or gs:// URL) first."""
  checked = config_check.validate(config, "eval")
  root = paths.check_reachable(workdir, "--workdir") if workdir else None
  return evaluate(config, checked, workdir=root, weights_path=weights_path, step=step)


def evaluate(config, checked: config_check.Checked, *, workdir: epath.Path | None = None,
             weights_path=None, step=None) -> dict[str, Any]:
  """The report of the weights ``resolve_weights`` picks, evaluated on ``config.input.eval_split``;
  ``checked``: ``config_check.validate(config, "eval")``, ``workdir``: resolved."""
  from sparsifiner_jax.data import input_pipeline  # deferred: imports TensorFlow
  split = config.input.eval_split
  source, step = resolve_weights(workdir, weights_path, step)
  model = models.build_model(config)
  mesh = checked.mesh
  loaded = load_params(model, source, step, mesh)
  graphdef, params, rest = models.split_params(model)
  with jax.set_mesh(mesh):
    ev = Evaluator(config, mesh).run(graphdef, params, rest)
  # Realised FLOPs from one eval batch's masks.
  it = input_pipeline.build_eval_iterator(config.input, split, img_size=config.model.img_size,
                                          local_batch_size=min(int(config.eval_batch_size), 64))
  images = next(iter(it))["image"]
  _, aux = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  report = flops.from_aux(model.config, aux, model) if model.config.sparse else flops.count(model.config)
  bs = min(int(config.eval_batch_size), 32)
  out = dict(
      method=config.get("method", model.config.attention_pattern if model.config.sparse else "dense"),
      model=config.model_name, weights=loaded, split=split,
      keep_rate=config.model.keep_rate, num_examples=ev["num_examples"],
      top1=ev["top1"], top5=ev["top5"], loss=ev["loss"], density=ev["density"],
      layer_density=ev["layer_density"], recall=ev["recall"], layer_recall=ev["layer_recall"],
      tokens_per_layer=list(token_schedule(model.config)),
      flops=report.totals, gmacs=report.gmacs,
      images_per_s=throughput(model, bs, config.model.img_size, model.config.in_chans),
      throughput_batch=bs, peak_memory_bytes=peak_memory_bytes(),
      device=jax.devices()[0].device_kind, backend=jax.default_backend())
  return out


def format_table(r: dict[str, Any]) -> str:
  rows = [("model", r["model"]), ("keep_rate", r["keep_rate"]), ("examples", r["num_examples"]),
          ("top-1 %", f"{100 * r['top1']:.2f}"), ("top-5 %", f"{100 * r['top5']:.2f}"),
          ("loss", f"{r['loss']:.4f}"), ("attention density %", f"{100 * r['density']:.2f}"),
          ("per-layer density %", " ".join(f"{100 * d:.1f}" for d in r["layer_density"])),
          ("attention recall %", f"{100 * r['recall']:.2f}"),
          ("per-layer recall %", " ".join(f"{100 * x:.1f}" for x in r["layer_recall"])),
          ("total GMACs", f"{r['gmacs']['total']:.4f}"), ("MHSA GMACs", f"{r['gmacs']['mhsa']:.4f}"),
          ("attention-matrix GMACs", f"{r['gmacs']['attention_matrix']:.5f}"),
          ("images/s", f"{r['images_per_s']:.1f} (batch {r['throughput_batch']}, {r['device']})"),
          ("peak memory MiB", f"{r['peak_memory_bytes'] / 2**20:.0f}")]
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(config, checked: config_check.Checked, *, workdir: epath.Path | None = None,
         weights_path: epath.Path | None = None, step=None, out: epath.Path | None = None
         ) -> dict[str, Any]:
  """eval.py: :func:`evaluate`, the JSON written to ``out`` (default: ``workdir/eval.json``, else beside
  ``weights_path``) and a table printed. The paths are resolved and ``checked`` is ``validate``'s."""
  result = evaluate(config, checked, workdir=workdir, weights_path=weights_path, step=parse_step(step))
  if not out:
    out = workdir / "eval.json" if workdir else weights_path.parent / "eval.json"
  if jax.process_index() == 0:
    atomic.write_json(out, result, default=float)
    print(format_table(result))
    print(f"wrote {os.fspath(out)}")
  return result
