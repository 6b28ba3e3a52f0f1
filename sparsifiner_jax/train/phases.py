"""Training phases: what each trains, for how long, with which schedule and loss weights.

=========  ==========================  ==================  ===========================================
phase      trainable                   forward             loss terms (weights from the config)
=========  ==========================  ==================  ===========================================
train      everything                  sparse if model is  cls (+ kd/tok if a teacher is set)
recon      mask predictors only        dense (recon mode)  recon: sum-MSE(Â, teacher attention)
distill    everything but predictors   sparse top-k mask   cls + kd(teacher||student) + tok MSE
joint      everything                  sparse top-k mask   all of the above (Â of the sparse mode)
=========  ==========================  ==================  ===========================================

Phases run in this fixed order; one with zero length is skipped. Each phase gets a fresh AdamW.
"""

from __future__ import annotations

import dataclasses

import optax

from sparsifiner_jax.train import optim

PHASES = ("train", "recon", "distill", "joint")   # the order they run in
TRAINABLE = {"train": ("backbone", "predictor"), "recon": ("predictor",),
             "distill": ("backbone",), "joint": ("backbone", "predictor")}
LOSS_TERMS = ("cls", "kd", "tok", "recon")
TEACHER_TERMS = ("kd", "tok", "recon")             # the loss terms that need the frozen teacher


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  start: int          # first global step of the phase
  steps: int
  lr: float
  final_lr: float
  warmup_steps: int
  weight_decay: float
  loss_weights: tuple[tuple[str, float], ...]

  @property
  def end(self) -> int:
    return self.start + self.steps

  @property
  def recon_forward(self) -> bool:
    return self.name == "recon"

  def weight(self, term: str) -> float:
    return dict(self.loss_weights).get(term, 0.0)


def resolve_phases(config, steps_per_epoch: int) -> list[Phase]:
  """Phase lengths in optimizer steps from ``epochs`` (or explicit ``steps``), in the fixed order."""
  out, start = [], 0
  for name in PHASES:
    if name not in config.phases:
      continue
    p = config.phases[name]
    steps = int(p.get("steps", 0) or 0) or int(round(float(p.get("epochs", 0)) * steps_per_epoch))
    if steps <= 0:
      continue
    warm = p.get("warmup_steps", -1)
    warm = int(warm) if warm is not None and warm >= 0 else int(
        round(float(p.get("warmup_epochs", 0)) * steps_per_epoch))
    lw = tuple((k, float(p.losses.get(k, 0.0))) for k in LOSS_TERMS)
    out.append(Phase(name, start, steps, float(p.lr), float(p.get("final_lr", 0.0)), min(warm, steps),
                     float(p.get("weight_decay", 0.05)), lw))
    start += steps
  return out


def make_optimizer(phase: Phase, trainable_params) -> optax.GradientTransformation:
  schedule = optim.warmup_cosine(phase.lr, phase.final_lr, phase.warmup_steps, phase.steps)
  return optim.adamw(trainable_params, schedule=schedule, weight_decay=phase.weight_decay)


def trainable_of(params: dict, phase: Phase) -> dict:
  return {k: params[k] for k in TRAINABLE[phase.name]}
