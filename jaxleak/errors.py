"""Exceptions raised by jaxleak.

Every error a user can cause derives from :class:`JaxleakError`, so callers can
catch one type; the CLI turns these into a one-line message and exit code 2.
"""

from __future__ import annotations


class JaxleakError(Exception):
    """Base class of all errors caused by user input or configuration."""


class InputError(JaxleakError, ValueError):
    """An array given to jaxleak has the wrong shape, dtype, length or values."""


class UnknownNameError(JaxleakError, KeyError):
    """A model, data set, layer or measure name is not known."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataUnavailableError(JaxleakError, RuntimeError):
    """A data set exists but is not prepared on this machine."""


class NonFiniteError(JaxleakError, FloatingPointError):
    """A gradient or measure came out NaN or infinite."""


class ConfigError(JaxleakError, ValueError):
    """A configuration file or option is invalid."""


class OutOfMemoryError(JaxleakError, MemoryError):
    """A measure ran out of (accelerator or host) memory; a smaller --chunk-size or --inversion-n may fit."""
