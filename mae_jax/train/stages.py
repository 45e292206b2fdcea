"""Stages of a pretraining run (config.schedule): `resolution = ((0.0, 16), (0.5, 24))`
trains at 16 px, then at 24 px from half of the steps on; `mask_ratio` takes (fraction,
ratio) pairs the same way; empty: data.image_size and model.mask_ratio throughout. Each
stage has its own compiled step over the same parameters (the position tables are fixed
sin-cos of the grid). Evaluation, pictures and kNN stay at data.image_size."""
import dataclasses
import math

from mae_jax.checks import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
  """Steps start + 1 ... end (as the loop counts them: state.step goes from start to end)
  at image_size px with mask_ratio."""
  start: int
  end: int
  image_size: int
  mask_ratio: float

  @property
  def key(self):
    """Stages with the same key share one compiled program."""
    return self.image_size, self.mask_ratio

  def describe(self):
    steps = (f"step {self.end}" if self.end == self.start + 1
             else f"steps {self.start + 1}-{self.end}")
    return f"{steps} at {self.image_size} px, mask ratio {self.mask_ratio:g}"


def _number(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pairs(config, field, check_value):
  """The checked (fraction, value) pairs of config.schedule.<field>."""
  name = f"config.schedule.{field}"
  entries = tuple(config.get("schedule", {}).get(field) or ())
  prev = None
  for entry in entries:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and _number(entry[0])):
      raise ConfigError(f"{name}: {entry!r} is not a (fraction, value) pair; write e.g. "
                        "((0.0, 16), (0.5, 24), (0.8, 28))")
    fraction, value = entry
    if not 0 <= fraction < 1:
      raise ConfigError(f"{name}: fraction {fraction!r} must be in [0, 1)")
    if prev is None and fraction != 0:
      raise ConfigError(f"{name}: the first stage must start at fraction 0.0, not {fraction!r}")
    if prev is not None and fraction <= prev:
      raise ConfigError(f"{name}: stages out of order: fraction {fraction!r} follows "
                        f"{prev!r}; list them by increasing fraction")
    check_value(name, value)
    prev = fraction
  return entries


def check(config, patch_size):
  """ConfigError (one line naming the field) for a schedule that cannot work: pairs out of
  order, a resolution the patch does not divide, a ratio outside (0, 1) or leaving no patch."""

  def resolution(name, size):
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= patch_size
            and size % patch_size == 0):
      raise ConfigError(f"{name}: resolution {size!r} is not a positive multiple of the "
                        f"patch size {patch_size}")

  def ratio(name, r):
    if not (_number(r) and 0 < r < 1):
      raise ConfigError(f"{name}: mask ratio {r!r} must be in (0, 1)")

  sizes = [s for _, s in _pairs(config, "resolution", resolution)] or [config.data.image_size]
  ratios = [r for _, r in _pairs(config, "mask_ratio", ratio)] or [config.model.mask_ratio]
  for size in sizes:
    for r in ratios:
      patches = (size // patch_size)**2
      if int(patches * (1 - r)) < 1:  # masking.num_visible
        raise ConfigError(f"config.schedule: mask ratio {r:g} leaves no visible patch of "
                          f"the {patches} at {size} px")


def of(config, total_steps):
  """The run's stages, in order, covering steps 1 ... total_steps (one stage where the
  schedule is empty). A fraction f starts at step round(f * total_steps) + 1; a stage
  that rounds to no step is dropped."""
  sizes = tuple(config.get("schedule", {}).get("resolution") or ()) or (
      (0.0, config.data.image_size),)
  ratios = tuple(config.get("schedule", {}).get("mask_ratio") or ()) or (
      (0.0, config.model.mask_ratio),)

  def at(pairs, step):  # the value of the last pair starting at or before `step`
    return [v for f, v in pairs if round(f * total_steps) <= step][-1]

  bounds = sorted({round(f * total_steps) for f, _ in sizes + ratios} | {total_steps})
  return [Stage(a, b, at(sizes, a), float(at(ratios, a)))
          for a, b in zip(bounds, bounds[1:]) if b > a]


def stage_at(stages, step):
  """The stage that trains step `step` (1-based, as the loop counts)."""
  return next(s for s in stages if s.start < step <= s.end)
