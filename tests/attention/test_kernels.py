"""The CPU kernels (``sparsifiner_jax.attention.cpu``).

Build status and fallbacks; the top-k mask kernel's exact agreement with the ``lax.top_k`` reference
(ties, infinities, signed zeros, NaN), jit/vmap, gradients through ``keep_topk_values``; the fused
low-rank mask kernel and the sparse attention kernel against their XLA references; whole-model equality
with the XLA fallback, and batch-sharded execution."""

import dataclasses
import functools
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import attention as attn_lib
from sparsifiner_jax.attention import cpu
from sparsifiner_jax import models
from sparsifiner_jax.models import predictor

TOPK_TARGET = "sparsifiner_topk_mask"  # the FFI target name registered by cpu._load


def _ks(n):
  return sorted({1, 2, max(1, n // 4), n - 1, n})


@functools.partial(jax.jit, static_argnums=1)
def _kernel_and_reference(x, ks):
  return [(cpu.topk_keep_mask(x, k), cpu.topk_keep_mask_xla(x, k)) for k in ks]


def _check(x, ks=None):
  """Kernel mask == reference mask exactly (every k in ``ks``), with exactly k True per row; returns
  the kernel masks."""
  ks, masks = tuple(ks or _ks(x.shape[-1])), []
  traced = _kernel_and_reference.trace(x, ks)
  assert TOPK_TARGET in str(traced.jaxpr)                    # else kernel == reference would be vacuous
  for k, (got, want) in zip(ks, traced.lower().compile()(x)):
    got = np.asarray(got)
    assert got.dtype == np.bool_ and got.shape == x.shape
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}, shape={x.shape}")
    np.testing.assert_array_equal(got.sum(-1), np.full(x.shape[:-1], k))
    masks.append(got)
  return masks


def _uses_kernel(fn, *args):
  return TOPK_TARGET in str(jax.make_jaxpr(fn)(*args))


@pytest.fixture
def needs_kernel():
  """Comparing the kernel with the reference needs the kernel (test_kernel_status_on_this_machine
  asserts it is built wherever a compiler exists)."""
  status = cpu.kernel_status()
  if not status["available"]:
    pytest.skip(f"CPU kernel not available: {status['reason']}")


@pytest.fixture
def no_kernel(monkeypatch):
  """Forces the XLA fallback, as when the kernel cannot be built (``_load`` is read at trace time)."""
  monkeypatch.setattr(cpu, "_load", lambda: False)


# ------------------------------------------------------------------------------------------------
# Build status and fallbacks.


def test_kernel_status_on_this_machine():
  status = cpu.kernel_status()
  cxx = os.environ.get("CXX", "g++")
  if os.environ.get("SPARSIFINER_JAX_CPU_KERNELS", "1") == "0":
    assert not status["available"] and "SPARSIFINER_JAX_CPU_KERNELS" in status["reason"]
  elif shutil.which(cxx) is None:
    assert not status["available"]
    assert "compiler" in status["reason"] and cxx in status["reason"]
  else:
    assert status["available"], status["reason"]
    assert status["reason"].startswith("loaded ") and status["reason"].endswith(".so")
    x = jnp.arange(6.0).reshape(2, 3)
    assert _uses_kernel(lambda x: cpu.topk_keep_mask(x, 2), x)


@pytest.mark.parametrize("cxx,reason", [("/nonexistent/c++", "no C++ compiler"), ("false", "failed")])
def test_unbuildable_kernel_reports_why(monkeypatch, tmp_path, cxx, reason):
  """No compiler on PATH, or a compiler that fails: ``_load`` returns False and the status says why."""
  monkeypatch.setattr(cpu, "_status", {"available": False, "reason": "not loaded yet"})
  monkeypatch.delenv("SPARSIFINER_JAX_CPU_KERNELS", raising=False)
  monkeypatch.setenv("CXX", cxx)
  monkeypatch.setenv("SPARSIFINER_JAX_CACHE", str(tmp_path))   # no cached library to reuse
  assert cpu._load.__wrapped__() is False
  assert not cpu._status["available"]
  assert reason in cpu._status["reason"]
  assert not list(tmp_path.rglob("*.so"))


def test_env_var_disables_kernel(monkeypatch):
  monkeypatch.setattr(cpu, "_status", {"available": True, "reason": "stale"})
  monkeypatch.setenv("SPARSIFINER_JAX_CPU_KERNELS", "0")
  assert cpu._load.__wrapped__() is False
  assert cpu._status == {"available": False,
                             "reason": "disabled by SPARSIFINER_JAX_CPU_KERNELS=0"}


def test_fallback_path_is_the_reference(no_kernel):
  x = jax.random.normal(jax.random.key(0), (4, 20))
  assert not _uses_kernel(lambda x: cpu.topk_keep_mask(x, 5), x)
  np.testing.assert_array_equal(cpu.topk_keep_mask(x, 5), cpu.topk_keep_mask_xla(x, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_reference_marks_exactly_the_top_k_indices(dtype):
  """``topk_keep_mask_xla`` (elementwise, no scatter) marks the indices ``lax.top_k`` returns, on rows
  full of ties, signed zeros, infinities and NaNs of both signs."""
  rng = np.random.default_rng(5)
  x = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 2.0]), size=(64, 13))
  x = jnp.asarray(x, dtype)
  for k in (1, 3, 6, 12):
    _, idx = jax.lax.top_k(x, k)
    want = np.zeros(x.shape, bool)
    np.put_along_axis(want, np.asarray(idx), True, axis=-1)
    np.testing.assert_array_equal(np.asarray(cpu.topk_keep_mask_xla(x, k)), want, err_msg=f"k={k}")


@pytest.mark.parametrize("k", [0, -1, 11])
def test_bad_k_raises(k):
  with pytest.raises(ValueError, match=r"top-k budget k=.* must be in \[1, 10\]"):
    cpu.topk_keep_mask(jnp.zeros((3, 10)), k)


# ------------------------------------------------------------------------------------------------
# Exact agreement with lax.top_k.


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("shape", [(37,), (5, 64), (2, 3, 7, 50), (4, 8, 40, 33)])
def test_random_matches_reference(shape):
  _check(np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32))


