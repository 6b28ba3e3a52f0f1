"""Dense ViT trained from scratch on the embedded scikit-learn digits (the demo's teacher).

Args: ``epochs``, ``img_size`` (16: 65 tokens with patch 2; 32: 257 tokens, the block-mode teacher of
``configs/digits_blocks.py``)."""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, epochs=40.0, img_size=16)
  c = common.base_config()
  c.model_name = "vit_digits"
  c.model.img_size = a.img_size
  c.model.num_classes = 10
  c.model.drop_path_rate = 0.1
  c.input = common.input_config("digits", train_split="train", eval_split="test",
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), hflip=False,
                                rrc_scale=(0.7, 1.0), randaugment="", random_erasing=0.0,
                                shuffle_buffer=2048, cache=True, crop_pct=1.0)
  c.batch_size = 64
  c.eval_batch_size = 360
  c.mixup.prob = 0.0
  c.phases.train.epochs = a.epochs
  c.phases.train.warmup_epochs = 5
  c.phases.train.lr, c.phases.train.final_lr = 2e-3, 1e-5
  c.phases.train.losses.cls = 1.0
  c.ema_decay = 0.0
  c.log_every = 20
  c.ckpt_every = 500
  return c
