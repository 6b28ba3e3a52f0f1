"""Checkpoint formats in and out (convert.py): timm .pth/.safetensors, big_vision/vit_jax .npz, official
Sparsifiner checkpoints, resolution changes, and clear one-line errors with nothing left at DST."""

import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import convert as convert_command
from sparsifiner_jax import models
from sparsifiner_jax.io import convert, resample, state_dict, weights


@pytest.fixture(scope="module")
def deit_tiny(timm, tmp_path_factory):
  """A random timm DeiT-Ti, its input/logits and its weights as .safetensors and as a wrapped .pth."""
  import torch
  from safetensors.torch import save_file
  torch.manual_seed(0)
  net = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
  x = torch.randn(2, 3, 224, 224)
  with torch.inference_mode():
    logits = net(x).numpy()
  d = tmp_path_factory.mktemp("deit_tiny")
  save_file(net.state_dict(), d / "deit_tiny.safetensors")
  torch.save({"model": net.state_dict()}, d / "deit_tiny.pth")
  return dict(net=net, x=x, xn=x.permute(0, 2, 3, 1).numpy(), logits=logits, dir=d,
              sd={k: v.numpy() for k, v in net.state_dict().items()})


def _logits(weights_dir, name, x, **overrides):
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(123), **overrides))
  weights.load_weights(weights_dir, model)
  out, _ = nnx.jit(lambda m, x: m(x))(model, x)
  return np.asarray(out), model


def _timm_parity(timm, tmp_path, name):
  import torch
  from safetensors.torch import save_file
  torch.manual_seed(1)
  net = timm.create_model(name, pretrained=False).eval()
  x = torch.randn(2, 3, 224, 224)
  with torch.inference_mode():
    want = net(x).numpy()
  save_file(net.state_dict(), tmp_path / "m.safetensors")
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
             tmp_path / "m.pth")  # a wrapped DDP checkpoint
  for src in ("m.safetensors", "m.pth"):
    out = convert.convert(str(tmp_path / src), str(tmp_path / (src + ".w")))  # architecture inferred
    assert weights.read_meta(out)["name"] == name
    got, _ = _logits(out, name, x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=src)


def test_deit_tiny_safetensors_and_pth_parity(deit_tiny, tmp_path):
  d = deit_tiny
  for src in ("deit_tiny.safetensors", "deit_tiny.pth"):
    out = convert.convert(str(d["dir"] / src), str(tmp_path / (src + ".w")))
    got, _ = _logits(out, "deit_tiny_patch16_224", d["xn"])
    np.testing.assert_allclose(got, d["logits"], rtol=0, atol=1e-4, err_msg=src)


def test_deit_small_parity(timm, tmp_path):
  _timm_parity(timm, tmp_path, "deit_small_patch16_224")


@pytest.mark.slow
def test_deit_base_parity(timm, tmp_path):
  _timm_parity(timm, tmp_path, "deit_base_patch16_224")


def test_export_safetensors_loads_in_timm(deit_tiny, timm, tmp_path):
  d = deit_tiny
  wdir = convert.convert(str(d["dir"] / "deit_tiny.safetensors"), str(tmp_path / "w"))
  ours, _ = _logits(wdir, "deit_tiny_patch16_224", d["xn"])
  path = convert.convert(wdir, str(tmp_path / "out.safetensors"))
  net = timm.create_model("deit_tiny_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=path)).eval()
  import torch
  with torch.inference_mode():
    theirs = net(d["x"]).numpy()
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
  for k, v in net.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), d["sd"][k], err_msg=k)  # bit-exact round trip


def test_npz_round_trip_exact(tmp_path):
  model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
  want, _ = nnx.jit(lambda m, x: m(x))(model, x)
  first = convert.save(model, str(tmp_path / "a.npz"))
  z = np.load(first)
  assert "params/embedding/kernel" in z.files and "params/pos_embedding" in z.files
  assert z["params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"].shape == (
      32, 2, 16)  # [D, H, d]
  assert z["params/pos_embedding"].shape == (1, 16, 32)  # no CLS slot
  assert "params/Transformer/encoderblock_1/MaskPredictor_0/proj_back_n" in z.files
  wdir = convert.convert(first, str(tmp_path / "w"), model="vit_test", keep_rate=0.5)
  got, back = _logits(wdir, "vit_test", x, keep_rate=0.5)
  np.testing.assert_array_equal(got, np.asarray(want))  # the same function, bit for bit
  second = convert.save(back, str(tmp_path / "b.npz"))
  z2 = np.load(second)
  assert z.files == z2.files
  for k in z.files:
    np.testing.assert_array_equal(z[k], z2[k], err_msg=k)