@pytest.mark.usefixtures("needs_kernel")
def test_heavy_ties_and_constant_rows():
  levels = np.round(np.random.default_rng(1).uniform(size=(54, 48)) * 3) / 3   # 4 distinct values
  const = np.array([[0.5], [-2.0], [0.0]]) * np.ones(48)                         # every entry tied
  x = np.concatenate([levels, const]).astype(np.float32).reshape(3, 19, 48)
  for k, m in zip(_ks(48), _check(x)):
    m = m.reshape(57, 48)[54:]
    assert m[:, :k].all() and not m[:, k:].any()          # all tied: the lowest indices win


@pytest.mark.usefixtures("needs_kernel")
def test_infinities_and_negative_values():
  n, inf = 40, np.inf
  x = -10.0 - np.abs(np.random.default_rng(2).normal(size=(8, n)))     # all negative
  x[0] = -inf                                                          # whole row -inf
  x[1, ::2] = -inf                                                     # half the row -inf
  x[2, 3:] = -inf                                                      # only 3 finite entries
  x[3, [5, 7]] = inf                                                   # +inf ties
  x[4] = np.where(np.arange(n) % 3 == 0, inf, -inf)                    # only +-inf
  x[5, :2] = [-np.finfo(np.float32).max, np.finfo(np.float32).max]
  _check(x.astype(np.float32))


@pytest.mark.usefixtures("needs_kernel")
def test_signed_zeros_subnormals_and_nan():
  """Same total order as XLA's TopK: -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < NaN."""
  rng = np.random.default_rng(3)
  zeros = rng.choice(np.array([0.0, -0.0], np.float32), size=(10, 24))
  zeros[:, 5], zeros[:, 6] = 1.0, -1.0
  zeros[0] = np.tile(np.array([-0.0, 0.0], np.float32), 12)
  tiny = np.float32(1e-45)                                             # smallest subnormal
  sub = rng.choice(np.array([-tiny, tiny, 0.0, -0.0, 2 * tiny], np.float32), size=(10, 24))
  nan = rng.normal(size=(10, 24)).astype(np.float32)
  nan[:, 3] = np.nan
  nan[::2, 9] = -np.nan
  nan[1::2, 9] = np.inf
  masks = _check(np.concatenate([zeros, sub, nan]))
  k = _ks(24)[2]
  np.testing.assert_array_equal(np.flatnonzero(masks[2][0]), np.arange(1, 2 * k, 2))  # +0.0 > -0.0


