"""Checks of the values a user gives, shared by every layer: a bad value is one
ConfigError("config.FIELD: why"), raised before any long work starts. Also what the host
has (TPU chips), read without JAX.
"""
import math
import os


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line naming the field."""


def check(ok, field, message):
  """Raise ConfigError("config.FIELD: message") unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def check_choice(value, field, valid):
  check(value in valid, field,
        f"{value!r} is not valid; valid values: {', '.join(map(str, valid))}")


def is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def is_number(x):
  """A finite int or float (not a bool, NaN or infinity)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_int(value, field, minimum, optional=False):
  check((optional and value is None) or (is_int(value) and value >= minimum), field,
        f"{value!r} must be an int >= {minimum}" + (" (or None)" if optional else ""))


def check_number(value, field, minimum, *, strict=False, below=None, optional=False):
  """A finite number >= minimum (> where strict), < below where given."""
  ok = is_number(value) and (value > minimum if strict else value >= minimum)
  ok = ok and (below is None or value < below)
  low = f"{'>' if strict else '>='} {minimum}"
  expected = f"in [{minimum}, {below})" if below is not None else low
  check((optional and value is None) or ok, field,
        f"{value!r} must be a finite number {expected}" + (" (or None)" if optional else ""))


GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips


def has_tpu_chips(pci_devices="/sys/bus/pci/devices"):
  """Whether this host has a PCI device of Google's (a TPU chip)."""
  try:
    names = os.listdir(pci_devices)
  except OSError:
    return False
  for name in names:
    try:
      with open(os.path.join(pci_devices, name, "vendor")) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False
