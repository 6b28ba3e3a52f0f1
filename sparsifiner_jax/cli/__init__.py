"""The command-line plumbing every command of the project shares.

``entry``: train.py's and eval.py's entry point (flags, distributed init, one-line errors); ``parsing``:
the absl flag sets of the library's own commands (``python -m sparsifiner_jax.convert``, ``.demo``,
``.sweeps``); ``errors``: how every command reports errors (one line, exit 2 or 1); ``env``: the
``SPARSIFINER_JAX_*`` environment variables. Importing the package imports none of them, so the leaf modules
(``errors``, ``env``) stay cheap for the library code that uses them.
"""
