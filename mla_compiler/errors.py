"""User-facing errors: each says what is wrong and how to fix it; the CLI prints one line."""


class MLAError(Exception):
    """Base of every error the CLI reports as one line without a traceback."""


class ConfigError(MLAError):
    """A model config that is missing keys, inconsistent, or of an unsupported kind."""


class WeightError(MLAError):
    """Missing, mis-shaped or mis-typed weights, missing shards, unreadable files."""


class TargetError(MLAError):
    """Unknown target, or an artifact built for another GPU or TVM version."""


class InputError(MLAError):
    """Bad runtime input: token ids outside the vocabulary, empty prompt, context overflow."""


class ArtifactError(MLAError):
    """An artifact directory that is missing, incomplete or corrupt."""


class TuningError(MLAError):
    """A tuning database that cannot be read or written."""


class NumericsError(MLAError):
    """The model computed non-finite logits (NaN / Inf): broken weights or a broken build."""
