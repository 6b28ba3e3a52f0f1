"""Fixed/oracle attention patterns: Fibottention's published numbers, budgets, executors, training."""

import pathlib
import dataclasses
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import patterns as patterns_config
from configs import tiny_test
from sparsifiner_jax import attention as attn_lib
from sparsifiner_jax import models, sweeps
from sparsifiner_jax.attention import patterns
from sparsifiner_jax.evaluation import flops
from sparsifiner_jax.train import trainer

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
PATTERN_SWEEP = os.path.join(ROOT, "configs", "sweeps", "patterns.py")

# A 5 x 5 patch grid (N = 26), 3 heads: small, odd sizes that reach the formulas' edge cases.
GRID, HEADS, DIM = 5, 3, 8
N = GRID ** 2 + 1
CASES = [  # (name, options, keep_rate, layer)
    ("fibottention", {}, None, 0),
    ("fibottention", {"shuffle": True}, None, 1),
    ("window", {"radius": 1}, None, 0),
    ("window", {"radius": 3}, None, 0),
    ("window", {"radius": 2, "variant": "neighborhood"}, None, 0),
    ("sparse_transformer", {"mode": "strided", "stride": 4}, None, 0),
    ("sparse_transformer", {"mode": "strided", "merge": True}, None, 0),
    ("sparse_transformer", {"mode": "fixed", "stride": 4, "summary": 2}, None, 0),
    ("sparse_transformer", {"mode": "fixed", "stride": 7, "summary": 5, "merge": True}, None, 0),
    ("bigbird", {}, None, 0),
    ("bigbird", {"window": 2, "num_global": 2, "num_random": 3, "seed": 4}, None, 3),
    ("random", {}, 0.3, 0),
    ("random", {"k": 1}, None, 0),
    ("oracle_topk", {}, 0.3, 0),
    ("routing", {}, None, 0),
    ("routing", {"clusters": 3, "size": 6, "iters": 0}, None, 0),
    ("full", {}, None, 0),
]
IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


def make(name, options=(), keep_rate=None, layer=0, grid=GRID, heads=HEADS):
  return patterns.from_options(name, grid=grid, num_heads=heads, layer=layer, keep_rate=keep_rate,
                               options=options)


def qkv(seed=0, batch=2, n=N, heads=HEADS):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(kk, (batch, n, heads, DIM), jnp.float32) for kk in keys]


def materialise(pattern, q=None, k=None):
  """``(to_dense [B|1, H|1, N, N], nnz [B|1, H|1], density)`` of the pattern's mask, in one jit."""
  if q is None:
    q, k, _ = qkv()

  @jax.jit
  def run(q, k):
    mask = pattern(q, k)
    return mask.to_dense(), mask.nnz(), mask.density()

  return tuple(np.asarray(x) for x in run(q, k))


def dense_keep(pattern, q=None, k=None):
  """The pattern's boolean mask as numpy ``[B|1, H|1, N, N]``."""
  return materialise(pattern, q, k)[0]


def table_keep(pattern):
  """A static pattern's mask ``[H|1, N, N]`` from its index tables, in numpy (no XLA compile)."""
  idx, valid = pattern.tables()
  valid = np.ones(idx.shape, bool) if valid is None else valid
  n, nd = pattern.num_tokens, pattern.num_dense_rows
  keep = np.zeros((idx.shape[0], n, n), bool)
  keep[:, :nd] = True
  h, r, j = np.nonzero(valid)
  keep[h, r + nd, idx[h, r, j]] = True
  return keep


# --------------------------------------------------------------------------------------------------
# Fibottention: the official code's offsets and densities (N = 197, P = 196).