@pytest.mark.usefixtures("needs_kernel")
def test_bfloat16_input():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 30)), jnp.bfloat16)  # ties after rounding
  _check(x)


@pytest.mark.usefixtures("needs_kernel")
def test_under_jit_is_the_custom_call():
  x = np.round(np.random.default_rng(5).normal(size=(3, 4, 12, 13)) * 2).astype(np.float32) / 2
  f = jax.jit(cpu.topk_keep_mask, static_argnums=1)
  assert f'custom_call_target="{TOPK_TARGET}"' in f.lower(x, 3).compile().as_text()
  np.testing.assert_array_equal(f(x, 3), cpu.topk_keep_mask_xla(x, 3))


@pytest.mark.usefixtures("needs_kernel")
def test_under_vmap():
  x = np.round(np.random.default_rng(6).normal(size=(5, 4, 21)) * 3).astype(np.float32) / 3
  ks = (1, 5, 20)

  @jax.jit
  def run(x):
    out = []
    for k in ks:
      f = lambda r, k=k: cpu.topk_keep_mask(r, k)
      out.append((cpu.topk_keep_mask_xla(x, k), jax.vmap(f)(x),
                  jax.vmap(f, in_axes=1, out_axes=1)(x), jax.vmap(jax.vmap(f))(x),
                  jnp.swapaxes(jax.vmap(f, in_axes=1)(x), 0, 1)))
    return out

  for k, (want, *got) in zip(ks, run(x)):
    for g in got:
      np.testing.assert_array_equal(g, want, err_msg=f"k={k}")


@pytest.mark.usefixtures("needs_kernel")
def test_attention_mask_keep_equals_indices():
  """``topk_mask``'s dense ``keep`` (kernel) and its ``indices`` (lax.top_k) describe the same set."""
  scores = np.round(np.random.default_rng(7).normal(size=(2, 3, 16, 17)) * 2).astype(np.float32) / 2
  scores[..., 10:] = -np.inf
  ks = (1, 4, 12, 17)

  @jax.jit
  def run(scores):
    out = []
    for k in ks:
      mask = attn_lib.topk_mask(scores, k)
      out.append((mask.keep, attn_lib.indices_to_dense(mask.indices, 17), mask.to_dense(),
                  dataclasses.replace(mask, keep=None).to_dense()))
    return out

  for keep, from_indices, dense, dense_from_indices in run(scores):
    np.testing.assert_array_equal(keep, from_indices)
    np.testing.assert_array_equal(dense, dense_from_indices)


# ------------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("jit", [False, True])
def test_keep_topk_values_gradient(jit):
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 3, 10, 16)), jnp.float32)
  k = 5
  loss = lambda x, k=k: jnp.sum(predictor.keep_topk_values(x, k) ** 2)
  assert TOPK_TARGET in str(jax.make_jaxpr(jax.grad(loss))(x))

  def run(x):
    return (jax.grad(loss)(x), predictor.keep_topk_values(x, k), jax.grad(loss)(x, 16),
            cpu.topk_keep_mask_xla(x, k))

  grad, values, grad_all, keep = map(np.asarray, (jax.jit(run) if jit else run)(x))
  assert keep.sum() == x.size // 16 * k
  np.testing.assert_array_equal(values, np.where(keep, x, 0.0))
  np.testing.assert_allclose(grad, np.where(keep, 2 * np.asarray(x), 0.0), rtol=1e-6, atol=0)
  assert np.all(grad[~keep] == 0) and np.all(grad[keep] != 0)
  np.testing.assert_allclose(grad_all, 2 * np.asarray(x), rtol=1e-6)   # k >= n: the identity


