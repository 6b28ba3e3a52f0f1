"""Block mode: the kept-block tables, the selection, the block kernels (interpreted) and what they load.

References are NumPy (tables, selection, block mass) and the masked executor with the block mask
expanded (kernels). Tolerances: float32 outputs and gradients within 1e-5 absolute (values of order 1);
bfloat16 outputs within 2e-2 (8 mantissa bits, sums in a different order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsifiner_jax import models
from sparsifiner_jax.attention import backend, blocks, executors
from sparsifiner_jax.attention.pallas import block_sparse, common
from conftest import windowed_and_whole

BACKENDS = ("tpu", "gpu")


def _numpy_select(scores: np.ndarray, k: int) -> np.ndarray:
  """Per row: key block 0, then the highest scores (ties: lowest index), increasing."""
  out = np.zeros(scores.shape[:-1] + (k,), np.int32)
  for idx in np.ndindex(scores.shape[:-1]):
    row = scores[idx].astype(np.float64).copy()
    row[0] = np.inf
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    out[idx] = sorted(order[:k])
  return out


def _random_table(rng, shape, nb, k):
  return blocks.select(jnp.asarray(rng.normal(size=shape + (nb, nb)), jnp.float32), k)


def test_select_matches_numpy_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 3, size=(2, 3, 5, 7)).astype(np.float32)     # many ties
  for k in (1, 3, 7):
    np.testing.assert_array_equal(np.asarray(blocks.select(jnp.asarray(scores), k)), _numpy_select(scores, k))


def test_select_refuses_a_budget_outside_the_blocks():
  with pytest.raises(ValueError, match=r"block budget k=5 must be in \[1, 4\]"):
    blocks.select(jnp.zeros((1, 1, 4, 4)), 5)


def test_transpose_matches_numpy_with_unkept_key_blocks():
  nb = 6
  table = np.array([[[[0, 2], [0, 2], [0, 5], [0, 2], [0, 1], [0, 2]]]], np.int32)   # 3 and 4: kept by none
  rows, counts = blocks.transpose(jnp.asarray(table), nb)
  rows, counts = np.asarray(rows), np.asarray(counts)
  for kb in range(nb):
    keeping = [i for i in range(nb) if kb in table[0, 0, i]]
    assert counts[0, 0, kb] == len(keeping)
    assert list(rows[0, 0, kb, :len(keeping)]) == keeping
    # Past the count the last real entry repeats (0 when none): stepping through it loads nothing new.
    assert set(rows[0, 0, kb, len(keeping):]) <= {keeping[-1] if keeping else 0}
  assert counts[0, 0, 3] == counts[0, 0, 4] == 0


def test_pool_and_attention_mass_match_numpy():
  rng = np.random.default_rng(1)
  n, b = 37, 16
  logits = rng.normal(size=(2, 3, n, n))
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  starts = range(0, n, b)
  want = np.array([[[[attn[x, h, i:i + b, j:j + b].sum(-1).mean() for j in starts] for i in starts]
                    for h in range(3)] for x in range(2)])
  got = np.asarray(blocks.attention_mass(jnp.asarray(attn, jnp.float32), b))
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_expand_keeps_whole_blocks_and_the_ragged_tail():
  table = jnp.asarray([[[[0, 2]]]], jnp.int32)                           # one query block
  keep = np.asarray(blocks.expand(table, 10, 4))                           # blocks [0-3] [4-7] [8-9]
  assert keep.shape == (1, 1, 10, 10)
  np.testing.assert_array_equal(keep[0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 1, 1])


def _reference(q, k, v, table, block, dense_rows=0):
  mask = blocks.block_mask(table, q.shape[1], block, num_dense_rows=dense_rows)
  return executors.masked_attention(q, k, v, mask)


# TPU has two kernel sets: the resident one (a head group's whole sequence in VMEM, kept blocks gathered
# there) where it fits, else the per-block grid; ``_RESIDENT_BYTES = 0`` forces the grid.
KERNEL_SETS = [("tpu", "resident"), ("tpu", "per_block"), ("gpu", None)]
FORWARD_KERNEL = {"resident": "block_sparse_attention_resident_fwd",
                  "per_block": "block_sparse_attention_fwd"}
BACKWARD_KERNEL = {"resident": "block_sparse_attention_resident_bwd",
                   "per_block": "block_sparse_attention_bwd"}


def _use_forward(forward, monkeypatch):
  if forward == "per_block":
    monkeypatch.setattr(block_sparse, "_RESIDENT_BYTES", 0)


def _assert_kernels(fn, args, kernels):
  """``fn``'s forward and gradient ran the ``kernels`` set ("resident" or "per_block") and not the other."""
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2)))(*args))
  for names in (FORWARD_KERNEL, BACKWARD_KERNEL):
    for name, kernel in names.items():
      assert (kernel in jaxpr) == (name == kernels), f"{kernel} with the {kernels} kernels: {kernel in jaxpr}"