def test_fibottention_offsets_and_worked_table_n197_h6():
  rows = patterns.wythoff_offsets(6, 196)
  assert rows == ((1, 2, 3, 5), (4, 7, 11), (6, 10, 16, 26), (9, 15, 24, 39), (12, 20, 32, 52),
                  (14, 23, 37, 60))
  pattern = make("fibottention", grid=14, heads=6)
  perm = patterns.head_permutation(6, 0)
  keep = table_keep(pattern)                                                # [H, 197, 197]
  # Head positions hold Wythoff rows perm[p]; undo the permutation to read the table in row order.
  by_row = {perm[p]: keep[p] for p in range(6)}
  edges = [int(by_row[i][1:, 1:].sum()) for i in range(1, 7)]
  assert edges == [1546, 1132, 1452, 1394, 1336, 1300]
  patch = [100 * e / 196 ** 2 for e in edges]
  full = [100 * by_row[i].sum() / 197 ** 2 for i in range(1, 7)]
  np.testing.assert_allclose(patch, [4.02, 2.95, 3.78, 3.63, 3.48, 3.38], atol=0.005)
  np.testing.assert_allclose(full, [5.00, 3.93, 4.75, 4.60, 4.46, 4.36], atol=0.005)
  for i in range(1, 7):
    m = by_row[i]
    assert m[0].all() and m[:, 0].all()                                      # CLS row and column
    assert not np.diagonal(m)[1:].any()                                       # no self-attention
    dist = np.abs(np.arange(196)[:, None] - np.arange(196)[None, :])
    np.testing.assert_array_equal(m[1:, 1:], np.isin(dist, rows[i - 1]))     # 1-D raster offsets
  # Example query: patch 100 in head 6 (token 101).
  kept = set(np.flatnonzero(by_row[6][101]) - 1) - {-1}
  assert kept == {86, 114, 77, 123, 63, 137, 40, 160}
  assert pattern.density() == pytest.approx(float(np.mean(full)) / 100, abs=1e-12)


@pytest.mark.parametrize("heads,percent", [(3, 5.42), (6, 4.52), (12, 2.99)])
def test_fibottention_mean_density_incl_cls(heads, percent):
  pattern = make("fibottention", grid=14, heads=heads)
  density = jax.jit(lambda q, k: pattern(q, k).density())(*qkv(n=197, heads=heads, batch=1)[:2])
  assert 100 * float(density) == pytest.approx(percent, abs=0.005)           # AttentionMask.density()
  keep = table_keep(pattern)
  assert 100 * pattern.density() == pytest.approx(percent, abs=0.005)        # closed form
  assert 100 * keep.sum() / (heads * 197 ** 2) == pytest.approx(percent, abs=0.005)   # distinct entries


def test_fibottention_head_shuffle():
  assert patterns.head_permutation(6, 0) == (5, 3, 2, 1, 6, 4)
  assert patterns.head_permutation(6, 1) == (3, 4, 6, 1, 5, 2)
  for seed in (0, 1, 7):                     # the same stream as the official random.seed + shuffle
    random.seed(seed)
    rows = list(range(1, 13))
    random.shuffle(rows)
    assert patterns.head_permutation(12, seed) == tuple(rows)
  rows = patterns.wythoff_offsets(6, 196)
  off = make("fibottention", grid=14, heads=6, layer=1)
  on = make("fibottention", {"shuffle": True}, grid=14, heads=6, layer=1)
  assert off.head_offsets() == tuple(rows[r - 1] for r in (5, 3, 2, 1, 6, 4))  # layer 0's, always
  assert on.head_offsets() == tuple(rows[r - 1] for r in (3, 4, 6, 1, 5, 2))   # random.seed(1)


def test_fibottention_small_grid_keeps_a():
  # P = 16: w_max = 5 = w_min, so rows 3 and 4 start above their window; a_i is kept anyway.
  assert patterns.wythoff_offsets(4, 16) == ((1, 2, 3, 5), (4,), (6,), (9,))


# --------------------------------------------------------------------------------------------------
# Every pattern: budget == closed form, no duplicate keys, executors agree.


@pytest.mark.parametrize("name,options,keep_rate,layer", CASES, ids=IDS)
def test_density_equals_analytic_budget(name, options, keep_rate, layer):
  pattern = make(name, options, keep_rate, layer)
  keep, nnz, density = materialise(pattern)
  nnz = np.broadcast_to(nnz, (2, HEADS))
  counted = keep.sum(axis=(-1, -2))                                          # distinct entries
  np.testing.assert_array_equal(np.broadcast_to(counted, (2, HEADS)), nnz)   # no duplicates
  np.testing.assert_array_equal(nnz, np.broadcast_to(pattern.nnz_per_head(), (2, HEADS)))
  assert float(density) == pytest.approx(pattern.density(), rel=1e-6)


