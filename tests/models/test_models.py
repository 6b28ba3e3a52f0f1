"""Model construction, parameter counts, mask semantics, modes, sharding, input validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import attention as attn_lib
from sparsifiner_jax import models, precision, sharding
from sparsifiner_jax.attention import backend
from sparsifiner_jax.io import state_dict


def count_params(model, exclude=None):
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  return sum(int(np.prod(v.shape)) for p, v in leaves
             if exclude is None or exclude not in jax.tree_util.keystr(p))


def abstract(name, **kw):
  return nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kw))


@pytest.mark.parametrize("name,expected", [
    ("deit_tiny_patch16_224", 5_717_416),
    ("deit_small_patch16_224", 22_050_664),
    ("deit_base_patch16_224", 86_567_656),
])
def test_dense_param_counts_match_timm(name, expected):
  assert count_params(abstract(name)) == expected


def test_predictor_param_count_deit_s():
  model = abstract("deit_small_patch16_224", keep_rate=0.25)
  total = count_params(model)
  assert total - count_params(model, exclude="mask_predictor") == 12 * 16_768 == 201_216
  assert total == 22_050_664 + 201_216


def test_unknown_name_lists_known():
  with pytest.raises(ValueError, match="known models: .*deit_small_patch16_224"):
    models.create("deit_huge", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw,msg", [
    (dict(keep_rate=0.0), r"keep_rate=0.0 must be in \(0, 1\]"),
    (dict(keep_rate=1.5), r"keep_rate=1.5 must be in \(0, 1\]"),
    (dict(keep_rate=[0.5, 0.5, 0.5]), "give one float or one per layer"),
    (dict(patch_size=5), "patch_size=5 must divide img_size=16"),
    (dict(executor="flash"),
     r"unknown attention executor 'flash'; allowed: "
     r"\['auto', 'dense', 'fused', 'gather', 'masked', 'sigmoid'\]"),
    (dict(executor="sparse"), r"unknown attention executor 'sparse'; allowed: \['auto', 'dense', 'fused', "
                              r"'gather'"),   # the gather executor's former name
    (dict(foo=1), r"unknown model option\(s\) \['foo'\]"),
])
def test_bad_config_raises_clear_error(kw, msg):
  with pytest.raises(ValueError, match=msg):
    models.create("vit_test", rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 32, 32, 3), (2, 16, 16, 1)])
def test_bad_image_shape_raises(shape):
  model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images must be \[batch, 16, 16, 3\]"):
    model(jnp.zeros(shape))


def test_any_image_and_patch_size():
  model = models.create("vit_test", img_size=24, patch_size=3, keep_rate=0.3, rngs=nnx.Rngs(0))
  logits, aux = model(jnp.ones((2, 24, 24, 3)))
  n = 8 * 8 + 1
  assert logits.shape == (2, 10)
  assert aux["masks"][0].to_dense().shape == (2, 2, n, n)
  assert aux["approx_attn"][1].shape == (2, 2, n - 1, n)
  assert aux["tokens"].shape == (2, n - 1, 32)


@pytest.fixture(scope="module")
def deit_s_masks():
  """Masks of a randomly initialised Sparsifiner DeiT-S at keep 0.25 on one image."""
  model = models.create("deit_small_patch16_224", keep_rate=0.25, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 224, 224, 3))
  _, aux = nnx.jit(lambda m, x: m(x))(model, x)
  return aux


def test_deit_s_mask_density_exact(deit_s_masks):
  mask = deit_s_masks["masks"][0]
  dense = np.asarray(mask.to_dense())
  assert dense.shape == (1, 6, 197, 197)
  assert mask.keys_per_row == math.ceil(0.25 * 197) == 50
  assert dense[:, :, 0, :].all()                                    # CLS query row all ones
  np.testing.assert_array_equal(dense[:, :, 1:, :].sum(-1), 50)     # exactly k per patch row
  per_head = dense.sum(axis=(-1, -2)) / 197 ** 2
  np.testing.assert_array_equal(per_head, 9_997 / 38_809)
  assert float(mask.density()) == pytest.approx(9_997 / 38_809, abs=1e-7)


def test_mask_keeps_topk_of_approx_attention(deit_s_masks):
  approx = np.asarray(deit_s_masks["approx_attn"][3])
  dense = np.asarray(deit_s_masks["masks"][3].to_dense())[:, :, 1:]
  kept_min = np.where(dense, approx, np.inf).min(-1)
  dropped_max = np.where(dense, -np.inf, approx).max(-1)
  assert (kept_min >= dropped_max).all()


def _tiny_pair(keep_rate, executor="masked", seed=0):
  dense = models.create("vit_test", rngs=nnx.Rngs(seed))
  sparse = models.create("vit_test", keep_rate=keep_rate, executor=executor, rngs=nnx.Rngs(seed))
  # Same backbone weights: copy the dense model's params into the sparse one.
  state_dict.load_timm_state_dict(sparse, state_dict.timm_state_dict(dense))
  return dense, sparse


def test_keep_rate_one_reproduces_dense_logits():
  dense, sparse = _tiny_pair(1.0)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  ld, _ = dense(x)
  ls, aux = sparse(x)
  assert bool(aux["masks"][0].to_dense().all())
  np.testing.assert_allclose(ls, ld, atol=1e-5, rtol=0)


def test_deit_s_keep_rate_one_reproduces_dense():
  dense = models.create("deit_small_patch16_224", rngs=nnx.Rngs(0))
  sparse = models.create("deit_small_patch16_224", keep_rate=1.0, rngs=nnx.Rngs(0))
  state_dict.load_timm_state_dict(sparse, state_dict.timm_state_dict(dense))
  x = jax.random.normal(jax.random.key(0), (1, 224, 224, 3))
  np.testing.assert_allclose(sparse(x)[0], dense(x)[0], atol=1e-5, rtol=0)


def test_recon_mode_is_dense_attention_and_signed_basis():
  dense, sparse = _tiny_pair(0.25)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  ls, aux = sparse(x, recon=True)
  np.testing.assert_allclose(ls, dense(x)[0], atol=1e-5, rtol=0)
  assert all(m is None for m in aux["masks"])
  pred = sparse.blocks[0].attn.mask_predictor
  assert (np.asarray(pred.basis(recon=True)) < 0).any()           # signed in recon mode
  sb = np.asarray(pred.basis(recon=False))
  assert (sb >= 0).all() and ((sb == 0) | (sb > 0.02)).all()       # |W_up| thresholded at 0.02
  # Sparse mode differs from dense at keep 0.25.
  assert np.abs(np.asarray(sparse(x)[0] - dense(x)[0])).max() > 1e-4


def test_sparse_mode_coefficients_top_k_not_renormalised():
  from sparsifiner_jax.models.predictor import keep_topk_values
  x = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 5, 32)), -1)
  y = np.asarray(keep_topk_values(x, 8))
  assert ((y != 0).sum(-1) == 8).all()
  np.testing.assert_array_equal(np.sort(y, -1)[..., -8:], np.sort(np.asarray(x), -1)[..., -8:])
  assert (y.sum(-1) < 1).all()


def test_predictor_gradients_only_through_reconstruction():
  _, model = _tiny_pair(0.25)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  labels = jnp.array([1, 2])
  is_pred = nnx.All(nnx.Param, nnx.PathContains("mask_predictor"))

  def cls_loss(m):
    logits, _ = m(x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  def recon_loss(m):
    _, aux = m(x, recon=True, with_attention=True)
    return sum(jnp.sum((a - t[:, :, 1:]) ** 2) for a, t in zip(aux["approx_attn"], aux["attn"]))

  g_cls = nnx.grad(cls_loss, argnums=nnx.DiffState(0, is_pred))(model)
  g_rec = nnx.grad(recon_loss, argnums=nnx.DiffState(0, is_pred))(model)
  cls_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(g_cls))
  rec_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(g_rec))
  assert cls_norm == 0.0
  assert rec_norm > 0.0
  # Every predictor tensor gets gradient through the reconstruction target.
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(g_rec))


@pytest.mark.parametrize("executor", ["auto", "gather"])
def test_executors_agree_in_model(executor):
  _, ref = _tiny_pair(0.3, "masked")
  _, other = _tiny_pair(0.3, executor)
  x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  np.testing.assert_allclose(other(x)[0], ref(x)[0], atol=1e-5, rtol=0)


def test_per_layer_keep_rates():
  model = models.create("vit_test", keep_rate=[0.2, 0.9], rngs=nnx.Rngs(0))
  _, aux = model(jnp.ones((1, 16, 16, 3)))
  assert [m.keys_per_row for m in aux["masks"]] == [math.ceil(0.2 * 17), math.ceil(0.9 * 17)]


def test_sharded_forward_equals_single_device():
  assert jax.device_count() == 8, "conftest must set 8 host devices"
  model = models.create("vit_test", keep_rate=0.25, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(3), (16, 16, 16, 3))

  def fwd(state, x):
    logits, aux = nnx.merge(graphdef, state)(x)
    return logits, aux["masks"][1].indices

  ref_logits, ref_idx = jax.jit(fwd)(state, x)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  data = jax.sharding.NamedSharding(mesh, jax.P("data"))
  sharded = jax.jit(fwd, in_shardings=(repl, data), out_shardings=(data, data))
  logits, idx = sharded(jax.device_put(state, repl), jax.device_put(x, data))
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(idx, ref_idx)


def _plain_jit_forward(model):
  """``(state, jax.jit(logits of state and images))``: no mesh context, no shardings given to jit."""
  graphdef, state = nnx.split(model)
  return state, jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_plain_jit_with_sharded_inputs_equals_set_mesh(platform):
  """With batch-sharded inputs and no ``jax.set_mesh``, the kernels take the mesh from their operands and
  run per batch shard (a ``shard_map`` in the program), giving what they give under ``jax.set_mesh``. On
  CPU the kernels are the C++ custom calls; ``tpu`` runs the Pallas kernels interpreted."""
  model = models.create("vit_test", keep_rate=0.25, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(None)
  state, fwd = _plain_jit_forward(model)
  x = jax.device_put(jax.random.normal(jax.random.key(3), (16, 16, 16, 3)), sharding.batch_sharding(mesh))
  with backend.compiling_for(platform, interpret=True):
    plain = fwd(state, x)
    assert "shard_map" in str(jax.make_jaxpr(fwd)(state, x))
    with jax.set_mesh(mesh):
      in_context = fwd(state, x)
  np.testing.assert_allclose(plain, in_context, atol=1e-6, rtol=0)
  assert len(plain.sharding.device_set) == 8


def test_plain_jit_compiles_mosaic_kernels_for_a_tpu_topology():
  """The TPU case that failed before ("Mosaic kernels cannot be automatically partitioned"): a plain jit
  of the model with inputs sharded over 4 v5e chips compiles, one kernel call per chip."""
  from sparsifiner_jax.compile import targets   # pylint: disable=g-import-not-at-top
  model = models.create("vit_test", keep_rate=0.25, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(None, targets.devices("v5e:2x2"))
  state, fwd = _plain_jit_forward(model)
  state = sharding.abstract(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))
  x = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32, sharding=sharding.batch_sharding(mesh))
  with backend.compiling_for("tpu"):
    text = fwd.trace(state, x).lower().compile().as_text()
  assert text.count("tpu_custom_call") == 2 * 2    # 2 layers: mask and attention kernels


# Mixed precision (vit.py's policy): bf16 matmul inputs, float32 products and everything else.
# Tolerances, measured on vit_test at init (logits up to ~0.25): bf16 vs float32 logits differ by
# <= 0.4 % of the largest |logit| (asserted: 1.5 %); the sparse (gather) executor and the CPU kernel
# (auto; float32 inside) vs the masked reference in bf16 by ~2e-4 (asserted: 1e-3) -- they differ only in
# where the probabilities (and, for the kernel, q.k and p.v) round to bf16.


def _matmuls(fn, *args):
  """(operand dtypes, result dtype) of every dot_general/convolution in ``fn``'s StableHLO."""
  import re
  text = jax.jit(fn).lower(*args).as_text()
  ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*: \((.*)\) -> tensor<([^>]*)>", text)
  return [(tuple(t.rsplit("x", 1)[-1] for t in re.findall(r"tensor<([^>]*)>", ins)),
           out.rsplit("x", 1)[-1]) for ins, out in ops]