@pytest.mark.parametrize("backend,forward", KERNEL_SETS, ids=["tpu_resident", "tpu_per_block", "gpu"])
@pytest.mark.parametrize("n,block,kept,dense_rows", [
    (37, 16, 2, 0), (32, 16, 1, 0), (70, 32, 3, 0), (37, 16, 3, 0), (200, 128, 1, 0),
    (37, 16, 1, 1), (32, 16, 1, 1), (200, 128, 1, 1)],
    ids=["ragged", "exact", "ragged32", "keep_all", "gpu_tiles", "cls_ragged", "cls_exact", "cls_gpu_tiles"])
def test_kernels_match_masked_attention(backend, forward, n, block, kept, dense_rows, monkeypatch):
  """``cls_*``: the first row attends to every key (the TPU kernels compute it, GPU in XLA)."""
  _use_forward(forward, monkeypatch)
  _check_against_masked(backend, forward, n, block, kept, dense_rows, monkeypatch)


@pytest.mark.parametrize("n,block,kept,dense_rows", [(37, 16, 3, 0), (70, 32, 3, 1)], ids=["ragged", "cls"])
def test_tpu_resident_kernels_in_chunks_of_kept_blocks(n, block, kept, dense_rows, monkeypatch):
  """A query block's kept blocks in chunks of one block (``_RESIDENT_KEYS = block``): the forward's
  softmax online over the chunks, the backward chunk by chunk."""
  monkeypatch.setattr(block_sparse, "_RESIDENT_KEYS", block)
  cfg = block_sparse._Config(scale=1.0, interpret=True, block=block, nb=blocks.count(n, block), kept=kept,
                             n=n, heads=3, head_dim=8)
  assert [list(c) for c in block_sparse._chunks(cfg)] == [[j] for j in range(kept)]
  _check_against_masked("tpu", "resident", n, block, kept, dense_rows, monkeypatch)


def _check_against_masked(backend, forward, n, block, kept, dense_rows, monkeypatch):
  """The block kernels on a random table: outputs and gradients within 1e-5 of the masked reference."""
  rng = np.random.default_rng(n + kept)
  b, h, d = 2, 3, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
  table = _random_table(rng, (b, h), blocks.count(n, block), kept)
  weights = jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32)

  def fused(q, k, v):
    return block_sparse.block_sparse_attention(q, k, v, table, block=block, scale=d ** -0.5,
                                               dense_rows=dense_rows, backend=backend, interpret=True)

  def reference(q, k, v):
    return _reference(q, k, v, table, block, dense_rows)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  np.testing.assert_allclose(np.asarray(fused(q, k, v)), np.asarray(reference(q, k, v)), atol=1e-5, rtol=0)
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
  if backend == "tpu":
    _assert_kernels(fused, (q, k, v), forward)
  if backend == "tpu" and dense_rows:        # the dense row is computed in the kernels, not in XLA
    monkeypatch.setattr(block_sparse, "mixed_einsum", None)
    jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)


