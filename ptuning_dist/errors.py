"""Errors a user can act on. Each message names the field, file, line or template at fault."""


class PTuningError(Exception):
    """Base class: bad input from the user (config, data, template, checkpoint, flags)."""


class ConfigError(PTuningError, ValueError):
    """A run config or DeepSpeed config field is missing, unknown or contradictory."""


class TemplateError(PTuningError, ValueError):
    """A template cannot be parsed, or a data row does not fit its template."""


class DataError(PTuningError, ValueError):
    """A data file is missing or a row is malformed."""


class CheckpointError(PTuningError, ValueError):
    """A checkpoint or exported prompt table is corrupt or belongs to another backbone."""