@pytest.mark.parametrize("kw", [{}, dict(keep_rate=0.3, token_keep_rate=0.7, token_pruning_layers=(0,))])
def test_bfloat16_matmuls_take_bf16_and_return_float32(kw):
  model = models.create("vit_test", dtype="bfloat16", rngs=nnx.Rngs(0), **kw)
  mm = _matmuls(lambda im: model(im), jnp.zeros((2, 16, 16, 3)))
  assert len(mm) >= 2 * 6 + 2      # qkv, q.k, p.v, proj, fc1, fc2 per block; patch conv, head
  assert all(ins == ("bf16", "bf16") and out == "f32" for ins, out in mm), mm


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_logits_close_to_float32(seed):
  x = jax.random.normal(jax.random.key(seed), (4, 16, 16, 3))
  for kw in ({}, dict(keep_rate=1.0)):
    f32 = models.create("vit_test", rngs=nnx.Rngs(seed), **kw)
    bf16 = models.create("vit_test", dtype="bfloat16", rngs=nnx.Rngs(seed), **kw)
    l32, (l16, aux) = f32(x)[0], bf16(x)
    assert l16.dtype == jnp.float32 and aux["tokens"].dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=0.015 * float(jnp.abs(l32).max()), rtol=0)


@pytest.mark.parametrize("executor", ["auto", "gather"])
def test_bfloat16_fast_executors_match_masked_reference(executor):
  x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  ref, fast = (models.create("vit_test", keep_rate=0.3, executor=ex, dtype="bfloat16",
                             rngs=nnx.Rngs(0)) for ex in ("masked", executor))
  np.testing.assert_allclose(fast(x)[0], ref(x)[0], atol=1e-3, rtol=0)