# ------------------------------------------------------------------------------------------------
# Whole model: the kernel and the XLA fallback give the same logits.


def _forward_fn(graphdef):
  """A fresh function each call, so jit re-traces (and re-reads ``cpu._load``)."""
  def fwd(state, x):
    logits, aux = nnx.merge(graphdef, state)(x)
    return logits, aux["masks"][-1].to_dense()
  return fwd


KERNEL_TARGETS = {"topk": TOPK_TARGET, "lowrank": "sparsifiner_lowrank_topk_mask",
                  "attention": "sparsifiner_sparse_attention"}


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("kw,used", [
    ({"keep_rate": 0.25}, {"topk", "lowrank", "attention"}),    # topk: keep_topk_values of approx_attn
    ({"keep_rate": 0.25, "executor": "masked"}, {"topk", "lowrank"}),
    ({"keep_rate": 0.25, "token_keep_rate": 0.6, "token_pruning_layers": (0,),
      "token_pruning_mode": "mask"}, {"topk"}),
    ({"keep_rate": 0.25, "token_keep_rate": 0.6, "token_pruning_layers": (0,),
      "token_pruning_mode": "drop"}, {"topk", "lowrank", "attention"}),
], ids=["auto", "masked", "tokens-mask", "tokens-drop"])
def test_model_forward_same_with_and_without_kernel(monkeypatch, kw, used):
  """Same masks exactly and logits to 1e-5 (the fused mask kernel's coefficients differ from XLA's by
  float rounding only; at init they are ranked on the logits, so near-equal softmax values cannot flip)."""
  model = models.create("vit_test", rngs=nnx.Rngs(0), **kw)
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(9), (3, 16, 16, 3))
  traced = jax.jit(_forward_fn(graphdef)).trace(state, x)
  jaxpr = str(traced.jaxpr)
  assert {name for name, target in KERNEL_TARGETS.items() if target in jaxpr} == used
  logits, dense = traced.lower().compile()(state, x)

  monkeypatch.setattr(cpu, "_load", lambda: False)
  traced = jax.jit(_forward_fn(graphdef)).trace(state, x)
  assert not any(target in str(traced.jaxpr) for target in KERNEL_TARGETS.values())
  logits_xla, dense_xla = traced.lower().compile()(state, x)
  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(logits, logits_xla, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(dense, dense_xla)


# ------------------------------------------------------------------------------------------------
# Batch-sharded execution.


def _batch_sharded(shape=(16, 3, 24, 25), k=6):
  if jax.device_count() < 2:
    pytest.skip(f"needs several devices; conftest sets 8 host devices, this process has "
                f"{jax.device_count()}")
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = jax.sharding.NamedSharding(mesh, jax.P("data"))
  f = jax.jit(lambda x: cpu.topk_keep_mask(x, k), in_shardings=data, out_shardings=data)
  x = jnp.round(jax.random.normal(jax.random.key(10), shape) * 4) / 4
  return f, jax.device_put(x, data), x, k


@pytest.mark.usefixtures("needs_kernel")
def test_batch_sharded_matches_reference():
  f, xs, x, k = _batch_sharded()
  out = f(xs)
  assert len(out.sharding.device_set) == jax.device_count()
  assert out.sharding.spec == jax.P("data")
  np.testing.assert_array_equal(out, cpu.topk_keep_mask_xla(x, k))
  assert f'custom_call_target="{TOPK_TARGET}"' in f.lower(xs).compile().as_text()


@pytest.mark.usefixtures("needs_kernel")
def test_batch_sharded_kernel_runs_per_shard():
  """A plain jit with batch-sharded inputs (no ``jax.set_mesh``): the kernel takes the mesh from its
  operand and runs on each device's examples, with nothing gathered."""
  f, xs, x, _ = _batch_sharded()
  hlo = f.lower(xs).compile().as_text()
  calls = [line for line in hlo.splitlines() if f'custom_call_target="{TOPK_TARGET}"' in line]
  assert calls
  local = x.shape[0] // jax.device_count()
  for line in calls:
    out_shape = re.search(r"= pred\[(\d+),", line)
    assert out_shape and int(out_shape.group(1)) == local, line
  assert " all-gather(" not in hlo


def test_float64_input_keeps_its_precision():
  """The kernel compares in float32; float64 rows that only differ below that take the XLA path."""
  with jax.enable_x64(True):
    x = jnp.array([[1.0, 1.0 + 1e-12, 0.0]], jnp.float64)
    assert cpu.topk_keep_mask(x, 1).tolist() == [[False, True, False]]


# ------------------------------------------------------------------------------------------------
# The sparse attention kernel (cpu.sparse_row_attention, the `auto` executor on CPU) against the
# masked reference in float32: 1e-5 (unit-normal q, k, v: measured <= 1e-6 -- dot products summed in
# another order, and an exp within ~1 ulp of XLA's; with q, k of std 3, i.e. logits of std 9, the
# conditioning of the softmax grows the difference to ~2e-5).

ATTENTION_TARGET = "sparsifiner_sparse_attention"


def _masked_reference(nd):
  def ref(q, k, v, keep):
    return attn_lib.masked_attention(q, k, v, attn_lib.AttentionMask(
        indices=jnp.zeros((*keep.shape[:-1], 1), jnp.int32), num_dense_rows=nd,
        num_keys=q.shape[1], keep=keep, valid=jnp.ones((*keep.shape[:-1], 1), bool)))
  return ref


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("b,n,h,d,nd,mask_b,mask_h,density", [
    (2, 197, 3, 64, 1, 2, 3, 0.25),    # DeiT-S-like rows, AVX-512 path (d % 16 == 0)
    (1, 33, 3, 20, 0, 1, 3, 0.3),      # portable path (d = 20), no dense rows
    (3, 17, 2, 32, 2, 1, 1, 0.5),      # a mask shared over batch and heads, two dense rows
    (2, 50, 2, 128, 1, 2, 1, 0.1),     # head-shared mask, sparse enough to leave rows empty
])
def test_sparse_attention_kernel_matches_masked(b, n, h, d, nd, mask_b, mask_h, density):
  ks = jax.random.split(jax.random.key(n + d), 4)
  q, k, v = (jax.random.normal(kk, (b, n, h, d)) for kk in ks[:3])
  keep = jax.random.uniform(ks[3], (mask_b, mask_h, n - nd, n)) < density
  ref = _masked_reference(nd)
  f = functools.partial(cpu.sparse_row_attention, num_dense_rows=nd, scale=d ** -0.5, reference=ref)
  assert ATTENTION_TARGET in str(jax.make_jaxpr(f)(q, k, v, keep))
  out, want = jax.jit(f)(q, k, v, keep), ref(q, k, v, keep)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
  empty = ~np.asarray(jnp.broadcast_to(keep, (b, h, n - nd, n))).any(-1)   # [B, H, R]
  if density == 0.1:
    assert empty.any()
  np.testing.assert_array_equal(np.asarray(out)[:, nd:].transpose(0, 2, 1, 3)[empty], 0.0)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("b,n,h,d,nd,mask_b,mask_h,density", [
    (2, 17, 2, 16, 1, 2, 2, 0.4),      # AVX-512 path
    (1, 33, 3, 20, 0, 1, 3, 0.3),      # portable path (d = 20), no dense rows
    (2, 50, 2, 64, 2, 1, 1, 0.1),      # a mask shared over batch and heads, empty rows, two dense rows
])
def test_sparse_attention_kernel_gradient_matches_masked(b, n, h, d, nd, mask_b, mask_h, density):
  """The backward kernel (the gradient on CPU) against the masked reference's: 1e-5 (measured ~1e-6)."""
  ks = jax.random.split(jax.random.key(n + d), 5)
  q, k, v = (jax.random.normal(kk, (b, n, h, d)) for kk in ks[:3])
  keep = jax.random.uniform(ks[3], (mask_b, mask_h, n - nd, n)) < density
  ref = _masked_reference(nd)
  w = jax.random.normal(ks[4], q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, keep) * w)  # noqa: E731
  fast = functools.partial(cpu.sparse_row_attention, num_dense_rows=nd, scale=d ** -0.5, reference=ref)
  grad_fast = jax.jit(jax.value_and_grad(loss(fast), argnums=(0, 1, 2)))
  hlo = grad_fast.lower(q, k, v).compile().as_text()
  assert ATTENTION_TARGET + '"' in hlo and ATTENTION_TARGET + '_backward"' in hlo
  got = grad_fast(q, k, v)
  want = jax.value_and_grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_sparse_attention_without_kernel_is_the_reference(no_kernel):
  q = k = v = jax.random.normal(jax.random.key(0), (1, 9, 2, 16))
  keep = jnp.ones((1, 2, 8, 9), bool)
  ref = _masked_reference(1)
  f = functools.partial(cpu.sparse_row_attention, num_dense_rows=1, scale=0.25, reference=ref)
  assert ATTENTION_TARGET not in str(jax.make_jaxpr(f)(q, k, v, keep))
  np.testing.assert_array_equal(f(q, k, v, keep), ref(q, k, v, keep))


