"""The attention-pattern zoo at matched budgets: one line per method, for ``configs/patterns.py``.

  # train every method from the dense digits teacher, evaluate, then table + Pareto plot
  python -m sparsifiner_jax.sweeps run --script train.py --config configs/patterns.py \
      --sweep configs/sweeps/patterns.py --workdir-root runs/patterns -- \
      --config.init=TEACHER/final --config.teacher.weights=TEACHER/final
  python -m sparsifiner_jax.sweeps run --script eval.py --config configs/patterns.py \
      --sweep configs/sweeps/patterns.py --workdir-root runs/patterns
  python -m sparsifiner_jax.sweeps aggregate runs/patterns/*/eval.json --out runs/patterns

Each entry sets only ``config_arg``, the run's config argument (``configs/patterns.py:<config_arg>``; see
``sparsifiner_jax/sweeps.py``). ``arg``: ``budgets=a/b/..`` (keep-rate budgets, default 0.25); methods
whose budget is fixed (dense, sigmoid, Fibottention) appear once.
"""

# (config argument, whether it depends on the budget)
LINES = (
    ("pattern=dense", False),
    ("pattern=sigmoid", False),
    ("pattern=sparsifiner", True),
    ("pattern=fibottention", False),
    ("pattern=fibottention,fill=zero_logit", False),
    ("pattern=window", True),
    ("pattern=window,variant=neighborhood", True),
    ("pattern=sparse_transformer,mode=strided", True),
    ("pattern=sparse_transformer,mode=fixed", True),
    ("pattern=bigbird", True),
    ("pattern=random", True),
    ("pattern=oracle_topk", True),
    ("pattern=routing", True),
)


def _budgets(arg):
  budgets = (0.25,)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key != "budgets" or not sep:
      raise ValueError(f"bad sweep argument {item!r}; allowed: budgets=a/b/..")
    budgets = tuple(float(v) for v in value.split("/") if v)
  for b in budgets:
    if not 0.0 < b <= 1.0:
      raise ValueError(f"budget {b} must be in (0, 1]")
  return budgets


def get_sweep(arg=None):
  sweep = []
  for i, budget in enumerate(_budgets(arg)):
    for line, budgeted in LINES:
      if budgeted:
        sweep.append({"config_arg": f"{line},budget={budget:g}"})
      elif i == 0:
        sweep.append({"config_arg": line})
  return sweep