# One case per pattern, chosen to hit padding (valid), per-head and per-sample indices, extra dense rows.
EXECUTOR_CASES = [CASES[i] for i in (1, 4, 8, 10, 11, 13, 15, 16)]


@pytest.mark.parametrize("name,options,keep_rate,layer", EXECUTOR_CASES,
                         ids=[c[0] for c in EXECUTOR_CASES])
def test_executors_agree(name, options, keep_rate, layer):
  """masked (reference), sparse (gathers) and auto (the CPU kernel) on every pattern's mask."""
  pattern = make(name, options, keep_rate, layer)
  q, k, v = qkv(1)
  w = jax.random.normal(jax.random.key(9), q.shape)

  with_grads = name == "bigbird"          # padded rows and extra dense rows; one case keeps it fast

  @jax.jit
  def run(q, k, v):
    outs = []
    for ex in (attn_lib.masked_attention, attn_lib.gather_attention, attn_lib.auto_attention):
      f = lambda q, k, v, ex=ex: jnp.sum(ex(q, k, v, pattern(q, k)) * w)
      grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v) if with_grads else ()
      outs.append((ex(q, k, v, pattern(q, k)), grads))
    return outs

  (a, ga), *others = run(q, k, v)
  for b, gb in others:
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    for x, y in zip(gb, ga):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def _hand_fibottention_keep(grid, heads):
  """The official mask, written out independently: CLS row/col, |j-k| in F for patches."""
  p, n = grid ** 2, grid ** 2 + 1
  rows = patterns.wythoff_offsets(heads, p)
  perm = patterns.head_permutation(heads, 0)
  keep = np.zeros((heads, n, n), bool)
  for h in range(heads):
    keep[h, 0, :] = keep[h, :, 0] = True
    for j in range(p):
      for o in rows[perm[h] - 1]:
        for t in (j - o, j + o):
          if 0 <= t < p:
            keep[h, j + 1, t + 1] = True
  return keep


def test_zero_logit_fill_matches_dense_reference():
  q, k, v = qkv(2)
  pattern = make("fibottention", {"fill": "zero_logit"})
  keep = _hand_fibottention_keep(GRID, HEADS)
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64) / math.sqrt(DIM), np.asarray(k))
  logits = np.where(keep[None], logits, 0.0)                 # masked logits become 0 (weight e^0)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", probs, np.asarray(v))
  mask = pattern(q, k)
  assert mask.fill == "zero_logit"
  np.testing.assert_array_equal(np.asarray(mask.to_dense())[0], keep)
  for ex in ("masked", "gather"):
    np.testing.assert_allclose(attn_lib.EXECUTORS[ex](q, k, v, mask), want, atol=1e-5, rtol=0)
  # True sparse attention differs: the masked keys get no weight at all.
  sparse = make("fibottention")(q, k)
  assert np.abs(np.asarray(attn_lib.masked_attention(q, k, v, sparse)) - want).max() > 1e-2


def test_sigmoid_executor():
  q, k, v = qkv(3)
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64) / math.sqrt(DIM), np.asarray(k))
  sig = lambda x: 1 / (1 + np.exp(-x))
  ref = lambda w: np.einsum("bhqk,bkhd->bqhd", w, np.asarray(v))
  sigmoid = attn_lib.EXECUTORS["sigmoid"]
  np.testing.assert_allclose(sigmoid(q, k, v, None), ref(sig(logits - np.log(N))), atol=1e-5)
  mask = make("window", {"radius": 1})(q, k)
  keep = np.asarray(mask.to_dense())
  np.testing.assert_allclose(sigmoid(q, k, v, mask), ref(np.where(keep, sig(logits - np.log(N)), 0)),
                             atol=1e-5)
  zero = make("window", {"radius": 1, "fill": "zero_logit"})(q, k)
  want = ref(sig(np.where(keep, logits, 0.0) - np.log(N)))                  # masked: sigmoid(-log N)
  np.testing.assert_allclose(sigmoid(q, k, v, zero), want, atol=1e-5)
  full = make("full")(q, k)
  np.testing.assert_allclose(sigmoid(q, k, v, full), sigmoid(q, k, v, None), atol=1e-6)
  assert "sigmoid" in attn_lib.EXECUTORS
  models.get_config("vit_test", attention_pattern="full", executor="sigmoid")   # validates


# --------------------------------------------------------------------------------------------------
# What each pattern keeps.


