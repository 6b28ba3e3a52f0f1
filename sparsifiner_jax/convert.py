"""``python -m sparsifiner_jax.convert SRC DST [flags]``: the weight converter's command line.

The conversions themselves live in ``sparsifiner_jax.io.convert`` (formats, checks, key mapping:
docs/weights.md); this module is only the command: its flags (absl, defined when it runs), and errors as
one line with exit code 2 for a bad checkpoint, path or option, 1 for anything else (``--debug``: the
traceback too).
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from sparsifiner_jax.cli import errors, parsing
from sparsifiner_jax.io import convert, paths

PROG = "python -m sparsifiner_jax.convert"
USAGE = "SRC DST [flags]   (SRC: .pth/.pt, .safetensors, .npz or a weights directory; DST: a weights " \
        "directory, or a .safetensors/.npz/.pth file)"


def define_flags() -> flags.FlagValues:
  """The command's flags, in a flag set of their own."""
  fv = parsing.new_flags()
  flags.DEFINE_string("model", None, "Model name (models.VARIANTS); inferred from the shapes if omitted.",
                      flag_values=fv)
  flags.DEFINE_integer("img-size", None, "Target image size; pos_embed (and the predictors' token params) "
                       "are resampled bicubically to the new patch grid.", flag_values=fv)
  flags.DEFINE_float("keep-rate", None, "Build a Sparsifiner model with this attention keep rate (new "
                     "predictors are initialised); default: as in the checkpoint.", flag_values=fv)
  flags.DEFINE_enum("format", None, convert.DST_FORMATS, "Output format (default from the DST suffix; no "
                    "known suffix = weights directory).", flag_values=fv)
  flags.DEFINE_enum("src-format", "auto", convert.SRC_FORMATS, "Input format.", flag_values=fv)
  flags.DEFINE_bool("backbone-only", False, "Drop the Sparsifiner mask predictors (e.g. to export for "
                    "plain timm).", flag_values=fv)
  flags.DEFINE_bool("trust-pickle", False, "Allow arbitrary pickled objects in .pth files (only for files "
                    "you trust).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace DST if it exists.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed for parameters the checkpoint lacks.", flag_values=fv)
  flags.DEFINE_bool("debug", False, "Show the traceback on errors.", flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> int:
  """Runs the command on ``argv`` (program name first); returns the exit code (0: written)."""
  fv = define_flags()
  positional = parsing.parse(fv, argv, prog=PROG, usage=USAGE)
  if len(positional) != 2:
    parsing.fail(PROG, f"need SRC and DST, got {len(positional)} argument(s): {positional}")
  src, dst = positional
  try:
    paths.require_local(src, "SRC")
    paths.require_local(dst, "DST")
    out = convert.convert(src, dst, model=fv["model"].value, img_size=fv["img-size"].value,
                          keep_rate=fv["keep-rate"].value, src_format=fv["src-format"].value,
                          dst_format=fv["format"].value, backbone_only=fv["backbone-only"].value,
                          trust_pickle=fv["trust-pickle"].value, overwrite=fv["overwrite"].value,
                          seed=fv["seed"].value)
  except Exception as e:  # pylint: disable=broad-except
    return errors.report(e, (convert.ConversionError, OSError, ValueError), debug=fv["debug"].value)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  parsing.run(main)