@pytest.mark.parametrize("keep_shape,match", [((1, 2, 9, 9), r"keep must be \[B\|1, H\|1, 8, 9\]"),
                                              ((3, 2, 8, 9), r"keep must be"),
                                              ((2, 8, 9), r"keep must be")])
def test_sparse_attention_bad_mask_shape(keep_shape, match):
  q = jnp.zeros((2, 9, 2, 16))
  with pytest.raises(ValueError, match=match):
    cpu.sparse_row_attention(q, q, q, jnp.ones(keep_shape, bool), num_dense_rows=1, scale=1.0,
                             reference=None)


# ------------------------------------------------------------------------------------------------
# The fused low-rank mask kernel (cpu.lowrank_topk_mask) against predictor math in XLA and float64.


def _lowrank_inputs(b, h, n, d, m, c, proj_b, basis_b, seed, slots=3):
  ks = jax.random.split(jax.random.key(seed), 8)
  qkv = jax.random.normal(ks[0], (b, n, slots, h, d))
  proj_n = jax.random.normal(ks[1], (proj_b, n, m)) * n ** -0.5
  w_k = jax.random.normal(ks[2], (d, c)) * d ** -0.5
  b_k = jax.random.normal(ks[3], (c,)) * 0.1
  w_q = jax.random.normal(ks[4], (d, c)) * d ** -0.5
  b_q = jax.random.normal(ks[5], (c,)) * 0.1
  proj_back_n = jax.random.normal(ks[6], (basis_b, n, m)) * 0.03      # about half above the threshold
  return qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n


