"""The project's named errors: exceptions whose message is complete on its own (it names the
file, key or model, what went wrong and what to do), so that a job prints the message alone,
without the traceback in front of it (`iisan.pipeline.jobs.job`). Any other exception escaping a job is
unexpected and keeps its traceback.

A named error subclasses `NamedError`, or is listed in `NAMED` by its module and class name
(the classes defined before the marker; their modules are not imported here, so that a job's
setup imports nothing heavy). A subclass of a named error is named too.
"""

from __future__ import annotations


class NamedError(Exception):
    """Marker base of the project's errors whose message says everything the user needs."""


# module.Class of the named errors that do not subclass NamedError (tests/test_messages.py checks
# that each still exists and is an exception class)
NAMED = frozenset({
    "iisan.encoders.backbones.MissingExtra",  # names the backbone and what to install
    "iisan.encoders.cache_files.CacheError",  # and CacheMismatch: names the file and the field
    "iisan.captions.files.CaptionError",  # and CaptionMismatch: names the file or setting
    "iisan.data.errors.DataError",  # and iisan.data.frames.VideoError: names the file and line, item or video
    "iisan.data.download.ChecksumError",  # names the file and both checksums
    "iisan.data.download.MissingSource",  # names the raw file and how to supply it
    "iisan.pipeline.gpus.LockUnsupported",  # names the lock folder and what to set
    "iisan.encoders.models_fetch.ModelFetchError",  # names the model, its page and what to do
    "iisan.encoders.parts.PartsError",  # names the file
    "iisan.encoders.parts.MissingParts",  # names the package and how to install it
})


def is_named(err: BaseException) -> bool:
    """Whether `err` is one of the project's named errors (`NamedError`, or a class in `NAMED`,
    or a subclass of either)."""
    return any(cls is NamedError or f"{cls.__module__}.{cls.__qualname__}" in NAMED for cls in type(err).__mro__)


def message(err: BaseException) -> str:
    """What a named error says: its message and any notes added to it."""
    return "\n".join([str(err), *getattr(err, "__notes__", ())])
