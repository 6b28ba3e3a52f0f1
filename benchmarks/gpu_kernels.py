"""The Pallas GPU kernels compiled for an H100 without a GPU: registers, spills, shared memory, PTX size.

  python benchmarks/gpu_kernels.py [--json benchmarks/results/DATE_gpu_kernels.json]

Needs XLA's GPU compiler (``make gpu-compiler``). For DeiT-S's heads (6 x 64) and 2 examples, at 197
tokens (224 px) and 785 (448 px), bf16 and float32: the mask-selection kernel in both loop forms of its
bisections (rolled, as compiled, and unrolled in Python; only where it fits, ``pallas/topk_mask.py: fits``)
and the attention's forward, dq and dk/dv kernels; the block-sparse kernels at keep 0.25 with their
declared FLOPs against the fused dense kernel's. Figures from ``ptxas -v --gpu-name sm_90a`` and XLA's
launch sequence (``compile.gpu_kernels``). Nothing here is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # compile-only
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sparsifiner_jax.attention import bitmask, blocks  # noqa: E402
from sparsifiner_jax.attention.pallas import attention as pallas_attention  # noqa: E402
from sparsifiner_jax.attention.pallas import block_sparse  # noqa: E402
from sparsifiner_jax.attention.pallas import topk_mask as pallas_topk_mask  # noqa: E402
from sparsifiner_jax.compile import cost, gpu_kernels, targets  # noqa: E402

B, H, D = 2, 6, 64
ATTENTION = ("sparse_attention_fwd", "sparse_attention_dq", "sparse_attention_dkv")
BLOCKS = ("block_sparse_attention_fwd", "block_sparse_attention_dq", "block_sparse_attention_dkv")


def _args(n: int, dtype):
  spec = NamedSharding(Mesh(np.array(targets.devices("h100:1")[:1]), ("data",)), P())
  arg = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=spec)   # noqa: E731
  return arg((B, n, H, D)), arg((B, H, D + 1, n // 6), jnp.float32), arg((n // 6, n), jnp.float32), \
      arg((B, H, bitmask.words(n), n), jnp.int32)


def _compile(fn, args, names) -> list[gpu_kernels.KernelStats]:
  with tempfile.TemporaryDirectory() as dump:
    jax.jit(fn).trace(*args).lower().compile({"xla_dump_to": dump})
    return gpu_kernels.kernel_stats(dump, names)


def cases():
  for n in (197, 785):
    for dtype in (jnp.bfloat16, jnp.float32):
      q, weights, basis, packed = _args(n, dtype)
      if pallas_topk_mask.fits(n, n // 6, D, dtype, "gpu"):
        for unroll in (False, True):
          def mask(q, weights, basis, unroll=unroll):
            original = pallas_topk_mask._unroll   # pylint: disable=protected-access
            pallas_topk_mask._unroll = lambda *_: unroll   # pylint: disable=protected-access
            try:
              return pallas_topk_mask.lowrank_topk_packed(q, weights, basis, scale=0.125, coef_k=8,
                                                          k=-(-n // 4), compute_dtype=dtype, backend="gpu")
            finally:
              pallas_topk_mask._unroll = original   # pylint: disable=protected-access
          for s in _compile(mask, (q, weights, basis), ("lowrank_topk_mask",)):
            yield dict(n=n, dtype=jnp.dtype(dtype).name, loops="unrolled" if unroll else "rolled",
                       **dataclasses.asdict(s))

      def attention_grad(q, k, v, packed):
        loss = lambda q, k, v: jnp.sum(pallas_attention.flash_attention(   # noqa: E731
            q, k, v, packed, scale=D ** -0.5, backend="gpu"))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
      for s in _compile(attention_grad, (q, q, q, packed), ATTENTION):
        yield dict(n=n, dtype=jnp.dtype(dtype).name, loops="", **dataclasses.asdict(s))


def block_cases():
  """The block-sparse kernels at keep 0.25, with their declared FLOPs (``pl.CostEstimate``, forward and
  backward) against the fused dense kernel's on the same shapes."""
  for n, block in ((197, 32), (785, 64), (785, 128)):
    for dtype in (jnp.bfloat16, jnp.float32):
      q = _args(n, dtype)[0]
      nb, kept = blocks.count(n, block), blocks.budget(0.25, n, block)
      table = jax.ShapeDtypeStruct((B, H, nb, kept), jnp.int32, sharding=q.sharding)

      def grads(q, k, v, table, block=block):
        loss = lambda q, k, v: jnp.sum(block_sparse.block_sparse_attention(   # noqa: E731
            q, k, v, table, block=block, scale=D ** -0.5, backend="gpu"))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

      def dense_grads(q, k, v):
        loss = lambda q, k, v: jnp.sum(pallas_attention.flash_attention(   # noqa: E731
            q, k, v, None, scale=D ** -0.5, backend="gpu"))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

      flops = cost.declared_kernel_costs(jax.make_jaxpr(grads)(q, q, q, table))["flops"]
      dense = cost.declared_kernel_costs(jax.make_jaxpr(dense_grads)(q, q, q))["flops"]
      for s in _compile(grads, (q, q, q, table), BLOCKS):
        yield dict(n=n, dtype=jnp.dtype(dtype).name, loops=f"block {block}, keep {kept}/{nb}",
                   flops_vs_dense=flops / dense, **dataclasses.asdict(s))


def table(rows) -> str:
  out = ["| kernel | N | dtype | loops / blocks | grid | registers / thread | spilled bytes "
         "| shared memory KiB | PTX KB | declared FLOPs vs dense |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['name']} | {r['n']} | {r['dtype']} | {r['loops'] or '-'} | "
               f"{'x'.join(map(str, r['grid']))} | {r['registers']} | {r['spill_bytes']} | "
               f"{r['shared_bytes'] / 1024:.1f} | {r['ptx_bytes'] / 1000:.0f} | "
               f"{'%.2fx' % r['flops_vs_dense'] if 'flops_vs_dense' in r else '-'} |")
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  rows = list(cases()) + list(block_cases())
  print(table(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(device="NVIDIA H100 SXM (sm_90a), compile only",
                                                       jax=jax.__version__, rows=rows), indent=1))


if __name__ == "__main__":
  main()