def _lowrank_reference(coef_k, k, scale, dtype=jnp.float32, threshold=0.02, signed=False):
  """The approximation and its mask in XLA from the predictor's own functions, products in ``dtype``."""
  def approx(qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n):
    q, keys = qkv[:, :, 0], qkv[:, :, 1]
    w = predictor.query_weights(keys, proj_n, w_k, b_k, w_q, b_q, dtype)
    logits = predictor.coefficient_logits(q, w, scale, dtype)
    coef = predictor.keep_topk_values(jax.nn.softmax(logits, -1), coef_k, by=logits)
    basis = predictor.threshold_basis(jnp.swapaxes(proj_back_n, 1, 2), threshold, signed)
    return jnp.einsum("bhrm,bmn->bhrn", coef, jnp.broadcast_to(basis, (q.shape[0], *basis.shape[1:])))
  return approx, lambda *args: cpu.topk_keep_mask_xla(approx(*args), k)


def _is_topk(keep, approx, k, tol):
  """Every row keeps k entries, none of them below a dropped one by more than ``tol`` x the row max."""
  keep, approx = np.asarray(keep), np.asarray(approx)
  np.testing.assert_array_equal(keep.sum(-1), k)
  kept_min = np.where(keep, approx, np.inf).min(-1)
  dropped_max = np.where(keep, -np.inf, approx).max(-1)
  return bool((kept_min >= dropped_max - tol * approx.max(-1)).all())


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("b,h,n,d,m,c,proj_b,basis_b,coef_k,k,slots,signed", [
    (2, 3, 197, 64, 32, 32, 1, 1, 8, 50, 3, False),   # DeiT-S at keep 0.25
    (3, 2, 11, 6, 8, 3, 3, 3, 4, 3, 3, False),        # per-example P and W_up (token dropping); odd d, c
    (1, 2, 17, 16, 70, 9, 1, 1, 8, 17, 2, True),      # long coefficient rows, k = N; q, k only; signed
    (1, 1, 9, 5, 6, 2, 1, 1, 6, 1, 4, True),          # coef_k >= m: nothing cut; an extra slot
    # B x H >= 8 x XLA's threads (8 under the tests' flags): the single pass per (batch, head), with
    # per-example and shared bases.
    (8, 8, 33, 16, 8, 8, 8, 8, 4, 9, 3, False),
    (16, 4, 25, 8, 5, 4, 1, 1, 3, 6, 3, True),
])
def test_lowrank_topk_mask_matches_reference(b, h, n, d, m, c, proj_b, basis_b, coef_k, k, slots, signed):
  args = _lowrank_inputs(b, h, n, d, m, c, proj_b, basis_b, seed=m + n, slots=slots)
  scale = 0.4
  _, ref = _lowrank_reference(coef_k, k, scale, signed=signed)
  f = functools.partial(cpu.lowrank_topk_mask, first_row=1, scale=scale, coef_k=coef_k, k=k,
                        basis_threshold=0.02, signed_basis=signed, reference=ref)
  assert KERNEL_TARGETS["lowrank"] in str(jax.make_jaxpr(f)(*args))
  got = np.asarray(jax.jit(f)(*args))
  assert got.shape == (b, h, n - 1, n)
  # A top-k of the approximation computed in float64, up to float32 rounding (1e-5 of the row's scale).
  qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n = (np.asarray(x, np.float64) for x in args)
  q, keys = qkv[:, :, 0], qkv[:, :, 1]
  k_hat = (np.einsum("dc,bnhd,bnm->bhcm", w_k, keys, np.broadcast_to(proj_n, (b, n, m)))
           + b_k[:, None] * proj_n.sum(1)[:, None, None, :])
  s64 = (np.einsum("bnhd,dc,bhcm->bhnm", q[:, 1:], w_q, k_hat)
         + np.einsum("c,bhcm->bhm", b_q, k_hat)[:, :, None]) * scale
  coef = np.exp(s64 - s64.max(-1, keepdims=True))
  coef /= coef.sum(-1, keepdims=True)
  order = np.argsort(-s64, axis=-1, kind="stable")
  cut = np.zeros_like(coef, bool)
  np.put_along_axis(cut, order[..., :coef_k], True, axis=-1)
  up = np.broadcast_to(proj_back_n, (b, n, m)).transpose(0, 2, 1)
  basis = np.where(np.abs(up) > np.float32(0.02), up if signed else np.abs(up), 0.0)
  assert 0.2 < (basis != 0).mean() < 0.8                           # the threshold matters
  approx = np.einsum("bhrm,bmn->bhrn", np.where(cut, coef, 0.0), basis)
  assert _is_topk(got, approx, k, 1e-5)
  # Random inputs have no near-ties: the same sets as XLA's.
  np.testing.assert_array_equal(got, ref(*args))


