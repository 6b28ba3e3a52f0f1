"""The fused Pallas masked attention (``attention.pallas.attention``) against the reference executor
``masked_attention``: forward and gradients, both backends in interpret mode on CPU, plus a Mosaic
compile for a real TPU topology (needs libtpu, no TPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_topk_rows, v5e_mesh
from sparsifiner_jax.attention import AttentionMask, masked_attention
from sparsifiner_jax.attention.mask import keep_mask
from sparsifiner_jax.attention import bitmask
from sparsifiner_jax.attention.pallas.attention import flash_attention

BACKENDS = ("tpu", "gpu")


def _qkv(shape, dtype=jnp.float32, seed=0):
  """Three ``[B, N, H, d]`` normal arrays."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def _topk_mask(b, h, n, keep, seed=1, lead=None):
  """A random top-k ``AttentionMask`` (``k = ceil(keep * n)`` keys per sparse row, dense CLS row) and its
  packed form. ``lead`` overrides the mask's ``(B|1, H|1)``."""
  k = max(1, int(np.ceil(keep * n)))
  mb, mh = lead or (b, h)
  mask = keep_mask(random_topk_rows((mb, mh, n - 1, n), k, seed), k, num_dense_rows=1)
  return mask, bitmask.pack_rows(mask.sparse_rows(), 1)


def _run(q, k, v, packed, backend, **blocks):
  d = q.shape[-1]
  return flash_attention(q, k, v, packed, scale=d ** -0.5, backend=backend, interpret=True, **blocks)


def _grads(fn, q, k, v, seed=3):
  """``(out, dq, dk, dv)`` of the scalar loss ``sum(fn(q, k, v) * w)``, w random (one jitted vjp)."""
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    w = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32)
    return (out, *vjp(w))
  return run(q, k, v)