def test_vit_jax_and_scanned_npz_import(deit_tiny, tmp_path):
  """AugReg/vit_jax naming (cls slot inside pos_embed, *_1/LayerNorm_2/MlpBlock_3, no prefix) and a
  scanned big_vision stack both import to the same function."""
  d = deit_tiny
  wdir = convert.convert(str(d["dir"] / "deit_tiny.safetensors"), str(tmp_path / "w"))
  bv = dict(np.load(convert.convert(wdir, str(tmp_path / "bv.npz"))))
  vj = {}
  for k, v in bv.items():
    k = k[len("params/"):]
    k = (k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
         .replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3"))
    vj[k] = v
  vj["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [np.zeros_like(vj["cls"]), vj.pop("pos_embedding")], axis=1)
  np.savez(tmp_path / "vj.npz", **vj)
  scanned = {k: v for k, v in bv.items() if "encoderblock_" not in k}
  for k in [k for k in bv if "encoderblock_0/" in k]:
    scanned[k.replace("encoderblock_0/", "encoderblock/")] = np.stack(
        [bv[k.replace("encoderblock_0/", f"encoderblock_{i}/")] for i in range(12)])
  np.savez(tmp_path / "scan.npz", **scanned)
  for src in ("vj.npz", "scan.npz"):
    out = convert.convert(str(tmp_path / src), str(tmp_path / (src + ".w")))
    got, _ = _logits(out, "deit_tiny_patch16_224", d["xn"])
    np.testing.assert_allclose(got, d["logits"], rtol=0, atol=1e-4, err_msg=src)


def test_resolution_change_224_to_384(deit_tiny, timm, tmp_path):
  import torch
  from timm.layers import resample_abs_pos_embed
  d = deit_tiny
  out = convert.convert(str(d["dir"] / "deit_tiny.pth"), str(tmp_path / "w384"), img_size=384)
  meta = weights.read_meta(out)
  assert meta["config"]["img_size"] == 384
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 384, 384, 3)))
  logits, model = _logits(out, "deit_tiny_patch16_224", x, img_size=384)
  assert logits.shape == (1, 1000) and np.isfinite(logits).all()
  pe = np.asarray(model.pos_embed[...])
  src = d["sd"]["pos_embed"]
  np.testing.assert_array_equal(pe[:, :1], src[:, :1])  # CLS slot kept
  # The stated resampling: timm's resample_abs_pos_embed (bicubic, antialias) of the 14x14 grid to 24x24.
  want = resample_abs_pos_embed(torch.from_numpy(src), [24, 24], num_prefix_tokens=1).numpy()
  np.testing.assert_allclose(pe, want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(pe, resample.resample_pos_embed(src, 24))


@pytest.mark.parametrize("old,new", [(14, 24), (24, 14), (14, 7), (4, 5)])
def test_resample_pos_embed_matches_timm(timm, old, new):
  import torch
  from timm.layers import resample_abs_pos_embed
  pe = np.random.default_rng(0).normal(size=(1, old * old + 1, 16)).astype(np.float32)
  want = resample_abs_pos_embed(torch.from_numpy(pe), [new, new], num_prefix_tokens=1).numpy()
  np.testing.assert_allclose(resample.resample_pos_embed(pe, new), want, rtol=0, atol=1e-5)


def test_predictor_token_params_resized_keeping_m(tmp_path):
  src_model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))  # N=17, m=17//2=8
  src = convert.save(src_model, str(tmp_path / "s.safetensors"))
  out = convert.convert(src, str(tmp_path / "w"), model="vit_test", img_size=32)  # N=65
  cfg = weights.read_meta(out)["config"]
  assert cfg["img_size"] == 32 and cfg["keep_rate"] == 0.25 and 65 // cfg["reduce_n"] == 8
  x = np.zeros((1, 32, 32, 3), np.float32)
  logits, model = _logits(out, "vit_test", x, **{k: cfg[k] for k in ("img_size", "keep_rate",
                                                                       "reduce_n")})
  assert logits.shape == (1, 10)
  for name in ("proj_n", "proj_back_n"):
    old = np.asarray(getattr(src_model.blocks[1].attn.mask_predictor, name)[...])
    new = np.asarray(getattr(model.blocks[1].attn.mask_predictor, name)[...])
    assert old.shape == (17, 8) and new.shape == (65, 8)
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_array_equal(new, resample.resize_token_params(old, 8))
  with pytest.raises(state_dict.ConversionError, match="no integer reduce_n"):
    convert.convert(src, str(tmp_path / "bad"), model="vit_test", img_size=24)  # N=37: 37//rn != 8
  assert not (tmp_path / "bad").exists()


