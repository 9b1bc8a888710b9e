"""dispatcher: send SMS through many providers reliably and fast.

    import dispatcher
    msg = dispatcher.send("alerts", "+14155550123", "Your code is 482910")
    dispatcher.get(msg.id).status
"""

from .api import Attempt, Event, Message, cancel, get, send, send_many
from .recurring import add_schedule, list_schedules, remove_schedule
from .errors import (
    BrokerUnavailable,
    ConfigError,
    DispatcherError,
    InvalidAddress,
    InvalidOption,
    InvalidTime,
    MissingField,
    NotFound,
    TextTooLong,
    TooLate,
    UnknownProvider,
    ValidationError,
)

__all__ = [
    "Attempt",
    "BrokerUnavailable",
    "ConfigError",
    "DispatcherError",
    "Event",
    "InvalidAddress",
    "InvalidOption",
    "InvalidTime",
    "Message",
    "MissingField",
    "NotFound",
    "TextTooLong",
    "TooLate",
    "UnknownProvider",
    "ValidationError",
    "add_schedule",
    "cancel",
    "get",
    "list_schedules",
    "remove_schedule",
    "send",
    "send_many",
]
__version__ = "0.1.0"
