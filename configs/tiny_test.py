"""A seconds-long config for tests: tiny ViT, digits, a few steps of every phase."""

from configs import common, digits_dense


def get_config(arg=None):
  a = common.parse_arg(arg, keep_rate=0.5, steps=3)
  c = digits_dense.get_config()
  c.model_name = "vit_test"
  c.model.keep_rate = a.keep_rate
  c.model.drop_path_rate = 0.0
  c.batch_size = 16
  c.eval_batch_size = 64
  for name in ("train", "recon", "distill"):
    c.phases[name].epochs = 0
    c.phases[name].steps = a.steps
    c.phases[name].warmup_steps = 1
  c.phases.train.losses.cls = 1.0
  c.log_every = 1
  c.ckpt_every = 2
  c.progress = False
  return c
