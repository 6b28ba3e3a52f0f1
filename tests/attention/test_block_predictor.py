"""``pallas.block_predictor``: block mode's predictor projections on TPU (interpreted), against the XLA
products they replace (``reference``), float32 within 1e-5 (values of order 1), with bfloat16 products
(``dtype``) too: both sides round the same operands to ``dtype`` and accumulate in float32. The kept-block
table it computes in the same pass equals the XLA selection's exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsifiner_jax.attention import backend, blocks
from sparsifiner_jax.attention.pallas import block_predictor
from sparsifiner_jax.models import predictor
from sparsifiner_jax.precision import mixed_einsum
from conftest import windowed_and_whole


def _operands(n=37, heads=4, d=64, m=9, c=24, seed=0, batch=2):
  """``qkv [batch, n, 3, heads, d]`` and the predictor's ``(proj_n [1, n, m], w_k, b_k, w_q, b_q)``."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)   # noqa: E731
  return normal(batch, n, 3, heads, d), (normal(1, n, m, scale=0.1), normal(d, c, scale=0.1), normal(c),
                                     normal(d, c, scale=0.1), normal(c))


def _reference(qkv, params, dtype):
  return block_predictor.reference(qkv[:, :, 0], qkv[:, :, 1], *params, block=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_the_xla_projections(dtype):
  """N = 37 in blocks of 16 (a ragged last block: its mean is over its 5 tokens), four heads of 64."""
  qkv, params = _operands()
  run = lambda qkv, *params: block_predictor.projections(qkv, *params, block=16, dtype=dtype)   # noqa: E731
  with backend.compiling_for("tpu", interpret=True):
    assert block_predictor.applies(qkv, params[0])
    got = run(qkv, *params)
    text = str(jax.make_jaxpr(run)(qkv, *params))
  want = _reference(qkv, params, dtype)
  assert "block_predictor_projections" in text
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-5, rtol=0)
  assert got[0].shape == (2, 3, 4, 24) and got[1].shape == (2, 9, 4, 24)


def test_reference_matches_numpy():
  """The XLA projections themselves: ``K̂ᵀ = (k W_k + b_k)ᵀ P`` and the pooled ``q W_q + b_q`` in float64."""
  qkv, params = _operands(seed=3)
  q, k = np.asarray(qkv[:, :, 0], np.float64), np.asarray(qkv[:, :, 1], np.float64)
  proj_n, w_k, b_k, w_q, b_q = (np.asarray(p, np.float64) for p in params)
  q_pool = np.stack([q[:, i:i + 16].mean(1) for i in range(0, 37, 16)], 1)
  want_q = q_pool @ w_q + b_q
  want_k = np.einsum("bnhc,nm->bmhc", k @ w_k + b_k, proj_n[0])
  got_q, got_k = _reference(qkv, params, jnp.float32)
  np.testing.assert_allclose(np.asarray(got_q), want_q, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got_k), want_k, atol=1e-5, rtol=0)


def test_gradient_is_the_xla_gradient():
  qkv, params = _operands(seed=1)
  rng = np.random.default_rng(2)
  weights = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 3, 4, 24), (2, 9, 4, 24))]

  def loss(fn):
    return lambda *args: sum(jnp.sum(x * w) for x, w in zip(fn(*args), weights))

  args = (qkv, *params)
  with backend.compiling_for("tpu", interpret=True):
    got = jax.grad(loss(lambda qkv, *p: block_predictor.projections(qkv, *p, block=16, dtype=jnp.float32)),
                   argnums=tuple(range(6)))(*args)
  want = jax.grad(loss(lambda qkv, *p: _reference(qkv, p, jnp.float32)), argnums=tuple(range(6)))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("platform,heads,d,batched_p,runs", [
    ("cpu", 4, 64, False, False), ("tpu", 3, 8, False, False), ("tpu", 3, 64, False, False),
    ("tpu", 6, 64, False, True), ("tpu", 4, 96, False, True), ("tpu", 6, 64, True, False)])
def test_applies_on_tpu_to_heads_filling_whole_lane_tiles(platform, heads, d, batched_p, runs):
  """``H d`` a multiple of 128 lanes, and one ``P`` for the batch (token sparsity gathers one per example)."""
  qkv = jnp.zeros((2, 5, 3, heads, d))
  with backend.compiling_for(platform, interpret=platform != "cpu"):
    assert block_predictor.applies(qkv, jnp.zeros((2 if batched_p else 1, 5, 4))) == runs


def _xla_table(qkv, params, basis, block, keep, coef_k, scale, dtype):
  """``MaskPredictor.block_mask``'s XLA selection: logits, softmax, the top ``coef_k`` coefficients (ranked
  by the logits), block scores against the pooled basis, ``blocks.select``."""
  q_r, k_hat = block_predictor.reference(qkv[:, :, 0], qkv[:, :, 1], *params, block=block, dtype=dtype)
  logits = mixed_einsum("bnhc,bmhc->bhnm", q_r, k_hat, dtype) * scale
  coef = predictor.keep_topk_values(jax.nn.softmax(logits, axis=-1), coef_k, by=logits)
  return blocks.select(mixed_einsum("bhnm,mk->bhnk", coef, basis, dtype), keep)


