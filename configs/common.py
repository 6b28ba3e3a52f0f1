"""Shared config pieces (big_vision style). Every field is overridable as ``--config.a.b=value``.

Durations are given in epochs (or explicit steps) per phase and resolved to steps in the trainer, so
overrides never desynchronise derived values.
"""

import ml_collections as mlc

from sparsifiner_jax.data import options


def parse_arg(arg, **defaults):
  """``"a=1,b=x,flag"`` -> ConfigDict over ``defaults`` (bare names are True), typed like the default."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def input_config(dataset: str, *, train_split="train", eval_split="test", **kw) -> mlc.ConfigDict:
  """Data options over their defaults (``sparsifiner_jax/data/options.py`` says what each does)."""
  c = options.default_config()
  c.update(dict(dataset=dataset, train_split=train_split, eval_split=eval_split, **kw))
  return c


def phase(lr, final_lr, *, epochs=0.0, warmup_epochs=0.0, weight_decay=0.05, cls=0.0, kd=0.0,
          tok=0.0, recon=0.0) -> mlc.ConfigDict:
  """One training phase: length (epochs, or ``steps`` > 0 to override), schedule, loss weights."""
  return mlc.ConfigDict(dict(epochs=float(epochs), steps=0, warmup_epochs=float(warmup_epochs),
                             warmup_steps=-1, lr=lr, final_lr=final_lr, weight_decay=weight_decay,
                             losses=dict(cls=cls, kd=kd, tok=tok, recon=recon)))


def base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.seed = 0
  c.model_name = "deit_small_patch16_224"
  c.model = mlc.ConfigDict(dict(
      img_size=224, num_classes=1000, keep_rate=mlc.FieldReference(None, field_type=float),
      # None: the model variant's default (DeiT: reduce_n 6, reduce_c 2, coef_topk 8).
      reduce_n=mlc.FieldReference(None, field_type=int),
      reduce_c=mlc.FieldReference(None, field_type=int),
      coef_topk=mlc.FieldReference(None, field_type=int),
      basis_threshold=0.02, signed_basis=False, executor="auto", drop_path_rate=0.0,
      dtype="float32",
      # Attention pattern: "sparsifiner" (learned) or a fixed one (sparsifiner_jax/attention/patterns.py).
      attention_pattern="sparsifiner", pattern_options={},
      # Token sparsity (EViT-style): None or a rate r; keep r^s of the patches after each listed layer.
      token_keep_rate=mlc.FieldReference(None, field_type=float),
      token_pruning_layers=(3, 6, 9), token_pruning_mode="drop",
      # Order of the patch tokens: "raster" or "morton" (Z-order: block mode's blocks become squares).
      token_order="raster"))
  c.init = ""                       # weights dir (ours, or from `python -m sparsifiner_jax.convert`)
  c.teacher = mlc.ConfigDict(dict(weights="", model_name="", model={}))
  c.input = input_config("imagenet2012", eval_split="validation")
  c.batch_size = 1344               # global
  c.eval_batch_size = 2016
  c.grad_accum = 1                  # micro-batches per optimizer step (same global batch)
  c.mixup = mlc.ConfigDict(dict(prob=1.0, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                                label_smoothing=0.1))
  c.phases = mlc.ConfigDict(dict(
      train=phase(5e-4, 1e-5),
      recon=phase(3e-4, 2e-4, recon=0.01),
      distill=phase(8e-5, 2e-6, cls=1.0, kd=0.5, tok=0.5),
      joint=phase(1e-5, 1e-6, cls=1.0, kd=0.5, tok=0.5, recon=0.01)))
  c.recon_reference_batch = 168     # official per-GPU batch: the scale of the sum-reduced recon loss
  c.ema_decay = 0.9999
  c.mesh = (("data", -1), ("fsdp", 1))   # override: --config.mesh="(('data', 2), ('fsdp', 4))"
  c.nonfinite = "stop"              # or "skip": drop non-finite updates and continue
  c.allow_config_change = False
  c.log_every = 50
  c.eval_every = 0                  # 0: evaluate at the end of each phase only
  c.ckpt_every = 1000
  c.keep_ckpts = 2
  c.progress = True
  return c