def test_window_variants():
  clip = dense_keep(make("window", {"radius": 1}))[0, 0]
  na = dense_keep(make("window", {"radius": 1, "variant": "neighborhood"}))[0, 0]
  counts = na[1:].sum(-1)
  assert (counts == 9 + 1).all()                                            # (2k+1)^2 + CLS, borders too
  assert clip[1].sum() == 4 + 1 and clip[1 + 12].sum() == 9 + 1             # corner, centre
  # Corner (0, 0) in the neighbourhood variant sees rows/cols 0..2.
  want = {r * GRID + c + 1 for r in range(3) for c in range(3)} | {0}
  assert set(np.flatnonzero(na[1])) == want
  assert (clip == clip.T).all()


def test_sparse_transformer_heads():
  keep = dense_keep(make("sparse_transformer", {"mode": "strided", "stride": 4}))[0][:, 1:, 1:]
  i, j = np.arange(25)[:, None], np.arange(25)[None, :]
  np.testing.assert_array_equal(keep[0], np.abs(i - j) < 4)                 # heads 0, 1: A
  np.testing.assert_array_equal(keep[1], np.abs(i - j) < 4)
  np.testing.assert_array_equal(keep[2], (i - j) % 4 == 0)                  # head 2: B
  fixed = dense_keep(make("sparse_transformer", {"mode": "fixed", "stride": 4, "summary": 1}))[0]
  summary = np.arange(25) % 4 == 3
  np.testing.assert_array_equal(fixed[0, 1:, 1:], i // 4 == j // 4)
  np.testing.assert_array_equal(fixed[2, 1:, 1:], summary[:, None] | summary[None, :])
  assert all((fixed[h] == fixed[h].T).all() for h in range(HEADS))         # symmetrised


def test_bigbird_globals_window_random():
  pattern = make("bigbird", {"window": 1, "num_global": 2, "num_random": 3})
  keep = dense_keep(pattern)[0]
  assert keep[:, :3].all() and keep[:, :, :3].all()                         # CLS + 2 global patches
  for h in range(HEADS):
    for j in range(2, 25):
      band = {t + 1 for t in range(max(2, j - 1), min(25, j + 2))}
      kept = set(np.flatnonzero(keep[h, j + 1]))
      assert band | {0, 1, 2} <= kept and len(kept - band - {0, 1, 2}) == 3
  again = dense_keep(make("bigbird", {"window": 1, "num_global": 2, "num_random": 3}))
  other = dense_keep(make("bigbird", {"window": 1, "num_global": 2, "num_random": 3}, layer=1))
  assert (again[0] == keep).all() and not (other[0] == keep).all()          # static per layer


def test_random_pattern_is_seeded():
  a = dense_keep(make("random", {"k": 6}))[0]
  assert (a[:, 1:].sum(-1) == 6).all() and a[:, 1:, 0].all()
  assert (a == dense_keep(make("random", {"k": 6}))[0]).all()
  assert not (a == dense_keep(make("random", {"k": 6, "seed": 1}))[0]).all()
  assert not (a[0] == a[1]).all()                                           # drawn per head
  assert make("random", keep_rate=0.25).nnz_per_head()[0] == N + 25 * math.ceil(0.25 * N)


def test_oracle_topk_keeps_largest_logits():
  q, k, _ = qkv(4)
  mask = make("oracle_topk", {"k": 5})(q, k)
  keep = np.asarray(mask.to_dense())
  logits = np.asarray(attn_lib.attention_logits(q, k))
  assert keep[:, :, 0].all()                                                 # CLS row dense
  for b in range(2):
    for h in range(HEADS):
      for r in range(1, N):
        kept, dropped = logits[b, h, r][keep[b, h, r]], logits[b, h, r][~keep[b, h, r]]
        assert len(kept) == 5 and kept.min() >= dropped.max()


def test_routing_clusters():
  q, k, _ = qkv(5)
  pattern = make("routing", {"clusters": 3, "size": 6})
  indices = jax.jit(lambda q, k: pattern(q, k).indices)
  idx = np.asarray(indices(q, k))                                             # [B, H, P, 7]
  assert (idx[..., 0] == 0).all() and ((idx[..., 1:] >= 1) & (idx[..., 1:] < N)).all()
  for b in range(2):
    for h in range(HEADS):
      sets = {tuple(sorted(row[1:])) for row in idx[b, h]}
      assert 1 <= len(sets) <= 3                                              # one key set per cluster
      assert all(len(s) == len(set(s)) == 6 for s in sets)
  # Deterministic, and a function of q and k only through stop_gradient.
  np.testing.assert_array_equal(idx, np.asarray(indices(q, k)))
  grad = jax.jit(jax.grad(lambda q: jnp.sum(pattern(q, k).indices.astype(jnp.float32))))(q)
  assert not np.asarray(grad).any()


# --------------------------------------------------------------------------------------------------
# Models, configs, FLOPs, sweeps.


@pytest.fixture(scope="module")
def fib_model():
  """``models.create("vit_test", attention_pattern="fibottention")`` and one jitted forward."""
  model = models.create("vit_test", attention_pattern="fibottention", rngs=nnx.Rngs(0))
  logits, aux = nnx.jit(lambda m, x: m(x))(model, jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
  return model, logits, aux


def test_model_forward(fib_model):
  model, logits, aux = fib_model
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
  assert model.blocks[0].attn.pattern == make("fibottention", grid=4, heads=2)
  assert float(aux["masks"][0].density()) == pytest.approx(
      patterns.analytic_density(model.config), rel=1e-6)
  hash(nnx.graphdef(model))                                                  # pattern in the graphdef


def test_bad_patterns_and_options_name_what_is_allowed():
  with pytest.raises(ValueError, match=r"unknown attention_pattern 'fibo'; allowed: sparsifiner, "
                                       r"bigbird, fibottention, full"):
    models.get_config("vit_test", attention_pattern="fibo")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['radiu'\]; allowed: \['fill', 'radius', "
                                       r"'variant'\]"):
    models.get_config("vit_test", attention_pattern="window", pattern_options={"radiu": 1})
  with pytest.raises(ValueError, match=r"variant='square'; allowed: clip, neighborhood"):
    models.get_config("vit_test", attention_pattern="window", pattern_options={"variant": "square"})
  with pytest.raises(ValueError, match=r"fill='zero'; allowed: neg_inf, zero_logit"):
    models.get_config("vit_test", attention_pattern="fibottention", pattern_options={"fill": "zero"})
  with pytest.raises(ValueError, match="radius=1.5 must be of type int"):
    models.get_config("vit_test", attention_pattern="window", pattern_options={"radius": 1.5})
  with pytest.raises(ValueError, match="needs a budget: set keep_rate or the option k"):
    models.get_config("vit_test", attention_pattern="random")
  with pytest.raises(ValueError, match="takes none"):
    models.get_config("vit_test", pattern_options={"radius": 1})


def test_flops_count_patterns_by_their_nnz(fib_model):
  model, _, aux = fib_model
  cfg = model.config
  analytic, realised = flops.count(cfg), flops.from_aux(cfg, aux, model)
  nnz = float(np.mean(patterns.build(cfg, 0, None).nnz_per_head()))
  for report in (analytic, realised):
    assert [layer["nnz_per_head"] for layer in report.per_layer] == [nnz, nnz]
    assert report.totals["predictor"] == 0
    assert report.totals["attention_matrix"] == pytest.approx(2 * 2 * nnz * 32)   # 2 layers, C = 32
  zero = models.get_config("vit_test", attention_pattern="fibottention",
                           pattern_options={"fill": "zero_logit"})
  zero_aux = dict(aux, masks=[dataclasses.replace(m, fill="zero_logit") for m in aux["masks"]])
  for report in (flops.count(zero), flops.from_aux(zero, zero_aux, model)):
    assert report.totals["attention_matrix"] == report.totals["attention_matrix_dense"]   # not sparse
  oracle = flops.count(models.get_config("vit_test", keep_rate=0.5, attention_pattern="oracle_topk"))
  assert oracle.per_layer[0]["nnz_per_head"] == 17 + 16 * 9
  assert oracle.per_layer[0]["predictor_scores"] == 16 * 17 * 16 * 2     # P N d h: the full logits
  assert oracle.per_layer[0]["predictor_channel"] == 0


def test_pattern_configs_match_the_budget():
  target = patterns.analytic_density(models.get_config("vit_digits", keep_rate=0.25))
  assert target == pytest.approx((65 + 64 * 17) / 65 ** 2)
  for arg in ("pattern=random", "pattern=oracle_topk", "pattern=routing",
              "pattern=sparse_transformer,mode=fixed", "pattern=bigbird", "pattern=window"):
    c = patterns_config.get_config(arg + ",budget=0.25")
    cfg = models.get_config(c.model_name, **models.model_kwargs(c))
    assert cfg.attention_pattern == arg.split(",")[0].split("=")[1]
    assert abs(patterns.analytic_density(cfg) - target) < 0.035, arg      # the knob's granularity
    assert c.phases.distill.epochs == 25 and c.phases.train.epochs == 0
  c = patterns_config.get_config("pattern=sigmoid")
  assert (c.model.attention_pattern, c.model.executor, c.method) == ("full", "sigmoid", "sigmoid")
  c = patterns_config.get_config("pattern=fibottention,fill=zero_logit")
  assert c.method == "fibottention(zero_logit)" and c.model.pattern_options.fill == "zero_logit"
  assert patterns_config.get_config("pattern=sparsifiner").model.keep_rate == 0.25
  scratch = patterns_config.get_config("pattern=window,scratch=True,epochs=2")
  assert (scratch.phases.train.epochs, scratch.phases.distill.epochs) == (2.0, 0)
  with pytest.raises(ValueError, match="unknown method pattern='foo'"):
    patterns_config.get_config("pattern=foo")


def test_pattern_sweep_is_one_line_per_method():
  sweep = sweeps.load_sweep(PATTERN_SWEEP)
  args = [entry["config_arg"] for entry in sweep]
  assert len(args) == len(set(args)) == 13
  assert "pattern=fibottention" in args and "pattern=window,budget=0.25" in args
  for arg in args:
    patterns_config.get_config(arg)                                          # every line builds
  two = sweeps.load_sweep(PATTERN_SWEEP + ":budgets=0.25/0.1")
  assert len(two) == 13 + 9                                                  # budgeted lines twice
  (workdir, argv), = sweeps.build_commands("train.py", "configs/patterns.py",
                                           [{"config_arg": "pattern=window,budget=0.25"}], "R")
  assert workdir == os.path.join("R", "pattern=window,budget=0.25")
  assert argv[1:] == ["train.py", "--config=configs/patterns.py:pattern=window,budget=0.25",
                      f"--workdir={workdir}"]


# --------------------------------------------------------------------------------------------------
# Training end to end (trainer.train on the tiny config, train phase only, 2 steps, one device).

TRAIN_CASES = [  # (pattern, options, keep_rate, executor); all but the first are slow (~15-30 s each)
    ("fibottention", {}, None, "masked"),
] + [pytest.param(*case, marks=pytest.mark.slow, id=f"{case[0]}-{case[3]}") for case in [
    ("oracle_topk", {}, 0.5, "masked"),
    ("fibottention", {"fill": "zero_logit", "shuffle": True}, None, "masked"),
    ("window", {"variant": "neighborhood"}, None, "gather"),
    ("sparse_transformer", {"mode": "fixed"}, None, "masked"),
    ("bigbird", {}, None, "gather"),
    ("random", {}, 0.5, "masked"),
    ("routing", {}, None, "gather"),
    ("full", {}, None, "sigmoid"),
]]


@pytest.mark.parametrize("name,options,keep_rate,executor", TRAIN_CASES)
def test_training_run(tmp_path, name, options, keep_rate, executor):
  c = tiny_test.get_config()
  c.model.keep_rate = keep_rate
  c.model.attention_pattern = name
  c.model.pattern_options = options
  c.model.executor = executor
  c.phases.recon.steps = c.phases.distill.steps = 0
  c.phases.train.steps = 2
  c.mesh = [("data", 1), ("fsdp", 1)]
  c.ckpt_every = 0
  out = trainer.train(c, str(tmp_path / name), devices=jax.devices()[:1])
  ev = out["phases"]["train"]
  cfg = models.get_config("vit_test", **models.model_kwargs(c))
  assert out["step"] == 2 and np.isfinite(ev["loss"]) and 0.0 <= ev["top1"] <= 1.0
  assert ev["density"] == pytest.approx(patterns.analytic_density(cfg), rel=1e-5)
