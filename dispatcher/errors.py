"""One exception tree for the whole dispatcher.

    DispatcherError
     +-- ConfigError            the TOML file or environment is wrong (names key and line)
     +-- ValidationError        a send was refused before anything was stored (names the field)
     |    +-- InvalidAddress    `to` is not in the form the provider kind addresses
     |    +-- TextTooLong       the text exceeds what the kind accepts
     |    +-- MissingField      a required field (or option) is absent
     |    +-- InvalidOption     an option is unknown or has a bad value
     |    +-- InvalidTime       a naive datetime, or a window that cannot be met
     +-- UnknownProvider        send() named an account that is not configured
     +-- NotFound               no message has that id
     +-- TooLate                cancel() of a message already handed to the provider
     +-- BrokerUnavailable      Redis could not be reached to enqueue
"""

from __future__ import annotations


class DispatcherError(Exception):
    """Base of every error the dispatcher raises on purpose."""


class ConfigError(DispatcherError):
    """The configuration is invalid; the message names the key (and line when known)."""


class ValidationError(DispatcherError, ValueError):
    """Input refused before anything was stored or queued.

    `field` names the offending field, `rule` says what it must be.
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class InvalidAddress(ValidationError):
    pass


class TextTooLong(ValidationError):
    pass


class MissingField(ValidationError):
    pass


class InvalidOption(ValidationError):
    pass


class InvalidTime(ValidationError):
    pass


class UnknownProvider(ValidationError):
    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none configured"
        super().__init__("provider", f"no provider account named {name!r} (configured: {listed})")


class NotFound(DispatcherError, LookupError):
    pass


class TooLate(DispatcherError):
    """The message has already been handed to the provider and cannot be recalled."""


class BrokerUnavailable(DispatcherError):
    pass