DEIT_N, DEIT_BLOCK, DEIT_HEADS, DEIT_D = 197, 32, 4, 64


def _deit_layout(seed: int):
  """DeiT's layout: ``DEIT_HEADS`` heads of 64 in lane pairs at 197 tokens, blocks of 32 (ragged), 2 kept,
  the CLS row dense. Returns float32 ``(q, k, v, table, weights)`` and ``fused``, the TPU kernels
  (interpreted) on that table."""
  rng = np.random.default_rng(seed)
  shape = (2, DEIT_N, DEIT_HEADS, DEIT_D)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  table = _random_table(rng, (2, DEIT_HEADS), blocks.count(DEIT_N, DEIT_BLOCK), 2)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  fused = lambda q, k, v: block_sparse.block_sparse_attention(   # noqa: E731
      q, k, v, table, block=DEIT_BLOCK, scale=DEIT_D ** -0.5, dense_rows=1, interpret=True)
  return (q, k, v, table, weights), fused


@pytest.mark.parametrize("forward", ["resident", "per_block"])
def test_tpu_kernels_in_the_qkv_layout(forward, monkeypatch):
  """DeiT's layout: heads of 64 in pairs whose lanes form one 128-lane tile, read where the qkv projection
  wrote them (``cfg.lanes``), at 197 tokens in blocks of 32 (ragged) with the dense CLS row; float32
  outputs and gradients within 1e-5 of the masked reference."""
  _use_forward(forward, monkeypatch)
  (q, k, v, table, weights), fused = _deit_layout(seed=11)
  reference = lambda q, k, v: _reference(q, k, v, table, DEIT_BLOCK, 1)   # noqa: E731
  _assert_kernels(fused, (q, k, v), forward)
  np.testing.assert_allclose(np.asarray(fused(q, k, v)), np.asarray(reference(q, k, v)), atol=1e-5, rtol=0)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)   # noqa: E731
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("forward", ["resident", "per_block"])
def test_first_zero_takes_block_zero_without_reading_the_table(forward, monkeypatch):
  """``first_zero`` (block mode's tables start with key block 0): the resident kernels take slot 0 as block
  0 statically. On DeiT's layout its outputs and gradients equal the kernels' that read the table (exactly:
  the same products), and with slot 0 of the table overwritten by another block they stay the same for
  the resident kernels (the table's slot 0 is never read), while the per-block grid, which reads it,
  changes."""
  _use_forward(forward, monkeypatch)
  (q, k, v, table, weights), _ = _deit_layout(seed=13)
  assert np.all(np.asarray(table[..., 0]) == 0)
  corrupt = table.at[..., 0].set(table.shape[2] - 1 - table[..., 1] % 2)   # a block != table[..., 1]

  def run(tab, first_zero):
    fn = lambda q, k, v: block_sparse.block_sparse_attention(   # noqa: E731
        q, k, v, tab, block=DEIT_BLOCK, scale=DEIT_D ** -0.5, dense_rows=1, first_zero=first_zero,
        interpret=True)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    return [np.asarray(x) for x in (fn(q, k, v), *grads)]

  want = run(table, False)
  for got, w in zip(run(table, True), want):
    np.testing.assert_array_equal(got, w)
  changed = [not np.array_equal(g, w) for g, w in zip(run(corrupt, True), want)]
  assert changed == [forward == "per_block"] * 4


