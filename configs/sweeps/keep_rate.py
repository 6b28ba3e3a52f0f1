"""Keep-rate sweep: one run per attention keep rate rho (the paper uses 0.25).

  python -m sparsifiner_jax.sweeps run --script eval.py --config configs/deit_s_sparsifiner.py \
      --sweep configs/sweeps/keep_rate.py[:0.25,0.1] --workdir-root runs/keep_rate

``arg``: optional comma-separated keep rates replacing the defaults.
"""

KEEP_RATES = (1.0, 0.5, 0.25, 0.1, 0.05)


def get_sweep(arg=None):
  rates = KEEP_RATES if not arg else tuple(float(r) for r in arg.split(",") if r.strip())
  for rate in rates:
    if not 0.0 < rate <= 1.0:
      raise ValueError(f"keep rate {rate} must be in (0, 1]")
  return [{"model.keep_rate": rate} for rate in rates]