@pytest.mark.usefixtures("needs_kernel")
def test_lowrank_topk_mask_bfloat16_products():
  """compute_dtype=bfloat16: the kernel rounds its intermediates where mixed_einsum does, so its mask is
  a top-k of XLA's bf16 approximation up to float32 summation order (stated tolerance: 1e-5 of the row
  scale, as in float32 -- far below bf16's 2^-8, which a missed rounding would exceed) and differs from
  the float32 mask."""
  qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n = _lowrank_inputs(2, 3, 197, 64, 32, 32, 1, 1, seed=5)
  bf = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)   # noqa: E731
  args = (bf(qkv), bf(proj_n), bf(w_k), b_k, bf(w_q), bf(b_q), proj_back_n)   # as the predictor passes them
  kw = dict(first_row=1, scale=0.4, coef_k=8, k=50, basis_threshold=0.02)
  approx16, ref16 = _lowrank_reference(8, 50, 0.4, jnp.bfloat16)
  got16 = jax.jit(functools.partial(cpu.lowrank_topk_mask, compute_dtype=jnp.bfloat16,
                                    reference=ref16, **kw))(*args)
  got32 = jax.jit(functools.partial(cpu.lowrank_topk_mask, reference=None, **kw))(*args)
  assert _is_topk(got16, approx16(*args), 50, 1e-5)
  assert (np.asarray(got16) != np.asarray(got32)).any()