def test_tpu_resident_kernels_read_qkv_whole_from_vmem(monkeypatch):
  """Traced for a chip whose VMEM holds qkv (a v5e), the resident forward reads q, k, v from all of qkv in
  place and writes its output in place (``common.whole_in_vmem``); DeiT's layout, float32: outputs and
  gradients equal the windowed kernels' exactly."""
  (q, k, v, table, weights), fused = _deit_layout(seed=14)

  def run():
    grads = jax.grad(lambda *a: jnp.sum(fused(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    return [fused(q, k, v), *grads]

  (windowed, whole), decided = windowed_and_whole(monkeypatch, block_sparse, run)
  assert decided == [False, False, True, True]      # per kind: the gradient's forward, then the output
  for got, want in zip(whole, windowed):
    np.testing.assert_array_equal(got, want)


def test_whole_in_vmem_by_the_chips_vmem():
  """Operands up to a quarter of the chip's VMEM: 64 images of DeiT-S's qkv (28 MiB) on a v5e (128 MiB),
  not twice that, not on a v4 (16 MiB), not where the chip is unknown or not a TPU."""
  qkv = jax.ShapeDtypeStruct((64, 1, 197, 1152), jnp.bfloat16)
  twice = jax.ShapeDtypeStruct((128, 1, 197, 1152), jnp.bfloat16)
  cases = [("tpu", "TPU v5 lite", qkv, True), ("tpu", "TPU v5 lite", twice, False),
           ("tpu", "TPU v4", qkv, False), ("tpu", None, qkv, False),
           ("gpu", "NVIDIA H100 80GB HBM3", qkv, False)]
  for platform, kind, x, want in cases:
    with backend.compiling_for(platform, device_kind=kind):
      assert common.whole_in_vmem(x) == want, (platform, kind, x.shape)


def _cls_gradients_match(seed: int) -> str:
  """TPU kernels (interpreted) with the dense CLS row at 37 tokens in blocks of 16, 3 heads of 8: asserts
  their float32 gradients equal the masked reference's within 1e-5; returns the gradient's jaxpr."""
  rng = np.random.default_rng(seed)
  n, block, d = 37, 16, 8
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, d)), jnp.float32) for _ in range(3))
  table = _random_table(rng, (2, 3), blocks.count(n, block), 2)
  weights = jnp.asarray(rng.normal(size=(2, n, 3, d)), jnp.float32)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * weights)   # noqa: E731
  fused = lambda q, k, v: block_sparse.block_sparse_attention(   # noqa: E731
      q, k, v, table, block=block, scale=d ** -0.5, dense_rows=1, interpret=True)
  got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: _reference(q, k, v, table, block, 1)), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
  return str(jax.make_jaxpr(jax.grad(loss(fused)))(q, k, v))


def test_tpu_backward_over_the_transposed_table(monkeypatch):
  """Where dk and dv of a whole sequence do not fit the one-pass backward's VMEM budget, dq runs over the
  table and dk, dv over the transposed one, the dense first row in XLA: the same gradients."""
  monkeypatch.setattr(block_sparse, "_FUSED_BACKWARD_BYTES", 0)
  monkeypatch.setattr(block_sparse, "_RESIDENT_BYTES", 0)
  jaxpr = _cls_gradients_match(seed=6)
  assert "block_sparse_attention_dkv" in jaxpr and "block_sparse_attention_bwd" not in jaxpr


def test_tpu_resident_forward_with_the_per_block_backward(monkeypatch):
  """A sequence whose forward fits the resident budget but whose backward does not: the per-block
  backward reads the resident forward's rows (lse, the CLS row's apart) as its own."""
  fits = block_sparse._resident
  monkeypatch.setattr(block_sparse, "_resident", lambda cfg, itemsize, backward=False: not backward
                      and fits(cfg, itemsize))
  jaxpr = _cls_gradients_match(seed=7)
  assert "block_sparse_attention_resident_fwd" in jaxpr and "block_sparse_attention_bwd" in jaxpr
  assert "block_sparse_attention_resident_bwd" not in jaxpr


@pytest.mark.parametrize("forward", ["resident", "per_block"])
def test_bf16_kernel_matches_masked_attention(forward, monkeypatch):
  _use_forward(forward, monkeypatch)
  rng = np.random.default_rng(5)
  n, block = 37, 16
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 16)), jnp.bfloat16) for _ in range(3))
  table = _random_table(rng, (2, 2), blocks.count(n, block), 2)
  got = block_sparse.block_sparse_attention(q, k, v, table, block=block, scale=0.25, interpret=True)
  want = _reference(q, k, v, table, block)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=0)


