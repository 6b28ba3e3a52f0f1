"""Every Pallas kernel compiled for every accelerator target, with no accelerator: the mask selection, the
attention forward, dq and dk/dv, in bf16 and f32, for an H100 (Triton -> sm_90a PTX and cubin) and TPU
v4, v5e, v5p and v6e (Mosaic, libtpu).

Interpreted tests check the kernels' numbers; only these check that they lower and fit: a kernel the
interpreter runs can still be rejected by the Triton or Mosaic lowering, or exceed shared memory or VMEM.
The block-sparse kernels likewise (``test_block_kernels_compile``). Shapes: DeiT-S at 224 px (N = 197:
not a multiple of the GPU blocks, one TPU block) and at 448 px (N = 785: a ragged last block of 128 rows
on TPU, 64 on GPU)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsifiner_jax.attention import backend, bitmask, blocks
from sparsifiner_jax.attention.pallas import attention as pallas_attention
from sparsifiner_jax.attention.pallas import block_sparse
from sparsifiner_jax.attention.pallas import topk_mask as pallas_topk_mask
from sparsifiner_jax.compile import clock, gpu_kernels, targets
from conftest import need_compiler_for

TARGETS = ("h100:1", "v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")
B, H, D = 2, 6, 64                 # DeiT-S heads, 2 examples
KERNELS = ("lowrank_topk_mask", "sparse_attention_fwd", "sparse_attention_dq", "sparse_attention_dkv")


@functools.lru_cache(maxsize=None)
def _device(topology: str):
  return targets.devices(topology)[0]


def _compile(topology: str, n: int, dtype, with_mask: bool, dense: bool = False):
  """Compiles, for one device of ``topology``, the predictor's mask kernel (``with_mask``) and the
  attention's forward and gradient (dq, dk/dv kernels), masked or ``dense`` (no mask)."""
  platform = targets.platform(topology)
  spec = NamedSharding(Mesh(np.array([_device(topology)]), ("data",)), P())
  arg = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=spec)   # noqa: E731
  m = n // 6

  def program(q, k, v, packed, weights, basis):
    if with_mask:
      packed = pallas_topk_mask.lowrank_topk_packed(q, weights, basis, scale=0.125, coef_k=8, k=-(-n // 4),
                                             compute_dtype=dtype, backend=platform)
    attend = lambda q, k, v: pallas_attention.flash_attention(   # noqa: E731
        q, k, v, None if dense else packed, scale=D ** -0.5, backend=platform)
    out, grads = jax.value_and_grad(lambda *qkv: jnp.sum(attend(*qkv)), argnums=(0, 1, 2))(q, k, v)
    return out, grads

  args = (arg((B, n, H, D)), arg((B, n, H, D)), arg((B, n, H, D)),
          arg((B, H, bitmask.words(n), n), jnp.int32), arg((B, H, D + 1, m), jnp.float32),
          arg((m, n), jnp.float32))
  with backend.compiling_for(platform):
    return jax.jit(program).trace(*args).lower().compile()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("n", [197, 785])
@pytest.mark.parametrize("topology", TARGETS)
def test_every_kernel_compiles(topology, n, dtype):
  need_compiler_for(topology)
  platform = targets.platform(topology)
  with_mask = pallas_topk_mask.fits(n, n // 6, D, dtype, platform)
  compiled = _compile(topology, n, dtype, with_mask)
  text = compiled.as_text()
  call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  expected = KERNELS if with_mask else KERNELS[1:]
  assert text.count(call) == len(expected)
  for name in expected:
    assert name in text, f"{name} is not in the program compiled for {topology}"
  assert compiled.memory_analysis().output_size_in_bytes > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("topology", TARGETS)
def test_dense_kernels_compile(topology, dtype):
  """The fused dense attention (no mask), forward and gradient, at 785 tokens (ragged last blocks)."""
  need_compiler_for(topology)
  text = _compile(topology, 785, dtype, with_mask=False, dense=True).as_text()
  call = "tpu_custom_call" if targets.platform(topology) == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(call) == 3 and all(name in text for name in KERNELS[1:])


def test_gpu_mask_kernel_fits_where_deit_s_224_runs():
  """The GPU mask kernel stages its basis in shared memory: DeiT-S at 224 px fits (so ``auto`` runs it),
  448 px does not (``auto`` selects in XLA there)."""
  assert pallas_topk_mask.fits(197, 32, D, jnp.bfloat16, "gpu")
  assert pallas_topk_mask.fits(197, 32, D, jnp.float32, "gpu")
  assert not pallas_topk_mask.fits(785, 130, D, jnp.bfloat16, "gpu")
  assert pallas_topk_mask.fits(785, 130, D, jnp.bfloat16, "tpu")


def test_gpu_kernel_stats_from_ptxas(tmp_path):
  """``compile.gpu_kernels``: each named kernel of a program compiled for an H100, with its launch grid,
  shared memory (XLA's launch sequence) and registers and spills (``ptxas -v``)."""
  need_compiler_for("h100:1")
  spec = NamedSharding(Mesh(np.array([_device("h100:1")]), ("data",)), P())
  arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=spec)   # noqa: E731
  n, m = 197, 32
  fn = functools.partial(pallas_topk_mask.lowrank_topk_packed, scale=0.125, coef_k=8, k=50,
                         compute_dtype=jnp.bfloat16, backend="gpu")
  args = (arg((B, n, H, D), jnp.bfloat16), arg((B, H, D + 1, m), jnp.float32), arg((m, n), jnp.float32))
  jax.jit(fn).trace(*args).lower().compile({"xla_dump_to": str(tmp_path)})
  (stats,) = gpu_kernels.kernel_stats(tmp_path, ("lowrank_topk_mask",))
  assert stats.name == "lowrank_topk_mask" and stats.grid == (B, H, 13)     # 197 rows in blocks of 16
  assert 0 < stats.registers <= 255 and stats.spill_bytes == 0
  assert stats.shared_bytes > 0 and stats.ptx_bytes > 0


BLOCK_KERNELS = {   # TPU: the resident forward and backward (the CLS row in them); GPU: dq, then dk/dv (the
    # CLS row in XLA)
    "tpu": ("block_sparse_attention_resident_fwd", "block_sparse_attention_resident_bwd"),
    "gpu": ("block_sparse_attention_fwd", "block_sparse_attention_dq", "block_sparse_attention_dkv"),
}


PER_BLOCK_KERNELS = ("block_sparse_attention_fwd", "block_sparse_attention_cls_fwd",
                     "block_sparse_attention_bwd", "block_sparse_attention_cls_bwd")


@pytest.mark.parametrize("topology,n,block,forward", [
    (t, n, b, f) for t in TARGETS for n, b, f in [(197, 32, "resident"), (785, 128, "resident"),
                                                  (785, 128, "per_block")]
    if f == "resident" or targets.platform(t) == "tpu"])
def test_block_kernels_compile(topology, n, block, forward, monkeypatch):
  """The block-sparse kernels (forward and backward; bf16) at DeiT-S 224 px in blocks of 32 and 448 px in
  blocks of 128 (both with a ragged last block), with the dense CLS row as the models run them: on TPU two
  heads of 64 per grid step in the qkv layout, the CLS row in the kernels; ``per_block``: the TPU kernels
  that sequences too long for the resident ones take (grids over kept blocks, the CLS row apart). Traced
  for the chip (its ``device_kind``) as ``compile_for`` traces: the resident forward reads the small qkv
  whole from VMEM (``common.whole_in_vmem``); the long-sequence tests below compile the windowed one."""
  need_compiler_for(topology)
  if forward == "per_block":
    monkeypatch.setattr(block_sparse, "_RESIDENT_BYTES", 0)
  platform = targets.platform(topology)
  spec = NamedSharding(Mesh(np.array([_device(topology)]), ("data",)), P())
  nb = blocks.count(n, block)
  kept = blocks.budget(0.25, n, block)

  def program(q, k, v, table):
    attend = lambda q, k, v: block_sparse.block_sparse_attention(   # noqa: E731
        q, k, v, table, block=block, scale=D ** -0.5, dense_rows=1, backend=platform)
    return jax.value_and_grad(lambda *qkv: jnp.sum(attend(*qkv)), argnums=(0, 1, 2))(q, k, v)

  qkv = jax.ShapeDtypeStruct((B, n, H, D), jnp.bfloat16, sharding=spec)
  table = jax.ShapeDtypeStruct((B, H, nb, kept), jnp.int32, sharding=spec)
  with backend.compiling_for(platform, device_kind=_device(topology).device_kind):
    compiled = targets.compile_lowered(jax.jit(program).trace(qkv, qkv, qkv, table).lower(), platform)
  text = compiled.as_text()
  call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  expected = PER_BLOCK_KERNELS if forward == "per_block" else BLOCK_KERNELS[platform]
  assert text.count(call) == len(expected) and all(name in text for name in expected)


@pytest.mark.parametrize("n,kept,backward", [(3137, 7, False), (3137, 25, False), (1500, 12, True)],
                         ids=["blocks896", "dense896", "dense_1500_tokens_backward"])
def test_resident_kernels_fit_vmem_at_long_sequences(n, kept, backward):
  """The resident kernels where their VMEM is tightest (v5e: 16 MiB scoped): 896 px in blocks of 128, 7
  kept of 25 with the CLS row (one chunk; its loop over query blocks rolled) and every block kept (four
  chunks); 1,500 tokens dense, forward and backward (two chunks). Unrolled, the first needed 30 MB and
  the last 22 MB: Mosaic keeps the temporaries of unrolled bodies apart."""
  topology = "v5e:2x2"
  need_compiler_for(topology)
  spec = NamedSharding(Mesh(np.array([_device(topology)]), ("data",)), P())
  nb = blocks.count(n, 128)
  dense_rows = 0 if kept == nb else 1

  def program(q, k, v, table):
    attend = lambda q, k, v: block_sparse.block_sparse_attention(   # noqa: E731
        q, k, v, table, block=128, scale=D ** -0.5, dense_rows=dense_rows, backend="tpu")
    if backward:
      return jax.value_and_grad(lambda *qkv: jnp.sum(attend(*qkv)), argnums=(0, 1, 2))(q, k, v)
    return attend(q, k, v)

  qkv = jax.ShapeDtypeStruct((1, n, H, D), jnp.bfloat16, sharding=spec)
  table = jax.ShapeDtypeStruct((1, H, nb, kept), jnp.int32, sharding=spec)
  with backend.compiling_for("tpu"):
    compiled = targets.compile_lowered(jax.jit(program).trace(qkv, qkv, qkv, table).lower(), "tpu")
  text = compiled.as_text()
  assert "block_sparse_attention_resident_fwd" in text
  assert ("block_sparse_attention_resident_bwd" in text) == backward


def test_resident_backward_writes_the_qkv_gradient_in_place():
  """The resident backward writes dq, dk, dv into one result in the qkv projection's layout, and q, k, v
  split off as the model does (``jnp.split``): the projection's weight gradient reads the kernel's result
  directly. No other program op makes an array of the qkv gradient's size (three outputs left XLA a
  concatenation, and indexed q, k, v three zero-padded copies: a third of a 785-token backward)."""
  topology = "v5e:2x2"
  need_compiler_for(topology)
  spec = NamedSharding(Mesh(np.array([_device(topology)]), ("data",)), P())
  bsz, n, block = 2, 197, 32
  nb = blocks.count(n, block)

  def program(x, w, table):
    def loss(w):
      qkv = (x @ w).reshape(bsz, n, 3, H, D)
      q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
      return jnp.sum(block_sparse.block_sparse_attention(q, k, v, table, block=block, scale=D ** -0.5,
                                                         dense_rows=1, backend="tpu"))
    return jax.grad(loss)(w)

  args = (jax.ShapeDtypeStruct((bsz, n, H * D), jnp.bfloat16, sharding=spec),
          jax.ShapeDtypeStruct((H * D, 3 * H * D), jnp.bfloat16, sharding=spec),
          jax.ShapeDtypeStruct((bsz, H, nb, 2), jnp.int32, sharding=spec))
  with backend.compiling_for("tpu"):
    text = targets.compile_lowered(jax.jit(program).trace(*args).lower(), "tpu").as_text()
  computations, entry = clock._computations(text)
  qkv_sized = []
  for line in computations[entry]:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]+)\]\S* (\S+)\(", line)
    if m and m[3] not in ("bitcast", "get-tuple-element", "parameter") and \
        np.prod([int(x) for x in m[2].split(",")]) == bsz * n * 3 * H * D:
      qkv_sized.append(m[1])
  assert len(qkv_sized) == 2 and any("resident_bwd" in name for name in qkv_sized), qkv_sized


@pytest.mark.parametrize("topology", [t for t in TARGETS if targets.platform(t) == "tpu"])
def test_block_predictor_compiles(topology):
  """Block mode's predictor kernels (``pallas.block_predictor``, TPU only) at DeiT-S 224 px in blocks
  of 32, bf16: the projections, forward and the reconstruction phase's gradient; the kept-block table.
  Each with q and k in windows (the chip unknown) and read whole from VMEM (``common.whole_in_vmem``)."""
  need_compiler_for(topology)
  from sparsifiner_jax.attention.pallas import block_predictor   # pylint: disable=import-outside-toplevel
  spec = NamedSharding(Mesh(np.array([_device(topology)]), ("data",)), P())
  n, m, c = 197, 197 // 6, D // 2

  def program(qkv, *params):
    run = lambda *a: block_predictor.projections(*a, block=32, dtype=jnp.bfloat16)   # noqa: E731
    loss = lambda *a: sum(jnp.sum(x) for x in run(*a))   # noqa: E731
    return jax.value_and_grad(loss, argnums=tuple(range(6)))(qkv, *params)

  def table(qkv, *params):
    consts = block_predictor.constants(*params[:5], heads=H, dtype=jnp.bfloat16, pooled=params[5])
    return block_predictor.table(qkv, consts, block=32, selection=block_predictor.Selection(2, 8, H ** -0.5))

  shapes = [((B, n, 3, H, D), jnp.bfloat16), ((1, n, m), jnp.float32)] + [((D, c), jnp.float32),
                                                                          ((c,), jnp.float32)] * 2
  args = [jax.ShapeDtypeStruct(s, t, sharding=spec) for s, t in shapes]
  basis = jax.ShapeDtypeStruct((m, 7), jnp.float32, sharding=spec)
  for kind in (None, _device(topology).device_kind):
    with backend.compiling_for("tpu", device_kind=kind):
      text = targets.compile_lowered(jax.jit(program).trace(*args).lower(), "tpu").as_text()
      table_text = targets.compile_lowered(jax.jit(table).trace(*args, basis).lower(), "tpu").as_text()
    assert text.count("tpu_custom_call") == 1 and "block_predictor_projections" in text
    assert table_text.count("tpu_custom_call") == 1 and "block_predictor_table" in table_text
