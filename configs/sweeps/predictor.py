"""Predictor sweep: basis threshold x basis-coefficient top-k, at one keep rate.

The threshold sets how sparse the inference basis |W_up| is (delta_b in the FLOPs count); the
coefficient top-k (kappa, at most m = N // reduce_n) how many basis rows each query mixes.
Both change only the predictor's mask and its reconstruction MACs, not the attention budget.

  python -m sparsifiner_jax.sweeps run --script eval.py --config configs/deit_s_sparsifiner.py \
      --sweep configs/sweeps/predictor.py:keep_rate=0.1 --workdir-root runs/predictor

``arg``: ``keep_rate=R`` (default 0.25), ``thresholds=a/b/..``, ``topk=a/b/..`` (``/``-separated lists).
"""

THRESHOLDS = (0.0, 0.01, 0.02, 0.04)   # 0.02 is the released config's value
COEF_TOPK = (4, 8, 16, 32)              # 8 is the released value; 32 = m for DeiT-S (all coefficients)


def _parse(arg):
  opts = dict(keep_rate="0.25", thresholds=None, topk=None)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in opts or not sep:
      raise ValueError(f"bad sweep argument {item!r}; allowed: keep_rate=R, thresholds=a/b, topk=a/b")
    opts[key] = value
  keep_rate = float(opts["keep_rate"])
  thresholds = THRESHOLDS if opts["thresholds"] is None else tuple(
      float(v) for v in opts["thresholds"].split("/"))
  topk = COEF_TOPK if opts["topk"] is None else tuple(int(v) for v in opts["topk"].split("/"))
  return keep_rate, thresholds, topk


def get_sweep(arg=None):
  keep_rate, thresholds, topk = _parse(arg)
  return [{"model.keep_rate": keep_rate, "model.basis_threshold": t, "model.coef_topk": k}
          for t in thresholds for k in topk]
