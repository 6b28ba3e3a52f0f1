"""Sparsifiner's connectivity (mask) predictor, as the official code computes it (docs/method.md).

Parameter names follow the official ``MaskPredictor`` so its checkpoints load by name:
``proj_c_q``, ``proj_c_k`` (Linear d -> c, shared across heads), ``proj_n`` and ``proj_back_n``
(``[N, m]``: token down-projection of keys and the attention basis W_up, used transposed).

Sizing: ``N`` is the token count of the model's configured image size (``(img/patch)^2 + 1``),
``c = d // reduce_c`` and ``m = N // reduce_n``. The official code asserts N = 197; here any N works, but a
predictor built for N tokens only takes N tokens. To move to another resolution, resample the patch rows of
``proj_n``/``proj_back_n`` over the 2-D patch grid (``io.resample.resize_token_params``), keeping m.

Two modes:

* reconstruction (``recon=True``; phase 1 training): signed dense basis ``W_upᵀ``, dense coefficients;
  no mask is produced (the attention stays dense).
* sparse (everything else): basis ``T(|W_upᵀ|)`` keeping entries ``> basis_threshold`` (the official
  code's abs; ``signed_basis=True`` keeps the sign instead), coefficients cut to their
  top-``coef_topk`` softmax values (not renormalised; ranked by the logits, the same order without the
  softmax's rounding), then top-k keys per query row.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from sparsifiner_jax import precision
from sparsifiner_jax.attention import blocks, cpu, selection
from sparsifiner_jax.attention import mask as mask_lib
from sparsifiner_jax.attention.pallas import block_predictor

Array = jax.Array


class MaskPredictor(nnx.Module):
  """Low-rank approximation of one layer's attention, used to rank keys per query row.

  Args:
    num_heads, head_dim: H and d of the attention it predicts for.
    num_tokens: N, including the CLS token.
    keep_rate: rho; the budget is k = ceil(rho * N) keys per patch query row.
    reduce_n, reduce_c: rn and rc (m = N // rn, c = d // rc).
    block: b > 0 selects blocks (block mode, ``attention.blocks``): the factors pooled per block of b
      tokens score (query block, key block) pairs, and each query block keeps ``ceil(rho * N / b)`` key
      blocks; 0 selects keys per row, as the official code does.
  """

  def __init__(self, num_heads: int, head_dim: int, num_tokens: int, keep_rate: float, *,
               reduce_n: int = 6, reduce_c: int = 2, basis_threshold: float = 0.02,
               coef_topk: int = 8, signed_basis: bool = False, block: int = 0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.block = block
    self.num_tokens = num_tokens
    self.keep_rate = keep_rate
    self.budget = mask_lib.budget(keep_rate, num_tokens)
    self.basis_threshold = basis_threshold
    self.signed_basis = signed_basis
    reduced_c = head_dim // reduce_c
    reduced_n = num_tokens // reduce_n
    if reduced_c < 1 or reduced_n < 1:
      raise ValueError(
          f"predictor sizes must be >= 1: head_dim {head_dim} // reduce_c {reduce_c} = {reduced_c}, "
          f"tokens {num_tokens} // reduce_n {reduce_n} = {reduced_n}; lower the reduce factors")
    self.coef_topk = min(coef_topk, reduced_n)
    self.dtype = jnp.dtype(dtype)
    linear = dict(kernel_init=nnx.initializers.truncated_normal(0.02),
                  bias_init=nnx.initializers.zeros, **precision.linear_kwargs(self.dtype), rngs=rngs)
    self.proj_c_q = nnx.Linear(head_dim, reduced_c, **linear)
    self.proj_c_k = nnx.Linear(head_dim, reduced_c, **linear)
    init = nnx.initializers.normal(0.02)
    self.proj_n = nnx.Param(init(rngs.params(), (num_tokens, reduced_n), jnp.float32))
    self.proj_back_n = nnx.Param(init(rngs.params(), (num_tokens, reduced_n), jnp.float32))
    # Block mode's parameter-only kernel operands, where the caller computed them once for weights that
    # stay fixed (``kernel_constants``; evaluation: ``models.inference_constants``); None: every call.
    self.prepared = nnx.data(None)

  def basis(self, recon: bool) -> Array:
    """The up-projection basis ``[m, N]`` for the given mode."""
    basis = self.proj_back_n[...].T
    return basis if recon else threshold_basis(basis, self.basis_threshold, self.signed_basis)

  def factors(self, k: Array, *, token_index: Array | None = None, key_keep: Array | None = None
              ) -> tuple[Array, Array, Array, Array, Array, Array]:
    """The operands of ``query_weights(...)`` (module level), ``(keys, proj_n, w_k, b_k, w_q, b_q)``, for
    raw k ``[B, N, H, d]``.

    ``proj_n`` is ``[1|B, N, m]`` (``token_rows``); the products' operands are rounded to the compute
    dtype, as the products take them (the same for ``cpu.lowrank_topk_mask``). Token sparsity:
    ``token_index [B, N]`` gives the original positions of a shortened sequence (the token-sized
    parameters are gathered at them); ``key_keep [B, N] bool`` marks the live tokens of a full-length one
    (pruned keys contribute nothing to K̂, as in the official code).
    """
    n = k.shape[1]
    if token_index is None and n != self.num_tokens:
      raise ValueError(f"predictor was built for {self.num_tokens} tokens but got {n}; resize its "
                       "token parameters (io.resample.resize_token_params) for a new resolution")
    proj_n = token_rows(self.proj_n[...], token_index)                 # [1|B, N, m]
    if key_keep is not None:                                           # pruned keys contribute nothing
      k = k * key_keep[:, :, None, None].astype(k.dtype)
      proj_n = proj_n * key_keep[:, :, None].astype(proj_n.dtype)
    return (k, self._rounded(proj_n), *self._weights())

  def _rounded(self, x: Array) -> Array:
    return x.astype(self.dtype).astype(jnp.float32)

  def _weights(self) -> tuple[Array, Array, Array, Array]:
    """``(w_k, b_k, w_q, b_q)`` as ``factors`` gives them."""
    return (self._rounded(self.proj_c_k.kernel[...]), self.proj_c_k.bias[...],
            self._rounded(self.proj_c_q.kernel[...]), self._rounded(self.proj_c_q.bias[...]))

  def kernel_constants(self) -> block_predictor.Constants:
    """Block mode's parameter-only kernel operands (``block_predictor.constants``, the pooled basis of the
    sparse mode included) for the full sequence: what ``block_mask`` takes from ``prepared`` when set."""
    pooled = blocks.pool(self.basis_rows(False), self.block, axis=-1, mean=False)
    return block_predictor.constants(self._rounded(self.proj_n[...][None]), *self._weights(),
                                     heads=self.num_heads, dtype=self.dtype, pooled=pooled)

  @property
  def logit_scale(self) -> float:
    return self.num_heads ** -0.5

  def basis_rows(self, recon: bool, token_index: Array | None = None) -> Array:
    """The basis for the tokens present: ``[m, N]``, or ``[B, m, N]`` at ``token_index [B, N]``."""
    basis = self.basis(recon)                                         # [m, N0]
    return basis if token_index is None else jnp.swapaxes(basis.T[token_index], 1, 2)

  def combine(self, logits: Array, basis: Array, recon: bool) -> Array:
    """Â ``[B, H, N-1, N]`` from coefficient logits ``[B, H, N-1, m]`` and ``basis_rows``."""
    coef = jax.nn.softmax(logits, axis=-1)
    if not recon:   # ranked by the logits: the softmax's order exactly, where its rounding could tie
      coef = keep_topk_values(coef, self.coef_topk, by=logits)
    spec = "bhnm,mk->bhnk" if basis.ndim == 2 else "bhnm,bmk->bhnk"
    return precision.mixed_einsum(spec, coef, basis, self.dtype)

  def __call__(self, qkv: Array, *, recon: bool = False, token_index: Array | None = None,
               key_keep: Array | None = None, kept_patches: int | None = None
               ) -> tuple[mask_lib.AttentionMask | None, Array]:
    """Returns ``(mask, approx_attn)`` for the layer's projections ``qkv [B, N, S >= 2, H, d]`` (q in
    slot 0, k in slot 1: the attention's fused qkv layout). The mask is None in reconstruction mode
    (dense attention).

    With token sparsity the budget is capped at the ``kept_patches`` live patch tokens (the official
    code's cap) and pruned keys (``key_keep`` False) are never selected. ``selection.predictor_mask``
    chooses how the mask is computed: without ``key_keep``, one fused pass that writes only the mask
    (``approx_attn`` is then only computed if the caller uses it; TPU and GPU: the Pallas kernel, bit-packed
    rows; CPU: the C++ kernel); else, or without kernels, the top-k of ``approx_attn`` in XLA.
    """
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    factors = self.factors(k, token_index=token_index, key_keep=key_keep)
    if self.block:
      return self.block_mask(qkv, factors, recon, token_index, key_keep)
    weights = query_weights(*factors, self.dtype)                      # [B, H, d + 1, m]
    logits = coefficient_logits(q, weights, self.logit_scale, self.dtype)
    basis = self.basis_rows(recon, token_index)
    approx = self.combine(logits, basis, recon)
    if recon:
      return None, approx
    budget = self.budget if kept_patches is None else min(self.budget, kept_patches)
    mask = selection.predictor_mask(
        qkv, factors, weights, basis, token_rows(self.proj_back_n[...], token_index), approx, k=budget,
        scale=self.logit_scale, coef_k=self.coef_topk, basis_threshold=self.basis_threshold,
        signed_basis=self.signed_basis, compute_dtype=self.dtype, key_keep=key_keep)
    return mask, approx

  def block_mask(self, qkv: Array, factors: tuple, recon: bool, token_index: Array | None,
                 key_keep: Array | None) -> tuple[mask_lib.AttentionMask | None, Array]:
    """Block mode: ``(mask, block_scores [B, H, nb, nb])`` from ``qkv [B, N, S, H, d]`` and ``factors``.
    The scores are the predictor's approximation pooled per block: coefficient logits of each query
    block's mean q (the logits are linear in q, so this is their mean), combined with the basis summed
    over each key block's tokens (pruned keys, ``key_keep`` False, contribute nothing). The logits are
    ``q_r K̂`` with ``pallas.block_predictor``'s projections, in that order (projecting the ``nb`` pooled
    queries to ``c`` dims is cheaper than ``query_weights``' reassociation). In reconstruction mode the
    scores approximate the teacher's ``blocks.attention_mass`` and no mask is made. Cost
    O(B H N d (m + N/b)) for the products over tokens, O(B H (N/b)^2 m) after; no ``N x N`` array."""
    n = qkv.shape[1]
    keys, proj_n, *params = factors
    kernel = token_index is None and key_keep is None and block_predictor.applies(qkv, proj_n)
    prepared = self.prepared if kernel and not recon else None    # evaluation: computed ahead
    if prepared is not None:
      q_r, k_hat = block_predictor.prepared_projections(qkv, prepared, block=self.block)
    elif kernel:   # TPU: one kernel reads q and k in place (XLA products would copy qkv transposed first)
      q_r, k_hat = block_predictor.projections(qkv, proj_n, *params, block=self.block, dtype=self.dtype)
    else:
      q_r, k_hat = block_predictor.reference(qkv[:, :, 0], keys, proj_n, *params, block=self.block,
                                             dtype=self.dtype)
    logits = precision.mixed_einsum("bnhc,bmhc->bhnm", q_r, k_hat, self.dtype) * self.logit_scale
    if prepared is None:
      basis = self.basis_rows(recon, token_index)                           # [m, N] or [B, m, N]
      if key_keep is not None:
        basis = basis * key_keep[:, None, :].astype(basis.dtype)
      pooled = blocks.pool(basis, self.block, axis=-1, mean=False)
    else:   # the product rounds the pooled basis to the compute dtype, as the prepared one already is
      pooled = prepared.basis.T
    scores = self.combine(logits, pooled, recon)
    if recon:
      return None, scores
    keep = blocks.budget(self.keep_rate, n, self.block)
    if kernel and block_predictor.table_applies(qkv, proj_n, self.block):   # the same table in one pass
      selection = block_predictor.Selection(keep, self.coef_topk, self.logit_scale)
      consts = prepared if prepared is not None else block_predictor.constants(
          proj_n, *params, heads=self.num_heads, dtype=self.dtype, pooled=pooled)
      table = block_predictor.table(qkv, consts, block=self.block, selection=selection)
    else:
      table = blocks.select(scores, keep)
    return blocks.block_mask(table, n, self.block, num_dense_rows=1), scores


def threshold_basis(basis: Array, threshold: float, signed: bool = False) -> Array:
  """The sparse-mode basis ``T(|W_upᵀ|)``: entries with ``|x| > threshold`` kept (``|x|``, or ``x`` when
  ``signed``), the rest 0; any shape. ``cpu.lowrank_topk_mask`` applies the same rule."""
  magnitude = jnp.abs(basis)
  return jnp.where(magnitude > threshold, basis if signed else magnitude, 0.0)


def coefficient_logits(q: Array, weights: Array, scale: float, dtype) -> Array:
  """Logits of the basis coefficients ``[B, H, N - 1, m]`` float32 from raw q ``[B, N, H, d]``
  and ``weights = query_weights(...)`` ``[B, H, d + 1, m]``: ``(q . weights[:d] + weights[d]) * scale``,
  the product in ``dtype``; the CLS row (row 0) is not predicted."""
  d = q.shape[-1]
  scores = precision.mixed_einsum("bnhd,bhdm->bhnm", q[:, 1:], weights[:, :, :d], dtype)
  return (scores + weights[:, :, d:]) * scale


def token_rows(param: Array, token_index: Array | None) -> Array:
  """A token-sized parameter ``[N0, m]`` for the tokens present: ``[1, N0, m]``, or ``[B, N, m]`` gathered
  at ``token_index [B, N]``."""
  return param[None] if token_index is None else param[token_index]


def query_weights(keys: Array, proj_n: Array, w_k: Array, b_k: Array, w_q: Array, b_q: Array, dtype
                  ) -> Array:
  """``[W_q; b_q] K̂``, ``[B, H, d + 1, m]`` float32 (the offset ``b_q K̂`` as the last row), with
  ``K̂ = W_kᵀ (kᵀ P) + b_k (1ᵀ P)`` from keys ``[B, N, H, d]``, ``P = proj_n [1|B, N, m]``,
  ``w_k, w_q [d, c]`` and ``b_k, b_q [c]``; products in ``dtype`` (``precision.mixed_einsum``).

  The coefficients' logits are ``q_r K̂`` with ``q_r = q W_q + b_q``, ``K̂ = (k W_k + b_k)ᵀ P``. Computed
  reassociated, ``q (W_q K̂) + b_q K̂``: the same products without projecting every token to c dims
  first (two thin matmuls and their copies). ``cpu.lowrank_topk_mask`` computes the same on CPU.
  """
  mm = lambda spec, a, b: precision.mixed_einsum(spec, a, b, dtype)   # noqa: E731
  spec = "bnhd,nm->bhdm" if proj_n.shape[0] == 1 else "bnhd,bnm->bhdm"
  k_proj = mm(spec, keys, proj_n[0] if proj_n.shape[0] == 1 else proj_n)     # kᵀ P: [B, H, d, m]
  # (This operand order: XLA:CPU lacks a bf16 x bf16 -> f32 DotThunk for the other.)
  k_hat = mm("dc,bhdm->bhcm", w_k, k_proj)                             # [B, H, c, m]
  k_hat = k_hat + b_k[:, None] * jnp.sum(proj_n, axis=1)[:, None, None, :]
  return mm("dc,bhcm->bhdm", jnp.concatenate([w_q, b_q[None]]), k_hat)   # [B, H, d + 1, m]


def keep_topk_values(x: Array, k: int, by: Array | None = None) -> Array:
  """Zeroes all but the ``k`` largest entries of each row of ``x`` (values kept, not renormalised;
  ties: lowest index), ranked by ``by`` (same shape; default ``x``). Gradients flow to the kept entries."""
  if k >= x.shape[-1]:
    return x
  return jnp.where(cpu.topk_keep_mask(x if by is None else by, k), x, jnp.zeros_like(x))