@pytest.mark.parametrize("change,match", [
    (dict(proj_back_n=(1, 7, 6)), "need qkv"),          # W_up m 6 != 5
    (dict(w_q=(4, 2)), "need qkv"),                     # w_q with the bias row
    (dict(proj_back_n=(2, 7, 5)), "need qkv"),          # W_up batch 2 != 1
    (dict(qkv=(1, 7, 1, 2, 3)), "need qkv"),            # no key slot
    (dict(b_q=(3,)), "need qkv"),                       # b_q c 3 != 2
    (dict(first_row=8), "first_row=8 <= N"),
    (dict(k=8), "need 1 <= k=8 <= 7"),
    (dict(coef_k=0), "coef_k=0 >= 1"),
])
def test_lowrank_topk_mask_bad_arguments(change, match):
  shapes = dict(qkv=(1, 7, 3, 2, 3), proj_n=(1, 7, 5), w_k=(3, 2), b_k=(2,), w_q=(3, 2), b_q=(2,),
                proj_back_n=(1, 7, 5))
  kw = dict(first_row=1, scale=1.0, coef_k=2, k=2, basis_threshold=0.02)
  for key, value in change.items():
    (shapes if key in shapes else kw)[key] = value
  with pytest.raises(ValueError, match=match):
    cpu.lowrank_topk_mask(*map(jnp.zeros, shapes.values()), reference=None, **kw)


def test_batch_sharded_train_step_runs_the_kernels_per_shard():
  """On 8 devices with the batch sharded, the CPU kernels run inside shard_map: the compiled distill step
  gathers no activations (params are replicated, so an all-gather could only be around a kernel); without
  the context mesh XLA gathers the kernels' operands."""
  if not cpu.kernel_status()["available"]:
    pytest.skip(f"CPU kernels unavailable: {cpu.kernel_status()['reason']}")
  from configs import tiny_test
  from sparsifiner_jax import models, sharding
  from sparsifiner_jax.train import phases, step as step_lib
  c = tiny_test.get_config("keep_rate=0.25")
  c.phases.train.steps = c.phases.recon.steps = 0
  c.phases.distill.losses.kd = c.phases.distill.losses.tok = 0.0
  mesh = sharding.make_mesh([("data", 8), ("fsdp", 1)])
  (phase,) = phases.resolve_phases(c, 1)
  graphdef, params, rest = models.split_params(models.build_model(c))
  tx = phases.make_optimizer(phase, phases.trainable_of(params, phase))
  state = dict(step=jnp.int32(0), params=params, opt=tx.init(phases.trainable_of(params, phase)), ema=None)
  shard = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  fn = step_lib.make_train_step(graphdef, rest, None, phase, tx, c, mesh, shard, None)
  batch = dict(image=jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32),
               label=jax.ShapeDtypeStruct((16,), jnp.int32))
  with jax.set_mesh(mesh):
    hlo = fn.lower(state, None, batch).compile().as_text()
  for target in ("sparsifiner_lowrank_topk_mask", "sparsifiner_sparse_attention",
                 "sparsifiner_sparse_attention_backward"):
    assert target in hlo
  assert "all-gather" not in hlo
  assert "all-gather" in fn.lower(state, None, batch).compile().as_text()   # no context mesh: gathered