def _check_against_reference(q, k, v, mask, packed, backend, atol, **blocks):
  ref = _grads(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v)
  got = _grads(lambda q, k, v: _run(q, k, v, packed, backend, **blocks), q, k, v)
  for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
    assert g.shape == r.shape, name
    assert bool(jnp.all(jnp.isfinite(g))), name
    r32, g32 = r.astype(jnp.float32), g.astype(jnp.float32)
    tol = atol * max(1.0, float(jnp.max(jnp.abs(r32))))
    np.testing.assert_allclose(np.asarray(g32), np.asarray(r32), atol=tol, rtol=0, err_msg=name)
  return got


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_block_fp32(backend):
  """N = 17 in 3 query blocks of 8 and one key block of 32 (15 padded keys), the CLS row dense."""
  q, k, v = _qkv((2, 17, 2, 8))
  mask, packed = _topk_mask(2, 2, 17, 0.25)
  _check_against_reference(q, k, v, mask, packed, backend, 1e-5, block_q=8, block_k=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_pruning_length_fp32(backend):
  """After token pruning the sequence is just shorter (N = 139 of 197); the default blocks."""
  q, k, v = _qkv((1, 139, 2, 8))
  mask, packed = _topk_mask(1, 2, 139, 0.25)
  _check_against_reference(q, k, v, mask, packed, backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
  """bf16 products (float32 accumulation and softmax): within 2e-2 of max|ref| (bf16 has 8 mantissa bits;
  the flash form rounds unnormalised probabilities and the reference normalised ones)."""
  q, k, v = _qkv((2, 33, 2, 16), jnp.bfloat16)
  mask, packed = _topk_mask(2, 2, 33, 0.25)
  _check_against_reference(q, k, v, mask, packed, backend, 2e-2, block_q=16, block_k=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_all_empty_rows_skipped_blocks(backend):
  """One call, mask ``[B, 1, N, W]`` broadcast over heads: example 0 keeps every key (keep 1.0, dense
  attention); example 1 keeps a band near the diagonal (whole (query block, key block) tiles empty, which
  the TPU kernel skips) with two rows that keep nothing (they return 0, gradients stay finite)."""
  b, n, h = 2, 48, 2
  rows = jnp.arange(n - 1)[:, None] + 1
  band = jnp.minimum(rows + jnp.arange(4)[None, :], n - 1)
  idx = jnp.stack([jnp.broadcast_to(jnp.arange(n), (n - 1, n)),
                   jnp.pad(band, ((0, 0), (0, n - 4)), mode="edge")])[:, None]           # [B, 1, R, N]
  valid = jnp.stack([jnp.ones((n - 1, n), bool), jnp.arange(n)[None, :].repeat(n - 1, 0) < 4])
  valid = valid.at[1, 20].set(False).at[1, 30].set(False)[:, None]
  mask = AttentionMask(indices=idx.astype(jnp.int32), valid=valid, num_dense_rows=1, num_keys=n)
  packed = bitmask.pack_rows(mask.sparse_rows(), 1)
  assert packed.shape == (b, 1, 2, n)
  q, k, v = _qkv((b, n, h, 8))
  out, *_ = _check_against_reference(q, k, v, mask, packed, backend, 1e-5, block_q=8, block_k=32)
  assert float(jnp.max(jnp.abs(out[1, jnp.array([21, 31])]))) == 0.0


@pytest.mark.parametrize("n,blocks,in_place", [(64, dict(block_q=16, block_k=32), True), (70, {}, True),
                                               (70, dict(block_q=16, block_k=32), False)],
                         ids=["whole_blocks", "one_block", "ragged_blocks"])
def test_tpu_gradient_in_the_qkv_layout_fp32(n, blocks, in_place):
  """Heads filling whole 128-lane tiles (2 x 64): dq goes straight into the q section of a qkv-shaped
  result and the dk/dv kernel fills the k and v sections by DMA, nothing concatenated; where the last of
  several key blocks is ragged (70 tokens in blocks of 32: a DMA takes whole sublane tiles) the three
  results are concatenated. Outputs and gradients within 1e-5 of the reference either way."""
  q, k, v = _qkv((2, n, 2, 64))
  mask, packed = _topk_mask(2, 2, n, 0.3)
  _check_against_reference(q, k, v, mask, packed, "tpu", 1e-5, **blocks)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(_run(q, k, v, packed, "tpu", **blocks))))(q))
  assert "sparse_attention_dkv" in jaxpr and ("concatenate" not in jaxpr) == in_place


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,blocks", [(65, 16, dict(block_q=16, block_k=32)), (65, 16, {}), (197, 8, {})])
def test_more_lengths_fp32(backend, n, d, blocks):
  """N = 65 (5 x 3 blocks, or the defaults) and N = 197 (DeiT-S) with the default blocks."""
  q, k, v = _qkv((2, n, 2, d))
  mask, packed = _topk_mask(2, 2, n, 0.3)
  _check_against_reference(q, k, v, mask, packed, backend, 1e-5, **blocks)


def test_tpu_compile():
  """Mosaic compiles the forward and the gradient for a v5e topology (no TPU needed, libtpu is)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = v5e_mesh()
  chips = mesh.devices.size
  b, n, h, d = 2 * chips, 197, 2, 64
  sharding = NamedSharding(mesh, P("data"))
  x = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16, sharding=sharding)
  m = jax.ShapeDtypeStruct((b, h, bitmask.words(n), n), jnp.int32, sharding=sharding)

  def fwd(q, k, v, packed):
    return flash_attention(q, k, v, packed, scale=d ** -0.5, backend="tpu")

  def grad(q, k, v, packed):
    return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, packed)), argnums=(0, 1, 2))(q, k, v)

  for fn, min_flops in ((fwd, 4), (grad, 4 + 6 + 8)):
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    compiled = jax.jit(mapped).lower(x, x, x, m).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    per_chip = (b // chips) * h * n * n * d
    assert cost["flops"] >= min_flops * per_chip


# The fused dense kernel (``packed=None``; ``executors.fused_dense_attention`` with token-pruning key
# masks) against XLA's softmax attention, float32 within 1e-5 (of the largest |value|), gradients too.

def _check_dense(backend, shape, key_valid=None, **blocks):
  from sparsifiner_jax.attention import backend as backend_lib   # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.attention import executors   # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(shape, seed=5)
  ref = _grads(lambda q, k, v: executors.softmax_attention(q, k, v, key_valid), q, k, v)
  if key_valid is None:
    fn = lambda q, k, v: _run(q, k, v, None, backend, **blocks)   # noqa: E731
  else:
    def fn(q, k, v):
      with backend_lib.compiling_for(backend, interpret=True):
        return executors.fused_dense_attention(q, k, v, key_valid)
  got = _grads(fn, q, k, v)
  for name, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
    tol = 1e-5 * max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=tol, rtol=0, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_kernel_ragged_blocks_fp32(backend):
  """N = 150: a partial last query and key block (TPU 128-row blocks; GPU 32)."""
  blocks = dict(block_q=128, block_k=128) if backend == "tpu" else dict(block_q=32, block_k=32)
  _check_dense(backend, (2, 150, 2, 16), **blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_kernel_default_blocks_fp32(backend):
  _check_dense(backend, (2, 65, 2, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_kernel_with_token_pruning_key_mask_fp32(backend):
  """Pruned keys (``key_valid``, per example) are dropped from every query's softmax."""
  key_valid = jax.random.uniform(jax.random.key(9), (2, 65)) < 0.6
  key_valid = key_valid.at[:, 0].set(True)
  _check_dense(backend, (2, 65, 2, 16), key_valid=key_valid)