def test_tpu_resident_forward_sums_on_the_mxu(monkeypatch):
  """bfloat16 heads of 64 in lane pairs (DeiT's layout) at 197 tokens, blocks of 32, the CLS row dense: the
  resident forward takes its softmax sums as products (``_group_softmax``). Outputs within 2e-2 of the
  float32 masked reference; outputs and gradients (whose backward reads the forward's lse rows) within
  2e-2 of the same kernels with the sums as cross-lane reductions (the rounded probabilities they add
  differ by bfloat16 rounding)."""
  (q, k, v, table, weights), fused = _deit_layout(seed=12)
  cfg = block_sparse._tpu_layout(block_sparse._Config(
      scale=1.0, interpret=True, block=DEIT_BLOCK, nb=table.shape[2], kept=2, n=DEIT_N, heads=DEIT_HEADS,
      head_dim=DEIT_D))
  assert block_sparse._sums_on_mxu(cfg, jnp.bfloat16) and not block_sparse._sums_on_mxu(cfg, jnp.float32)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = fused(*low)
  want = _reference(q, k, v, table, DEIT_BLOCK, 1)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-2)
  grads = jax.grad(lambda *a: jnp.sum(fused(*a) * weights), argnums=(0, 1, 2))(*low)
  monkeypatch.setattr(block_sparse, "_sums_on_mxu", lambda cfg, dtype: False)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fused(*low)), atol=2e-2)
  for g, w in zip(grads, jax.grad(lambda *a: jnp.sum(fused(*a) * weights), argnums=(0, 1, 2))(*low)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=2e-2)


def _visited(spec, grid, *tables):
  """The block index ``spec``'s index map gives at every grid point, in grid order."""
  return {point: spec.index_map(*point, *tables) for point in np.ndindex(*grid)}


def test_index_maps_load_only_kept_blocks():
  """Forward and dq: k and v are read at the table's blocks and nowhere else. dk/dv: q is read at the
  transposed table's blocks; a key block no query block keeps (an empty row of the transposed table)
  reads one block, the same at every step, and computes nothing."""
  nb, kept, block = 5, 2, 16
  table = np.array([[[[0, 1], [0, 3], [0, 1], [0, 3], [0, 1]]]], np.int32)      # 2 and 4 kept by none
  cfg = block_sparse._Config(scale=1.0, interpret=True, block=block, nb=nb, kept=kept, n=nb * block,
                             heads=1, head_dim=8)
  flat = jnp.asarray(table.reshape(-1))
  entry = block_sparse._entry
  specs = block_sparse._Specs(cfg, lambda b, h, i, j, tab: entry(tab, cfg, cfg.kept, b, h, i, j))
  loads = _visited(specs.tile(1, 0), (1, 1, nb, kept), flat)            # k of head 0: (b, A, block, W)
  for i in range(nb):
    assert sorted(int(loads[(0, 0, i, j)][2]) for j in range(kept)) == list(table[0, 0, i])
  assert {int(x[2]) for x in loads.values()} == {0, 1, 3}

  rows, counts = blocks.transpose(jnp.asarray(table), nb)
  specs = block_sparse._Specs(cfg, lambda b, h, i, j, rws, cnt: entry(rws, cfg, cfg.nb, b, h, i, j))
  loads = _visited(specs.tile(0, 0), (1, 1, nb, nb), rows.reshape(-1), counts.reshape(-1))
  for kb in range(nb):
    seq = [int(loads[(0, 0, kb, j)][2]) for j in range(nb)]
    live = int(counts[0, 0, kb])
    assert seq[:live] == [i for i in range(nb) if kb in table[0, 0, i]]
    assert len(set(seq[max(live - 1, 0):])) == 1          # no new block after the last live step
  assert int(counts[0, 0, 2]) == int(counts[0, 0, 4]) == 0


