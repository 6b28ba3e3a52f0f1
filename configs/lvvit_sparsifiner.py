"""Sparsifiner LV-ViT-S/M on ImageNet: keep 0.25, 5 recon + 45 distill epochs (the DeiT-S recipe).

The official code defines the LV-ViT-S student but ships no config for it; this one
keeps the released DeiT-S phase schedule. The teacher is the dense LV-ViT of the same size; its
distillation targets are the CLS logits (KL) and the token-labelling aux head's per-token logits (MSE),
as the official LV-ViT variant does.

  python -m sparsifiner_jax.convert lvvit_s-26M-224-83.3.pth weights/lvvit_s
  python train.py --config configs/lvvit_sparsifiner.py --workdir runs/lvvit_sp \
      --config.init=weights/lvvit_s --config.teacher.weights=weights/lvvit_s

Args (``--config configs/lvvit_sparsifiner.py:variant=lvvit_m,keep_rate=0.1``): ``variant``
(``lvvit_s``, ``lvvit_m``), ``keep_rate``.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, keep_rate=0.25, variant="lvvit_s")
  c = common.base_config()
  c.model_name = a.variant
  c.model.keep_rate = a.keep_rate
  c.input = common.input_config("imagenet2012", eval_split="validation", crop_pct=0.9)
  c.batch_size = 1344
  c.phases.recon.epochs, c.phases.recon.warmup_epochs = 5, 3
  c.phases.distill.epochs, c.phases.distill.warmup_epochs = 45, 3
  return c