def _kernel_table(qkv, params, basis, block, dtype, selection):
  consts = block_predictor.constants(*params, heads=qkv.shape[3], dtype=dtype, pooled=basis)
  return block_predictor.table(qkv, consts, block=block, selection=selection)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,block,keep,coef_k,batch", [
    (37, 16, 2, 4, 2),     # ragged last block (5 tokens); 2 examples a grid step
    (37, 16, 3, 4, 4),     # keep every block (keep rate 1.0); 4 examples a grid step
    (37, 8, 2, 9, 3),      # coef_k >= m: every coefficient; an odd batch, one example a step
    (70, 8, 3, 4, 2),      # 9 blocks: two sublane tiles of block rows
])
def test_table_is_the_xla_selection(dtype, n, block, keep, coef_k, batch):
  """The kernel's table equals ``blocks.select`` of the XLA scores, entry for entry, with one or several
  examples to a grid step (4 heads of 8 or 16 block rows: 32 or 64 columns each)."""
  qkv, params = _operands(n=n, batch=batch)
  rng = np.random.default_rng(5)
  basis = blocks.pool(jnp.asarray(np.abs(rng.normal(size=(9, n))), jnp.float32), block, axis=-1, mean=False)
  selection = block_predictor.Selection(keep, coef_k, 0.5)
  with backend.compiling_for("tpu", interpret=True):
    got = _kernel_table(qkv, params, basis, block, dtype, selection)
  want = _xla_table(qkv, params, basis, block, keep, coef_k, 0.5, dtype)
  assert got.shape == want.shape == (batch, 4, blocks.count(n, block), keep) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.diff(np.asarray(got), axis=-1) > 0).all() and (np.asarray(got)[..., 0] == 0).all()


def test_kernels_read_qkv_whole_from_vmem(monkeypatch):
  """Traced for a chip whose VMEM holds qkv (a v5e) the kernels read q and k from all of qkv in place
  (``common.whole_in_vmem``), each grid step at its examples (8 examples, 4 to a table step): the table
  and the projections equal the windowed kernels' exactly."""
  qkv, params = _operands(n=37, batch=8)
  rng = np.random.default_rng(6)
  basis = blocks.pool(jnp.asarray(np.abs(rng.normal(size=(9, 37))), jnp.float32), 16, axis=-1, mean=False)

  def run():
    table = _kernel_table(qkv, params, basis, 16, jnp.float32, block_predictor.Selection(2, 4, 0.5))
    return [table, *block_predictor.projections(qkv, *params, block=16, dtype=jnp.float32)]

  (windowed, whole), decided = windowed_and_whole(monkeypatch, block_predictor, run)
  assert decided == [False, False, True, True]
  for got, want in zip(whole, windowed):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("batch,columns,want", [
    (4, 32, (4, 32)), (2, 32, (2, 32)), (3, 32, (1, 32)), (16, 48, (2, 64)), (16, 96, (1, 96)),
    (4, 192, (1, 192))])
def test_examples_share_a_lane_tile(batch, columns, want):
  """``(examples per grid step, columns each)``: as many as fill 128 lanes and divide the batch."""
  assert block_predictor._examples_per_step(batch, columns) == want


def test_table_breaks_ties_by_the_lowest_index():
  """Tie-heavy scores: a basis with equal block sums (every score tied), one with a single nonzero block,
  one with block 0 (the CLS key's) at zero: the kept blocks are block 0 (always) and the lowest-numbered
  ties, as ``blocks.select`` takes them."""
  qkv, params = _operands(n=64)
  selection = block_predictor.Selection(3, 4, 0.5)
  ones = jnp.ones((9, 8))
  for basis, want in ((ones, [0, 1, 2]), (jnp.zeros((9, 8)).at[:, 5].set(1.0), [0, 1, 5]),
                      (ones.at[:, 0].set(0.0), [0, 1, 2])):
    with backend.compiling_for("tpu", interpret=True):
      got = np.asarray(_kernel_table(qkv, params, basis, 8, jnp.float32, selection))
    np.testing.assert_array_equal(got, np.asarray(_xla_table(qkv, params, basis, 8, 3, 4, 0.5, jnp.float32)))
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


@pytest.mark.parametrize("n,block,runs", [(197, 32, True), (785, 128, True), (3137, 128, False)])
def test_table_runs_where_it_beats_xla(n, block, runs):
  """DeiT-S (6 heads of 64, m = N // 6): the table kernel at 224 and 448 px; at 896 px (m = 522, 25
  blocks) XLA's selection, which the clock found cheaper there."""
  qkv = jax.ShapeDtypeStruct((4, n, 3, 6, 64), jnp.bfloat16)
  proj_n = jax.ShapeDtypeStruct((1, n, n // 6), jnp.float32)
  with backend.compiling_for("tpu", interpret=True):
    assert block_predictor.table_applies(qkv, proj_n, block) == runs


@pytest.mark.parametrize("rows,k", [(7, 2), (9, 3), (32, 8), (40, 8), (16, 1)])
@pytest.mark.parametrize("method", ["_top_down_columns", "_ranked_top"])
def test_column_top_k_takes_the_lowest_index_among_ties(method, rows, k):
  """Both of the table kernel's top-k forms (picks and ranks, ``_top_of_columns`` chooses by the column
  height) keep each column's ``k`` largest entries, ties to the lowest index, ``-0.0`` equal to ``+0.0``,
  ``-inf`` and ``+inf`` entries ordered: as a stable NumPy sort of the negated values."""
  rng = np.random.default_rng(rows * 10 + k)
  x = rng.integers(-2, 3, size=(rows, 128)).astype(np.float32)          # heavy ties
  x[rng.random(x.shape) < 0.1] = -0.0
  x[rng.random(x.shape) < 0.05] = -np.inf
  x[0, :64] = np.inf
  x[:, 100:] = rng.normal(size=(rows, 28))                              # no ties
  order = np.argsort(-x, axis=0, kind="stable")
  want = np.zeros(x.shape, bool)
  np.put_along_axis(want, order[:k], True, axis=0)
  got = getattr(block_predictor, method)(jnp.asarray(x), k)
  np.testing.assert_array_equal(np.asarray(got), want)