@pytest.mark.parametrize("n,backward", [(150, "resident"), (256, "resident"), (150, "flash")])
def test_tpu_dense_runs_on_the_resident_block_kernels(n, backward, monkeypatch):
  """On TPU a dense layer without key masks takes the resident block kernels with every block of 128
  kept (ragged at 150, exact at 256): XLA's softmax attention, float32 within 1e-5, gradients too;
  where only their forward fits VMEM (``backward="flash"``, forced here), the flash kernel's gradient;
  with token-pruning key masks, the flash-style kernel."""
  from sparsifiner_jax.attention import backend as backend_lib   # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.attention import executors   # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.attention.pallas import block_sparse   # pylint: disable=g-import-not-at-top
  if backward == "flash":
    fits = block_sparse._resident
    monkeypatch.setattr(block_sparse, "_resident", lambda *a, backward=False: not backward and fits(*a))
  q, k, v = _qkv((2, n, 2, 16), seed=3)

  def fused(q, k, v, key_valid=None):
    with backend_lib.compiling_for("tpu", interpret=True):
      return executors.fused_dense_attention(q, k, v, key_valid)

  ref = _grads(lambda q, k, v: executors.softmax_attention(q, k, v, None), q, k, v)
  for name, r, g in zip(("out", "dq", "dk", "dv"), ref, _grads(fused, q, k, v)):
    tol = 1e-5 * max(1.0, float(jnp.max(jnp.abs(r))))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=tol, rtol=0, err_msg=name)
  grad = lambda key_valid: str(jax.make_jaxpr(jax.grad(   # noqa: E731
      lambda q: jnp.sum(fused(q, k, v, key_valid))))(q))
  text = grad(None)
  assert "block_sparse_attention_resident_fwd" in text
  assert ("block_sparse_attention_resident_bwd" in text) == (backward == "resident")
  assert ("sparse_attention_dkv" in text) == (backward == "flash")
  text = grad(jnp.ones((2, n), bool))
  assert "block_sparse_attention" not in text and "sparse_attention_fwd" in text


def test_fused_executor_is_refused_off_accelerators():
  from sparsifiner_jax.attention import executors   # pylint: disable=g-import-not-at-top
  q, k, v = _qkv((1, 9, 2, 8))
  with pytest.raises(ValueError, match="'fused' executor runs the Pallas kernels, on TPU and GPU only"):
    executors.fused_masked_attention(q, k, v, None)


@pytest.mark.parametrize("n,fused", [(65, False), (197, True)])
def test_auto_runs_dense_layers_fused_on_tpu_from_197_tokens(n, fused):
  """A layer without a mask under ``auto`` on TPU: the fused kernel from ``FUSED_DENSE_MIN_TOKENS``
  (where the clock measured it faster than XLA's attention), XLA's attention below."""
  from sparsifiner_jax.attention import backend as backend_lib   # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.attention import executors   # pylint: disable=g-import-not-at-top
  q, k, v = _qkv((1, n, 2, 8))
  with backend_lib.compiling_for("tpu", interpret=True):
    text = str(jax.make_jaxpr(lambda q, k, v: executors.unmasked_attention(q, k, v, None, "auto"))(q, k, v))
  assert ("pallas_call" in text) == fused
