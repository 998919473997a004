"""Floor 0: the errors that carry the name of the option or config key they are about.

No torch, no convflat imports: the torch-free option modules (:mod:`convflat.train_config`,
:mod:`convflat.model_spec`) raise :class:`OptionError`, and the config checks of
:mod:`convflat.study` turn it into a :class:`ConfigError` with the full dotted key. A caller
reads ``err.key``; nothing parses the key back out of the message.
"""

from __future__ import annotations

__all__ = ["ConfigError", "OptionError"]


class OptionError(ValueError):
    """A bad value of one named option of a spec or a settings object.

    Attributes:
        key: the option's name inside its object (``"dropout"``, ``"warmup_epochs"``).
        message: the whole message (``str(err)``), which names the option in its own words.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


class ConfigError(ValueError):
    """A config that validates against the schema but describes an impossible study.

    Attributes:
        key: the dotted path of the offending config key
            (``studies.digits.measure.params.hutchinson_trace.probes``), or None when no
            single key is at fault.
        message: what is wrong with it.

    ``str(err)`` is ``invalid config: config key '<key>': <message>``.
    """

    def __init__(self, key: str | None = None, message: str = ""):
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key is None:
            return f"invalid config: {self.message}"
        return f"invalid config: config key '{self.key}': {self.message}"

    def __reduce__(self):  # picklable with keyword-only state
        return (type(self), (self.key, self.message))
