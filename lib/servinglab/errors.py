"""The library's own exception types.

Every error a user can cause or meet carries the place it comes from (a file, a key, a layer, a log) in
its message, so that a batch that stops says where to look without a traceback.
"""

from __future__ import annotations


class ServinglabError(Exception):
    """Base class of every error raised on purpose by servinglab."""


class ParamsError(ServinglabError):
    """A study file, override file or ``--set`` value is invalid.

    Raised before anything is built, deployed or started.
    """


class ModelBuildError(ServinglabError):
    """The local model directory could not be built or is not usable."""


class PlatformError(ServinglabError):
    """A platform could not deploy, reach or stop a layer."""


class KubeconfigError(ParamsError, PlatformError):
    """The kubeconfig named by the study or the environment cannot be read as one.

    Bad input like a study file (the command refuses before starting anything), and a platform error for
    callers that catch those.
    """


class UnsupportedLayerError(PlatformError):
    """The platform cannot host this kind of layer (for example KServe on ``local``)."""


class ServerStartError(PlatformError):
    """A local engine process exited or missed its deadline before it was ready."""


class RunDirError(ServinglabError):
    """A run directory is missing, incomplete or of an unknown schema version."""


class SmokeCheckError(ServinglabError):
    """A layer did not show the behaviour the smoke test expects of it."""


class RunnerError(ServinglabError):
    """A notebook of the batch failed; the message names its executed copy."""


class RunBusyError(ServinglabError):
    """Another batch of the same study is executing; refused before anything starts (the message names it)."""
