"""The fused Pallas mask kernel (``attention/pallas/topk_mask.py``) against the XLA statement it replaces.

Reference: ``coefficient_logits`` -> softmax -> ``keep_topk_values`` -> ``mixed_einsum`` with the basis ->
``lax.top_k`` -> ``bitmask.pack_rows``. In float32 the packed masks must be identical (both backends, in
Pallas' interpreter). In bfloat16 the kernel's kept set must be a valid top-k of the XLA bfloat16
approximation up to 1e-5 of the row's largest magnitude (a different summation order may swap near-ties).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import topk_rows, v5e_mesh
from sparsifiner_jax import precision
from sparsifiner_jax.attention import bitmask
from sparsifiner_jax.attention.pallas import topk_mask as pallas_topk_mask
from sparsifiner_jax.models import predictor as predictor_lib

BACKENDS = ("tpu", "gpu")
BF16_TOLERANCE = 1e-5      # of each row's largest |approx|


def xla_approx(q, weights, basis, *, scale, coef_k, dtype):
  """The XLA statement: ``[B, H, N-1, N]`` float32 approximation of the patch rows."""
  logits = predictor_lib.coefficient_logits(q, weights, scale, dtype)
  coef = predictor_lib.keep_topk_values(jax.nn.softmax(logits, axis=-1), coef_k, by=logits)
  spec = "bhnm,mk->bhnk" if basis.ndim == 2 else "bhnm,bmk->bhnk"
  return precision.mixed_einsum(spec, coef, basis, dtype)


@functools.partial(jax.jit, static_argnames=("scale", "coef_k", "k", "dtype"))
def xla_mask(q, weights, basis, *, scale, coef_k, k, dtype=jnp.float32):
  """Reference packed mask ``[B, H, W, N]`` and the approximation it ranks."""
  approx = xla_approx(q, weights, basis, scale=scale, coef_k=coef_k, dtype=dtype)
  return bitmask.pack_rows(topk_rows(approx, k), 1), approx


def kernel_mask(q, weights, basis, *, backend, **kwargs):
  fn = functools.partial(pallas_topk_mask.lowrank_topk_packed, backend=backend, interpret=True, **kwargs)
  return jax.jit(fn)(q, weights, basis)


def inputs(seed, *, b=2, n=17, h=2, d=8, m=4, per_example=False, zero_columns=0, threshold=0.02):
  """Random q ``[B, N, H, d]``, weights ``[B, H, d+1, m]`` and a thresholded basis (``[B, m, N]`` when
  ``per_example``); ``zero_columns`` leading keys get an all-zero basis column (tied scores of 0)."""
  kq, kw, kb = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, n, h, d), jnp.float32)
  weights = jax.random.normal(kw, (b, h, d + 1, m), jnp.float32)
  basis = 0.04 * jax.random.normal(kb, ((b,) if per_example else ()) + (m, n), jnp.float32)
  basis = predictor_lib.threshold_basis(basis, threshold)
  basis = basis.at[..., :zero_columns].set(0.0)
  return q, weights, basis


CASES = [   # (name, inputs kwargs, coef_k, k)
    ("n17_d8", dict(n=17, d=8, m=4), 2, 5),
    ("n65_d16", dict(n=65, d=16, m=16), 8, 17),
    ("n197_d16", dict(n=197, d=16, m=49, b=1), 8, 50),
    ("per_example", dict(n=65, d=8, m=16, per_example=True), 8, 20),
    ("keep_all", dict(n=33, d=8, m=8), 3, 33),
    ("k1", dict(n=33, d=8, m=8), 3, 1),
    ("coef_all", dict(n=40, d=16, m=10), 10, 12),
    ("coef_over", dict(n=40, d=16, m=10), 64, 12),
    ("ties", dict(n=65, d=8, m=16, zero_columns=30, threshold=0.05), 2, 60),
    # TPU reads q as [B, N, H d] 128 lanes at a time when d divides 128 and H d is a multiple of it:
    ("lanes_d64", dict(n=65, d=64, h=2, m=16), 8, 17),
    ("lanes_d32", dict(n=40, d=32, h=4, m=8), 3, 11),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,shape,coef_k,k", CASES, ids=[c[0] for c in CASES])
def test_matches_xla_fp32(backend, name, shape, coef_k, k):
  del name
  q, weights, basis = inputs(0, **shape)
  scale = shape.get("h", 2) ** -0.5
  want, _ = xla_mask(q, weights, basis, scale=scale, coef_k=coef_k, k=k)
  got = kernel_mask(q, weights, basis, backend=backend, scale=scale, coef_k=coef_k, k=k)
  assert got.shape == want.shape and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gpu_interpreted_kernel_runs_the_compiled_loop_form():
  """The GPU tests above run the bisections in the form the GPU compile uses (rolled loops), so their
  exactness, ties included, is the compiled kernel's."""
  unroll = pallas_topk_mask._unroll
  assert unroll("gpu", interpret=True) == unroll("gpu", interpret=False) is False


