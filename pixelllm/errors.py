"""Errors that describe a problem with what the user gave; the CLI prints them as one line."""


class PixelLLMError(Exception):
    """Base class: a problem with the user's input, config, data or checkpoint (CLI exit status 2)."""


class ConfigError(PixelLLMError):
    """A configuration that cannot build a model (unknown preset, mismatched widths, bad field)."""


class CheckpointError(PixelLLMError):
    """A checkpoint directory that is missing files or does not match its config."""


class InputError(PixelLLMError):
    """An unusable image, prompt box or point, or text."""


class DataError(PixelLLMError):
    """A dataset file that cannot be read at all (single bad records are skipped and counted)."""