def test_cast_kernels_casts_only_kernels_and_keeps_logits():
  model = models.create("vit_test", keep_rate=0.3, dtype="bfloat16", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cast = models.cast_kernels(state, "bfloat16")
  dtypes = {jax.tree_util.keystr(p): v.dtype for p, v in jax.tree_util.tree_leaves_with_path(cast)}
  assert dtypes and all((v == jnp.bfloat16) == ("['kernel']" in k) for k, v in dtypes.items()), dtypes
  assert any("mask_predictor']['proj_c_q']['kernel" in k for k in dtypes)
  assert models.cast_kernels(state, "float32") is state
  fwd = jax.jit(lambda s, im: nnx.merge(graphdef, s)(im)[0])
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  np.testing.assert_allclose(fwd(cast, x), fwd(state, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,size,atol", [("float32", 18, 1e-5), ("bfloat16", 16, 1e-5)])
def test_patch_projection_equals_the_strided_conv(dtype, size, atol):
  from sparsifiner_jax.models import vit
  conv = nnx.Conv(3, 8, kernel_size=(4, 4), strides=(4, 4), padding="VALID",
                  **precision.matmul_kwargs(dtype), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))   # 18: VALID drops the last 2 pixels
  want = conv(x)
  got = vit.patch_projection(conv, x)
  assert got.shape == (2, want.shape[1] * want.shape[2], 8) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want.reshape(got.shape), atol=atol, rtol=0)


def test_bfloat16_backward_matmuls_take_bf16():
  """The training step's backward products follow the same rule as the forward (mixed_einsum's VJP).

  With ``masked``, the XLA executor (``auto``'s CPU kernels compute attention and its gradient in float32,
  so the q.k and p.v products are not XLA matmuls there)."""
  model = models.create("vit_test", keep_rate=0.3, dtype="bfloat16", executor="masked", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  loss = lambda s, im: jnp.sum(nnx.merge(graphdef, s)(im)[0] ** 2)  # noqa: E731
  mm = _matmuls(jax.grad(loss), state, jnp.ones((2, 16, 16, 3)))
  assert len(mm) >= 3 * (2 * 6 + 1)          # forward + two gradient products per matmul
  assert all(ins == ("bf16", "bf16") and out == "f32" for ins, out in mm), mm


@pytest.mark.parametrize("dims,a_shape,b_shape", [
    ((((2,), (0,)), ((), ())), (2, 5, 8), (8, 3)),                     # Linear: [B, N, D] x [D, F]
    ((((3,), (3,)), ((0, 1), (0, 1))), (2, 3, 4, 8), (2, 3, 6, 8)),   # q.k
    ((((1,), (2,)), ((0,), (0,))), (2, 7, 4), (2, 5, 7)),             # dims out of order
])
def test_mixed_dot_general_values_and_gradients(dims, a_shape, b_shape):
  a = jax.random.normal(jax.random.key(0), a_shape)
  b = jax.random.normal(jax.random.key(1), b_shape)
  ref = lambda a, b: jax.lax.dot_general(a, b, dims)  # noqa: E731
  np.testing.assert_allclose(precision.mixed_dot_general(a, b, dims), ref(a, b), atol=1e-5, rtol=0)
  bf = lambda t: t.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
  ct = jax.random.normal(jax.random.key(2), ref(a, b).shape)
  got = jax.vjp(lambda a, b: precision.mixed_dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                                         dims), a, b)[1](ct)
  want = jax.vjp(ref, bf(a), bf(b))[1](bf(ct))       # float32 products of the rounded operands
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=2 ** -8, atol=1e-5)   # one bf16 rounding of the result


def test_keep_mask_indices_are_the_kept_columns():
  keep = jax.random.uniform(jax.random.key(0), (2, 3, 5, 9)).argsort(-1).argsort(-1) < 4   # 4 per row
  mask = attn_lib.keep_mask(keep, 4, num_dense_rows=1)
  want = np.stack([np.flatnonzero(row) for row in np.asarray(keep).reshape(-1, 9)]).reshape(2, 3, 5, 4)
  np.testing.assert_array_equal(mask.indices, want)
  np.testing.assert_array_equal(mask.sparse_rows(), keep)
  np.testing.assert_array_equal(attn_lib.indices_to_dense(mask.indices, 9), keep)


def test_dense_attention_only_when_asked():
  """``aux["attn"]`` holds each layer's dense attention with ``with_attention=True`` and None without:
  no caller pays for an ``[B, H, N, N]`` array it does not read."""
  model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  _, plain = model(x)
  _, asked = model(x, with_attention=True)
  assert plain["attn"] == [None, None]
  assert [a.shape for a in asked["attn"]] == [(2, 2, 17, 17)] * 2
  np.testing.assert_allclose(np.asarray(asked["attn"][0]).sum(-1), 1.0, atol=1e-5)