@pytest.mark.parametrize("axis", [1, 0], ids=["rows", "columns"])
@pytest.mark.parametrize("unroll", [False, True], ids=["rolled", "unrolled"])
def test_topk_selection_both_loop_forms(unroll, axis):
  """The selection alone, in both loop forms and both layouts (rows along lanes as on GPU, or as columns
  as on TPU), equals ``lax.top_k`` (ties to the lowest index) on rows full of ties: few distinct values,
  signed zeros, and invalid (padding) entries past 50."""
  rng = np.random.default_rng(0)
  x = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 2.0], np.float32), size=(64, 128))
  valid = jnp.arange(128)[None] < 50
  for k in (1, 7, 25, 50):
    if axis == 1:
      got = jax.jit(lambda x: pallas_topk_mask._topk_keep(x, k, valid, unroll))(jnp.asarray(x))
    else:
      got = jax.jit(lambda x: pallas_topk_mask._topk_keep(x.T, k, valid.T, unroll, axis=0).T)(jnp.asarray(x))
    want = topk_rows(jnp.where(valid, jnp.asarray(x) + 0.0, -jnp.inf), k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pack_columns_is_the_bitmask_layout():
  keep = jax.random.bernoulli(jax.random.key(2), 0.3, (3, 96))                 # [rows, keys]
  got = pallas_topk_mask._pack_columns(keep.T, bitmask.words(96))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(bitmask.pack(keep)))


