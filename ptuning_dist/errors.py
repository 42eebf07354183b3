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


class UpstreamError(PTuningError, RuntimeError):
    """An upstream library (megatron-core, DeepSpeed, torch) is not what a compatibility fix in
    ``ptuning_dist/compat/`` was written against: the message says what changed and what to do."""


def upstream(ok: bool, what: str) -> None:
    """Check an upstream invariant a fix relies on (an ``assert`` would vanish under ``python -O``)."""
    if not ok:
        raise UpstreamError(f"{what}; ptuning_dist/compat/ was written against the pinned versions in "
                            "pyproject.toml: install those, or re-check the fix against this version")