def test_official_sparsifiner_checkpoint(deit_tiny, tmp_path):
  """keys blocks.i.attn.mask_predictor.* under a `model` wrapper, with training-state extras."""
  import torch
  sd = {k: torch.from_numpy(v) for k, v in deit_tiny["sd"].items()}
  rng = np.random.default_rng(0)
  pred = {}
  for i in range(12):
    p = f"blocks.{i}.attn.mask_predictor."
    for n in ("proj_c_q", "proj_c_k"):  # head_dim 64 -> reduce_c 2 -> 32
      pred[p + n + ".weight"] = rng.normal(size=(32, 64)).astype(np.float32)
      pred[p + n + ".bias"] = rng.normal(size=(32,)).astype(np.float32)
    for n in ("proj_n", "proj_back_n"):  # N=197, reduce_n 6 -> m=32
      pred[p + n] = rng.normal(size=(197, 32)).astype(np.float32)
  sd.update({k: torch.from_numpy(v) for k, v in pred.items()})
  torch.save({"model": sd, "epoch": 49, "args": argparse.Namespace(lr=8e-5)}, tmp_path / "sp.pth")
  out = convert.convert(str(tmp_path / "sp.pth"), str(tmp_path / "w"))
  cfg = weights.read_meta(out)["config"]
  assert (cfg["keep_rate"], cfg["reduce_n"], cfg["reduce_c"]) == (0.25, 6, 2)
  model = models.create("deit_tiny_patch16_224", keep_rate=0.25, rngs=nnx.Rngs(9))
  weights.load_weights(out, model, allow_missing_predictor=False)
  mp = model.blocks[5].attn.mask_predictor
  np.testing.assert_array_equal(np.asarray(mp.proj_back_n[...]),
                                pred["blocks.5.attn.mask_predictor.proj_back_n"])
  np.testing.assert_array_equal(np.asarray(mp.proj_c_q.kernel[...]),
                                pred["blocks.5.attn.mask_predictor.proj_c_q.weight"].T)
  # --backbone-only drops them; --keep-rate re-initialises new ones.
  dense = convert.convert(str(tmp_path / "sp.pth"), str(tmp_path / "d"), backbone_only=True)
  assert weights.read_meta(dense)["config"]["keep_rate"] is None