def test_block_selection_matches_numpy_reference():
  """The predictor's block scores and table against NumPy: q pooled per query block (mean), coefficient
  logits ``(q W_q + b_q) K̂ / sqrt(H)``, softmax cut to its top ``coef_topk``, times the thresholded
  ``|W_up|`` summed over each key block; key block 0 forced, top ``ceil(rho nb)``."""
  model = models.create("vit_test", keep_rate=0.4, img_size=36, mask_block=16)
  pred = model.blocks[0].attn.mask_predictor
  rng = np.random.default_rng(2)
  n, h, d = 82, 2, 16
  qkv = jnp.asarray(rng.normal(size=(2, n, 3, h, d)), jnp.float32)
  mask, scores = pred(qkv)

  q, k = np.asarray(qkv[:, :, 0], np.float64), np.asarray(qkv[:, :, 1], np.float64)
  w_q, b_q = np.asarray(pred.proj_c_q.kernel[...]), np.asarray(pred.proj_c_q.bias[...])
  w_k, b_k = np.asarray(pred.proj_c_k.kernel[...]), np.asarray(pred.proj_c_k.bias[...])
  proj_n, up = np.asarray(pred.proj_n[...]), np.asarray(pred.proj_back_n[...]).T      # [N, m], [m, N]
  basis = np.where(np.abs(up) > pred.basis_threshold, np.abs(up), 0.0)
  nb = -(-n // 16)
  q_pool = np.stack([q[:, i * 16:(i + 1) * 16].mean(1) for i in range(nb)], 1)      # [B, nb, H, d]
  basis_pool = np.stack([basis[:, j * 16:(j + 1) * 16].sum(1) for j in range(nb)], 1)   # [m, nb]
  k_hat = np.einsum("bnhc,nm->bhcm", k @ w_k + b_k, proj_n)
  logits = np.einsum("bihc,bhcm->bhim", q_pool @ w_q + b_q, k_hat) * h ** -0.5
  coef = np.exp(logits - logits.max(-1, keepdims=True))
  coef /= coef.sum(-1, keepdims=True)
  cut = np.sort(logits, -1)[..., -pred.coef_topk][..., None]
  coef = np.where(logits >= cut, coef, 0.0)
  want = coef @ basis_pool
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask.table), _numpy_select(want, blocks.budget(0.4, n, 16)))
  assert mask.block_size == 16 and mask.table.shape == (2, h, nb, 3)


def test_block_mask_rows_keep_whole_blocks():
  table = jnp.asarray([[[[0, 1], [0, 2], [0, 2]]]], jnp.int32)
  mask = blocks.block_mask(table, 40, 16)                                  # rows 1..39
  dense = np.asarray(mask.to_dense())[0, 0]
  assert dense[0].all()                                                    # CLS row dense
  np.testing.assert_array_equal(dense[5], np.arange(40) < 32)             # query block 0: blocks 0, 1
  np.testing.assert_array_equal(dense[39], (np.arange(40) < 16) | (np.arange(40) >= 32))
  assert np.asarray(mask.valid).sum(-1)[0, 0, 38] == 16 + 8               # ragged block: 8 real keys


@pytest.mark.parametrize("bad", [8, 24, -16])
def test_config_refuses_a_block_that_is_not_a_power_of_two(bad):
  with pytest.raises(ValueError, match=r"mask_block=.* must be 0 \(per-row selection\) or a power of two"):
    models.create("vit_test", keep_rate=0.25, mask_block=bad)


def test_block_mask_counts_from_the_table_equal_the_expanded_mask():
  rng = np.random.default_rng(4)
  table = _random_table(rng, (2, 3), blocks.count(40, 16), 2)
  mask = blocks.block_mask(table, 40, 16)
  np.testing.assert_array_equal(np.asarray(mask.nnz()), np.asarray(mask.to_dense()).sum((-1, -2)))
  np.testing.assert_allclose(np.asarray(mask.density_per_example()),            # float32, within 1e-6
                             np.asarray(mask.to_dense()).mean((1, 2, 3)), rtol=1e-6)