def test_ties_are_exercised():
  """The tie case keeps some but not all zero scores (the index tie-break decides)."""
  q, weights, basis = inputs(0, n=65, d=8, m=16, zero_columns=30, threshold=0.05)
  _, approx = xla_mask(q, weights, basis, scale=0.5, coef_k=2, k=60)
  positive = np.sum(np.asarray(approx) > 0, axis=-1)
  assert np.all(positive < 60)   # every row keeps some, not all, of its 35+ tied zeros (by index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_blocks(backend):
  """Several query-row blocks (the last one partly past N; TPU row blocks are whole lane tiles)."""
  n, block_q = (150, 128) if backend == "tpu" else (65, 32)
  q, weights, basis = inputs(1, n=n, d=8, m=16)
  want, _ = xla_mask(q, weights, basis, scale=0.5, coef_k=4, k=9)
  got = kernel_mask(q, weights, basis, backend=backend, scale=0.5, coef_k=4, k=9, block_q=block_q)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_rows_and_padding_bits(backend):
  """The leading dense rows keep exactly the N real keys; no bit past N is ever set."""
  n = 70
  q, weights, basis = inputs(2, n=n, d=8, m=8)
  got = np.asarray(kernel_mask(q, weights, basis, backend=backend, scale=0.5, coef_k=3, k=7,
                               num_dense_rows=2))
  keep = np.asarray(bitmask.unpack(jnp.asarray(got), 3 * bitmask.BITS))
  assert keep[:, :, :2, :n].all() and not keep[..., n:].any()
  np.testing.assert_array_equal(keep[:, :, 2:].sum(-1), 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_example", [False, True])
def test_bf16_valid_topk(backend, per_example):
  """bfloat16 products: the kept set is a top-k of the XLA bfloat16 approximation within the tolerance."""
  n, k = 65, 17
  q, weights, basis = inputs(3, n=n, d=16, m=16, per_example=per_example)
  _, approx = xla_mask(q, weights, basis, scale=0.5, coef_k=8, k=k, dtype=jnp.bfloat16)
  got = kernel_mask(q, weights, basis, backend=backend, scale=0.5, coef_k=8, k=k,
                    compute_dtype=jnp.bfloat16)
  keep = np.asarray(bitmask.unpack(got, n))
  assert keep[:, :, 0].all()
  keep, approx = keep[:, :, 1:], np.asarray(approx)
  np.testing.assert_array_equal(keep.sum(-1), k)
  tol = BF16_TOLERANCE * np.abs(approx).max(-1)
  lowest_kept = np.where(keep, approx, np.inf).min(-1)
  highest_dropped = np.where(keep, -np.inf, approx).max(-1)
  assert np.all(lowest_kept >= highest_dropped - tol)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_predictor(backend):
  """A real ``MaskPredictor``'s pieces: the kernel's mask equals the XLA statement's."""
  from flax import nnx   # pylint: disable=g-import-not-at-top
  pred = predictor_lib.MaskPredictor(2, 16, 65, 0.25, reduce_n=4, rngs=nnx.Rngs(0))
  kq, kk = jax.random.split(jax.random.key(4))
  q = jax.random.normal(kq, (2, 65, 2, 16))
  keys = jax.random.normal(kk, (2, 65, 2, 16))
  weights = predictor_lib.query_weights(*pred.factors(keys), jnp.float32)
  basis = pred.basis(recon=False)
  args = dict(scale=pred.logit_scale, coef_k=pred.coef_topk, k=pred.budget)
  want, _ = xla_mask(q, weights, basis, **args)
  got = kernel_mask(q, weights, basis, backend=backend, **args)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_arguments():
  q, weights, basis = inputs(0)
  with pytest.raises(ValueError, match="budget"):
    pallas_topk_mask.lowrank_topk_packed(q, weights, basis, scale=1.0, coef_k=2, k=18, interpret=True)
  with pytest.raises(ValueError, match="basis"):
    pallas_topk_mask.lowrank_topk_packed(q, weights, basis[:, :5], scale=1.0, coef_k=2, k=3, interpret=True)
  with pytest.raises(ValueError, match="backend"):
    pallas_topk_mask.lowrank_topk_packed(q, weights, basis, scale=1.0, coef_k=2, k=3, backend="cuda")


def compile_tpu(mesh, *, b, n, h, d, m, coef_k, k, dtype=jnp.bfloat16, per_example=False):
  """Compiles the TPU kernel sharded over the batch; ``b`` is per chip. Returns the compiled object."""
  from jax.sharding import NamedSharding, PartitionSpec as P   # pylint: disable=g-import-not-at-top
  chips = mesh.devices.size
  fn = functools.partial(pallas_topk_mask.lowrank_topk_packed, scale=h ** -0.5, coef_k=coef_k, k=k,
                         compute_dtype=dtype, backend="tpu")
  basis_spec = P("data") if per_example else P()
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data"), basis_spec),
                                  out_specs=P("data")))
  spec = lambda shape, dt, p: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, p))  # noqa
  basis_shape = ((b * chips,) if per_example else ()) + (m, n)
  return sharded.lower(spec((b * chips, n, h, d), dtype, P("data")),
                       spec((b * chips, h, d + 1, m), jnp.float32, P("data")),
                       spec(basis_shape, jnp.float32, basis_spec)).compile()


def test_tpu_compile():
  """Mosaic compiles the kernel for a real TPU (v5e topology, compile only)."""
  mesh = v5e_mesh()
  compiled = compile_tpu(mesh, b=2, n=65, h=2, d=16, m=16, coef_k=4, k=17)
  assert compiled.cost_analysis() is not None