def test_distilled_deit_refused(deit_tiny, tmp_path):
  from safetensors.numpy import save_file
  sd = dict(deit_tiny["sd"])
  sd["dist_token"] = np.zeros((1, 1, 192), np.float32)
  sd["head_dist.weight"] = np.zeros((1000, 192), np.float32)
  sd["head_dist.bias"] = np.zeros((1000,), np.float32)
  save_file(sd, tmp_path / "dist.safetensors")
  with pytest.raises(state_dict.ConversionError, match="distilled DeiT checkpoints are not supported"):
    convert.convert(str(tmp_path / "dist.safetensors"), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


# ---- errors: one line on stderr, exit code 2, nothing at DST -----------------------------------------


def _cli(capsys, *argv):
  code = convert_command.main(["convert", *(str(a) for a in argv)])
  err = capsys.readouterr().err
  return code, err


def test_cli_errors_are_one_line(deit_tiny, tmp_path, capsys):
  d = deit_tiny
  dst = tmp_path / "dst"
  raw = (d["dir"] / "deit_tiny.pth").read_bytes()
  (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
  st = (d["dir"] / "deit_tiny.safetensors").read_bytes()
  (tmp_path / "trunc.safetensors").write_bytes(st[: len(st) // 3])
  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
  (tmp_path / "weird.xyz").write_bytes(os.urandom(64))
  import fractions
  import torch
  torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}, "extra": fractions.Fraction(1, 3)},
             tmp_path / "pickled.pth")
  cases = [
      ((tmp_path / "nope.pth", dst), "does not exist"),
      ((tmp_path / "trunc.pth", dst), "truncated or corrupt"),
      ((tmp_path / "trunc.safetensors", dst), "truncated or corrupt"),
      ((tmp_path / "corrupt.npz", dst), "corrupt"),
      ((tmp_path / "weird.xyz", dst), "unknown checkpoint format"),
      ((tmp_path / "pickled.pth", dst), "--trust-pickle"),
      ((d["dir"] / "deit_tiny.pth", dst, "--model", "deit_small_patch16_224"), "mis-shaped keys"),
      ((d["dir"] / "deit_tiny.pth", dst, "--model", "lvvit_test"), "unexpected keys"),
      ((d["dir"] / "deit_tiny.pth", dst, "--format", "npz", "--model", "nosuch"), "unknown model"),
  ]
  for argv, expect in cases:
    code, err = _cli(capsys, *argv)
    assert code == 2, (argv, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, (argv, err)
    assert "Traceback" not in err
    assert not dst.exists() and not list(tmp_path.glob("dst*")), argv
  code, err = _cli(capsys, tmp_path / "trunc.pth", dst, "--debug")
  assert code == 2 and "Traceback" in err
  # An existing DST is not replaced without --overwrite.
  dst.mkdir()
  code, err = _cli(capsys, d["dir"] / "deit_tiny.pth", dst)
  assert code == 2 and "--overwrite" in err


def test_cli_end_to_end_subprocess(deit_tiny, tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
  cmd = [sys.executable, "-m", "sparsifiner_jax.convert"]
  ok = subprocess.run(cmd + [str(deit_tiny["dir"] / "deit_tiny.safetensors"), str(tmp_path / "o.npz")],
                      capture_output=True, text=True, env=env, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.startswith("wrote ") and (tmp_path / "o.npz").exists()
  bad = subprocess.run(cmd + [str(tmp_path / "missing.pth"), str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, timeout=120)
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "does not exist" in bad.stderr


def test_bfloat16_safetensors_and_backbone_only_export(tmp_path):
  import ml_dtypes
  from safetensors.numpy import save_file
  model = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(0))
  sd = state_dict.timm_state_dict(model)
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, tmp_path / "bf16.safetensors")
  out = convert.convert(str(tmp_path / "bf16.safetensors"), str(tmp_path / "w"), model="vit_test",
                        keep_rate=0.5)
  back = models.create("vit_test", keep_rate=0.5, rngs=nnx.Rngs(1))
  weights.load_weights(out, back, allow_missing_predictor=False)
  for k, v in state_dict.timm_state_dict(back).items():
    np.testing.assert_array_equal(v, sd[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
  plain = convert.convert(out, str(tmp_path / "plain.safetensors"), backbone_only=True)
  from safetensors.numpy import load_file
  keys = set(load_file(plain))
  assert keys == {k for k in sd if "mask_predictor" not in k}


@pytest.mark.parametrize("argv,expect", [
    (("a",), "need SRC and DST"),
    (("a", "b", "--seed=x"), "--seed=x"),
    (("a", "b", "--format=zip"), "--format=zip"),
    (("a", "b", "--nope"), "'nope'"),
])
def test_cli_bad_flags_are_one_line(capsys, argv, expect):
  with pytest.raises(SystemExit) as exit_:
    convert_command.main(["convert", *argv])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1 and expect in err, err
