"""Every attention method on digits at a matched attention budget: one run per ``pattern=NAME``.

  python train.py --config configs/patterns.py:pattern=window,budget=0.25 --workdir W \
      --config.init=TEACHER/final --config.teacher.weights=TEACHER/final
  python eval.py --config configs/patterns.py:pattern=window,budget=0.25 --workdir W

(``configs/sweeps/patterns.py`` runs all of them; TEACHER is a ``configs/digits_dense.py`` run.)

Methods (``pattern=``):

* ``dense``: softmax attention through the ``full`` pattern; ``sigmoid``: the same with the sigmoid
  executor (Ramapuram et al. 2024);
* ``sparsifiner``: ``configs/digits_sparsifiner.py`` at ``keep_rate=budget`` (recon, then distill);
* every fixed/oracle pattern of ``sparsifiner_jax.attention.patterns``, its budget option
  (``patterns.BUDGET_KNOBS``) chosen so that its analytic density is the closest to Sparsifiner's mask
  density at ``keep_rate=budget``, ``(N + P ceil(budget N)) / N^2`` (27.3 % for vit_digits, N = 65, at
  0.25). Fibottention has no budget option and keeps its own rule (9.9 % on vit_digits).

Other arguments: ``fill`` (neg_inf | zero_logit), ``mode`` (sparse_transformer: strided | fixed),
``variant`` (window: clip | neighborhood), ``executor`` (auto | masked | gather | sigmoid; default
``auto``, the models' own default: the CPU kernels where they apply), ``scratch``.

Schedule: every method starts from the dense digits teacher and trains for ``epochs`` (0: 25, the
Sparsifiner config's recon 10 + distill 15) in the distill phase (cls + kd + tok losses, the same
teacher); Sparsifiner spends 10 of them on its predictor's reconstruction phase. ``scratch=True``
instead trains from random init with the cls loss only, on ``configs/digits_dense.py``'s schedule
(``epochs`` 0: 40; no teacher needed; not available for sparsifiner).
"""

from configs import common, digits_dense, digits_sparsifiner

METHODS = ("dense", "sigmoid", "sparsifiner", "fibottention", "window", "sparse_transformer", "bigbird",
           "random", "oracle_topk", "routing")


def method_name(a) -> str:
  """Name of the run in tables and plots, e.g. ``window(neighborhood)``, ``fibottention(zero_logit)``."""
  tags = [t for t in (a.mode, a.variant) if t]
  if a.fill != "neg_inf":
    tags.append(a.fill)
  if a.executor not in ("auto", "masked", "gather") and a.pattern != "sigmoid":   # same outputs
    tags.append(a.executor)
  return a.pattern + (f"({','.join(tags)})" if tags else "")


def pattern_model(a) -> tuple[str, dict, str]:
  """``(attention_pattern, pattern_options, executor)`` of a method at the argument's budget."""
  from sparsifiner_jax import models   # pylint: disable=g-import-not-at-top
  from sparsifiner_jax.attention import patterns   # pylint: disable=g-import-not-at-top
  if a.pattern in ("dense", "sigmoid"):
    return "full", {}, "sigmoid" if a.pattern == "sigmoid" else a.executor
  options = {"fill": a.fill} if a.fill != "neg_inf" else {}
  if a.mode:
    options["mode"] = a.mode
  if a.variant:
    options["variant"] = a.variant
  base = models.get_config("vit_digits", img_size=16, num_classes=10)
  target = patterns.analytic_density(models.get_config("vit_digits", img_size=16, num_classes=10,
                                                       keep_rate=a.budget))
  options = patterns.match_budget(base, a.pattern, target, **options)
  return a.pattern, options, a.executor


def get_config(arg=None):
  a = common.parse_arg(arg, pattern="fibottention", budget=0.25, fill="neg_inf", mode="", variant="",
                       executor="auto", epochs=0.0, scratch=False)
  if a.pattern not in METHODS:
    raise ValueError(f"unknown method pattern={a.pattern!r}; allowed: {', '.join(METHODS)}")
  if a.pattern == "sparsifiner":
    if a.scratch:
      raise ValueError("pattern=sparsifiner needs the dense teacher (no scratch=True)")
    c = digits_sparsifiner.get_config(f"keep_rate={a.budget}")
    c.model.executor = a.executor
    c.method = "sparsifiner"
    return c
  name, options, executor = pattern_model(a)
  c = digits_dense.get_config()
  c.model.attention_pattern = name
  c.model.pattern_options = options
  c.model.executor = executor
  c.method = method_name(a)
  if a.scratch:
    c.phases.train.epochs = a.epochs or c.phases.train.epochs
    c.phases.train.warmup_epochs = min(c.phases.train.warmup_epochs, c.phases.train.epochs)
  else:
    c.model.drop_path_rate = 0.0
    c.phases.train.epochs = 0
    c.phases.distill.epochs = a.epochs or 25.0
    c.phases.distill.warmup_epochs = min(1.0, c.phases.distill.epochs)
    c.phases.distill.lr, c.phases.distill.final_lr = 2e-4, 1e-6
  return c
