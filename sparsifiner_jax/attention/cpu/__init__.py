"""Native CPU kernels (XLA FFI custom calls) for the sparse path, with pure-XLA fallbacks.

Three entry points, each choosing per platform at lowering time (``lax.platform_dependent``), so one jitted
function serves CPU and accelerators:

* ``topk_keep_mask(x, k)``: a boolean ``[..., n]`` mask of each row's ``k`` largest entries (ties: lowest
  index -- the set ``jax.lax.top_k`` returns). On CPU it runs ``topk_mask_cpu.cc``, a multi-threaded
  radix select (~30x faster than XLA:CPU's TopK plus a scatter on Sparsifiner's ``[B, H, N-1, N]``
  scores; BENCHMARKS.md); elsewhere the XLA reference (``lax.top_k`` and a scatter).
* ``lowrank_topk_mask(qkv, <predictor parameters>, ...)``: Sparsifiner's whole mask selection (the
  predictor's per-head query weights, basis threshold, coefficient logits, softmax, top coefficients,
  basis product, top-k) in one call on CPU, so none of the predictor's small XLA ops runs and neither
  the logits nor the ``[B, H, R, N]`` approximation is written; elsewhere the caller's XLA reference.
* ``sparse_row_attention(q, k, v, keep, ...)``: softmax attention over the kept entries only. On CPU it runs
  ``sparse_attention_cpu.cc`` (per row: the kept columns, their logits, exps and value products -- a
  quarter of dense attention's work at keep 0.25, where XLA's masked attention does all of it and more),
  and its gradient over the same entries; elsewhere the caller's XLA reference.

All fall back to XLA when the kernels cannot be built.

Building: the C++ sources (``*_cpu.cc``, ``cpu_common.h``) are compiled once per (sources, jaxlib, CPU)
into one library in a cache directory
(``$SPARSIFINER_JAX_CACHE``, default ``~/.cache/sparsifiner_jax``) with ``$CXX`` (default ``g++``), written
atomically, so concurrent processes are safe. ``SPARSIFINER_JAX_CPU_KERNELS=0`` disables the kernels (the
XLA path is then used everywhere); ``kernel_status()`` says which path is active and why.

Sharding: XLA cannot partition custom calls, so every kernel call runs inside ``jax.shard_map`` over the
batch axes (``sharding.per_batch_shard``) of the mesh set with ``jax.set_mesh`` (the trainer and the
evaluator set theirs), or else of the mesh its operands are sharded over (a plain ``jax.jit`` with
sharded inputs): each device computes its own examples, and no activation is gathered around the
kernels. With neither (or when the batch does not divide over the mesh) XLA gathers the operands and every
device computes the whole batch: correct, but replicated.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from sparsifiner_jax import sharding
from sparsifiner_jax.attention import backend

Array = jax.Array

_SOURCES = tuple(pathlib.Path(__file__).with_name(f)
                 for f in ("topk_mask_cpu.cc", "sparse_attention_cpu.cc"))
_HEADERS = (pathlib.Path(__file__).with_name("cpu_common.h"),)
_TOPK_TARGET = "sparsifiner_topk_mask"
_LOWRANK_TARGET = "sparsifiner_lowrank_topk_mask"
_ROW_ATTENTION_TARGET = "sparsifiner_sparse_attention"
_ROW_ATTENTION_BWD_TARGET = "sparsifiner_sparse_attention_backward"
_CXXFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC",
             "-w")
_status = {"available": False, "reason": "not loaded yet"}


def _cpu_signature() -> str:
  """Identifies the CPU the library is built for (``-march=native`` code is not portable)."""
  try:
    flags = next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
  except (OSError, StopIteration):
    flags = ""
  return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("SPARSIFINER_JAX_CACHE") or pathlib.Path.home() / ".cache" / "sparsifiner_jax"
  return pathlib.Path(root) / "kernels"


def _build() -> pathlib.Path:
  """Compiles the kernel library if it is not cached yet; returns its path. Raises on failure."""
  cxx = os.environ.get("CXX", "g++")
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH")
  include = jax.ffi.include_dir()
  texts = [src.read_text() for src in _SOURCES + _HEADERS]
  key = hashlib.sha256("\n".join([*texts, jax.__version__, cxx, " ".join(_CXXFLAGS),
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  lib = _cache_dir() / f"sparsifiner_cpu_{key}.so"
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
    out = pathlib.Path(tmp) / lib.name
    cmd = [cxx, *_CXXFLAGS, f"-I{include}", *map(str, _SOURCES), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    os.replace(out, lib)          # atomic: another process sees the whole library or none
  return lib


@functools.cache
def _load() -> bool:
  """Builds, loads and registers the CPU kernel once per process; False (with a warning) on failure."""
  if os.environ.get("SPARSIFINER_JAX_CPU_KERNELS", "1") == "0":
    _status.update(available=False, reason="disabled by SPARSIFINER_JAX_CPU_KERNELS=0")
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(_TOPK_TARGET, jax.ffi.pycapsule(lib.TopkMask), platform="cpu")
    jax.ffi.register_ffi_target(_LOWRANK_TARGET, jax.ffi.pycapsule(lib.LowRankTopkMask), platform="cpu")
    jax.ffi.register_ffi_target(_ROW_ATTENTION_TARGET, jax.ffi.pycapsule(lib.SparseAttention), platform="cpu")
    jax.ffi.register_ffi_target(_ROW_ATTENTION_BWD_TARGET, jax.ffi.pycapsule(lib.SparseAttentionBackward),
                                platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    _status.update(available=False, reason=str(e))
    logging.warning("sparsifiner_jax: CPU kernels unavailable, using XLA (slower): %s", e)
    return False
  _status.update(available=True, reason=f"loaded {lib._name}")
  return True


def kernel_status() -> dict:
  """``{"available": bool, "reason": str}`` for the CPU kernels (builds them if needed)."""
  _load()
  return dict(_status)


def topk_keep_mask_xla(x: Array, k: int) -> Array:
  """Reference: the entries ``lax.top_k`` picks, as a boolean ``[..., n]`` mask. top_k ranks by a total
  order (-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < NaN) and takes ties lowest index first, so it
  picks every entry above its k-th pick ``v`` and the entries equal to ``v`` up to that pick's index:
  elementwise comparisons of order keys, where a scatter costs a TPU several passes."""
  values, idx = jax.lax.top_k(x, k)
  key, v = _order_key(x), _order_key(values[..., -1:])
  position = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return (key > v) | ((key == v) & (position <= idx[..., -1:]))


def _order_key(x: Array) -> Array:
  """Signed integers ordered as top_k orders the floats ``x``: the bits, magnitude flipped if negative."""
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"int{8 * x.dtype.itemsize}"))
  return bits ^ ((bits >> (8 * x.dtype.itemsize - 1)) & jnp.iinfo(bits.dtype).max)


def _ffi_topk_keep_mask(x: Array, k: int) -> Array:
  def run(x):
    call = jax.ffi.ffi_call(_TOPK_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.bool_),
                            vmap_method="broadcast_all")
    return call(x, k=np.int64(k))

  # Rows are independent: any leading axis may be split over the batch shards.
  return sharding.per_batch_shard(run, (x,), (x.ndim > 1,))


def topk_keep_mask(x: Array, k: int) -> Array:
  """Boolean ``[..., n]``: True at each row's ``k`` largest entries of ``x`` (ties: lowest index).

  Not differentiable (a selection): the input is wrapped in ``stop_gradient``. Float32, bfloat16 and
  float16 inputs are compared in float32 (exact); float64 ones take the XLA path.
  """
  n = x.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"top-k budget k={k} must be in [1, {n}] (the row length)")
  if k == n:
    return jnp.ones(x.shape, bool)
  if x.dtype == jnp.float64:            # the kernel compares in float32; keep float64 exact
    return topk_keep_mask_xla(jax.lax.stop_gradient(x), k)
  x = jax.lax.stop_gradient(x.astype(jnp.float32))    # exact for bf16/f16 inputs
  if x.size == 0 or not _load():
    return topk_keep_mask_xla(x, k)
  return jax.lax.platform_dependent(x, cpu=functools.partial(_ffi_topk_keep_mask, k=k),
                                    default=functools.partial(topk_keep_mask_xla, k=k))


def _ffi_lowrank_topk_mask(qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n, *, first_row: int, scale: float,
                           coef_k: int, k: int, round_bf16: bool, basis_threshold: float,
                           signed_basis: bool) -> Array:
  def run(*args):
    b, n, _, h, _ = args[0].shape
    out = jax.ShapeDtypeStruct((b, h, n - first_row, n), jnp.bool_)
    call = jax.ffi.ffi_call(_LOWRANK_TARGET, out, vmap_method="sequential")
    return call(*args, first_row=np.int64(first_row), scale=np.float32(scale), coef_k=np.int64(coef_k),
                k=np.int64(k), round_bf16=bool(round_bf16), basis_threshold=np.float32(basis_threshold),
                signed_basis=bool(signed_basis))

  args = (qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n)
  batched = (True, proj_n.shape[0] > 1, False, False, False, False, proj_back_n.shape[0] > 1)
  return sharding.per_batch_shard(run, args, batched)


def lowrank_topk_mask(qkv: Array, proj_n: Array, w_k: Array, b_k: Array, w_q: Array, b_q: Array,
                      proj_back_n: Array, *, first_row: int, scale: float, coef_k: int, k: int,
                      basis_threshold: float, signed_basis: bool = False, compute_dtype=jnp.float32,
                      reference) -> Array:
  """Sparsifiner's mask from its low-rank attention approximation, without writing any of the
  predictor's intermediates, its coefficient logits or the approximation.

  With ``q = qkv[:, :, 0]`` and ``keys = qkv[:, :, 1]``: per (example, head) the query weights
  ``w = [W_q; b_q] K̂`` (``[d + 1, m]``, the offset as the last row) with ``K̂ = W_kᵀ (kᵀ P) + b_k (1ᵀ P)``;
  per example the basis ``T(W_up)ᵀ`` ``[m, N]`` (entries with ``|x| > basis_threshold`` kept as ``|x|``,
  or ``x`` with ``signed_basis``; the rest 0); per query row ``logits = (q[r] . w[:d] + w[d]) * scale``
  over the ``m`` basis rows (``predictor.coefficient_logits``), ``coef = softmax(logits)`` with all
  but its ``coef_k`` largest entries zeroed (ranked by the logits, ties: lowest index; not renormalised),
  ``approx = coef @ basis``, then the top-``k`` mask of ``approx`` (``topk_keep_mask``). On CPU one kernel
  call does all of it, reading q and the keys in place (the attention's qkv projection is passed whole,
  so XLA copies no slices of it); elsewhere, or without the kernels,
  ``reference(qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n)`` runs. The two agree up to float rounding
  (the kernel sums products in its own order; near-ties may resolve differently).

  Args:
    qkv: ``[B, N, S, H, d]``, ``S >= 2``: queries in slot 0, keys in slot 1 (the fused qkv projection's
      layout; other slots are not read). Rows before ``first_row`` (the CLS row) are not predicted.
    proj_n: ``[B|1, N, m]`` the keys' token down-projection P (per example under token dropping).
    w_k, b_k: ``[d, c]``, ``[c]`` the key projection.
    w_q, b_q: ``[d, c]``, ``[c]`` the query projection.
    proj_back_n: ``[B|1, N, m]`` the up-projection W_up, untransposed and unthresholded.
    first_row, scale: the first predicted row; the logits' scale.
    coef_k, k: coefficients kept per row, keys kept per row (``1 <= k <= N``).
    basis_threshold, signed_basis: the basis threshold (``predictor.threshold_basis``).
    compute_dtype: the products' input dtype (``precision.mixed_einsum``): float32, or bfloat16 (the
      kernel then rounds ``kᵀP``, ``K̂`` and ``w[:d]`` to bf16 before the product that takes them; the
      caller passes the other operands as the products take them). Other dtypes take the reference.
    reference: ``(qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n) -> keep [B, H, N - first_row, N] bool``
      in XLA (float32 inputs).

  Returns:
    ``keep [B, H, N - first_row, N] bool`` (no gradient: a selection).
  """
  args = (qkv, proj_n, w_k, b_k, w_q, b_q, proj_back_n)
  ok = all(x.ndim == r for x, r in zip(args, (5, 3, 2, 1, 2, 1, 3)))
  if ok:
    (b, n, slots, _, d), (m, c) = qkv.shape, (proj_n.shape[-1], w_k.shape[1])
    ok = (slots >= 2 and proj_n.shape[0] in (1, b) and proj_n.shape[1] == n and w_k.shape == (d, c)
          and b_k.shape == (c,) and w_q.shape == (d, c) and b_q.shape == (c,)
          and proj_back_n.shape[0] in (1, b) and proj_back_n.shape[1:] == (n, m) and 0 <= first_row <= n)
  if not ok:
    raise ValueError(
        "lowrank_topk_mask: need qkv [B, N, S >= 2, H, d], proj_n [B|1, N, m], w_k [d, c], b_k [c], "
        f"w_q [d, c], b_q [c], proj_back_n [B|1, N, m] and 0 <= first_row={first_row} <= N; got "
        + ", ".join(str(x.shape) for x in args))
  if not 1 <= k <= n or coef_k < 1:
    raise ValueError(f"lowrank_topk_mask: need 1 <= k={k} <= {n} and coef_k={coef_k} >= 1")
  args = [jax.lax.stop_gradient(x.astype(jnp.float32)) for x in args]
  compute_dtype = jnp.dtype(compute_dtype)
  if (n == first_row or qkv.size == 0 or compute_dtype not in (jnp.float32, jnp.bfloat16)
      or not _load()):
    return reference(*args)
  return jax.lax.platform_dependent(
      *args, cpu=functools.partial(_ffi_lowrank_topk_mask, first_row=first_row, scale=float(scale),
                                   coef_k=coef_k, k=k, round_bf16=compute_dtype == jnp.bfloat16,
                                   basis_threshold=float(basis_threshold), signed_basis=bool(signed_basis)),
      default=reference)


def _packed_qkv(q, k, v) -> Array:
  """``[B, N, 3, H, d]`` float32: one operand in the qkv projection's own layout (XLA folds the stack of
  its slices back into it, so nothing is copied)."""
  return jnp.stack([q, k, v], axis=2).astype(jnp.float32)


def _ffi_sparse_row_attention(q, k, v, keep, *, num_dense_rows: int, scale: float) -> Array:
  def run(qkv, keep):
    call = jax.ffi.ffi_call(_ROW_ATTENTION_TARGET, jax.ShapeDtypeStruct(qkv[:, :, 0].shape, jnp.float32),
                            vmap_method="sequential")
    return call(qkv, keep, num_dense_rows=np.int64(num_dense_rows), scale=np.float32(scale))

  return sharding.per_batch_shard(run, (_packed_qkv(q, k, v), keep), (True, keep.shape[0] > 1))


def _ffi_sparse_row_attention_bwd(q, k, v, keep, out, ct, *, num_dense_rows: int, scale: float):
  def run(qkv, keep, out, ct):
    grad = jax.ShapeDtypeStruct(out.shape, jnp.float32)
    call = jax.ffi.ffi_call(_ROW_ATTENTION_BWD_TARGET, (grad, grad, grad), vmap_method="sequential")
    return call(qkv, keep, out, ct, num_dense_rows=np.int64(num_dense_rows), scale=np.float32(scale))

  args = (_packed_qkv(q, k, v), keep, out, ct.astype(jnp.float32))
  dq, dk, dv = sharding.per_batch_shard(run, args, (True, keep.shape[0] > 1, True, True))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _attention_forward(q, k, v, keep, num_dense_rows, scale, reference):
  return jax.lax.platform_dependent(
      q, k, v, keep,
      cpu=functools.partial(_ffi_sparse_row_attention, num_dense_rows=num_dense_rows, scale=scale),
      default=reference)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sparse_row_attention(q, k, v, keep, num_dense_rows, scale, reference):
  return _attention_forward(q, k, v, keep, num_dense_rows, scale, reference)


def _sparse_row_attention_fwd(q, k, v, keep, num_dense_rows, scale, reference):
  if backend.target().platform == "cpu":
    # The kernels both ways: the forward keeps q, k, v, keep and its output; the backward recomputes
    # the kept probabilities (no [N, N] residuals).
    out = _attention_forward(q, k, v, keep, num_dense_rows, scale, reference)
    return out, (None, (q, k, v, keep, out))
  # Elsewhere the reference runs with its own residuals (no recomputation in the backward pass).
  out, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, keep), q, k, v)
  return out, (vjp, None)


def _sparse_row_attention_bwd(num_dense_rows, scale, reference, residuals, ct):
  vjp, saved = residuals
  if vjp is not None:
    return (*vjp(ct), None)
  q, k, v, keep, out = saved

  def reference_vjp(q, k, v, keep, out, ct):
    del out
    return jax.vjp(lambda q, k, v: reference(q, k, v, keep), q, k, v)[1](ct)

  grads = jax.lax.platform_dependent(
      q, k, v, keep, out, ct,
      cpu=functools.partial(_ffi_sparse_row_attention_bwd, num_dense_rows=num_dense_rows, scale=scale),
      default=reference_vjp)
  return (*grads, None)


_sparse_row_attention.defvjp(_sparse_row_attention_fwd, _sparse_row_attention_bwd)


def sparse_row_attention(q: Array, k: Array, v: Array, keep: Array, *, num_dense_rows: int, scale: float,
                     reference) -> Array:
  """Softmax attention over the kept entries only; ``[B, N, H, d]`` float32.

  Args:
    q, k, v: ``[B, N, H, d]`` (float32 or lower; the kernel computes in float32).
    keep: ``[B|1, H|1, N - num_dense_rows, N] bool``: the keys each sparse query row keeps; the first
      ``num_dense_rows`` rows keep every key. Rows that keep nothing give 0.
    scale: the logit scale (``d ** -0.5``).
    reference: ``(q, k, v, keep) -> out``, the same computation in XLA. It runs, values and gradients,
      on other backends and when the kernels are unavailable. On CPU the gradient is the backward
      kernel's (when tracing for CPU: ``backend.target()``; otherwise the reference's).
  """
  if q.shape != k.shape or q.shape != v.shape or q.ndim != 4:
    raise ValueError(f"sparse_row_attention: q, k, v must share one [B, N, H, d] shape; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  b, n, h, _ = q.shape
  want = (n - num_dense_rows, n)
  if (keep.ndim != 4 or keep.shape[2:] != want or keep.shape[0] not in (1, b)
      or keep.shape[1] not in (1, h)):
    raise ValueError(f"sparse_row_attention: keep must be [B|1, H|1, {want[0]}, {want[1]}]; got {keep.shape}")
  if q.size == 0 or not _load():
    return reference(q, k, v, keep)
  return _sparse_row_attention(q, k, v, keep.astype(bool), num_dense_rows, float(scale), reference)
