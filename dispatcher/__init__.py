"""dispatcher: send SMS through many providers reliably and fast.

    import dispatcher
    msg = dispatcher.send("alerts", "+14155550123", "Your code is 482910")
    dispatcher.get(msg.id).status
"""

from .api import Attempt, Event, Message, cancel, get, send, send_many
from .recurring import add_schedule, list_schedules, remove_schedule
from .campaigns import (
    Campaign,
    CampaignRefused,
    campaign,
    campaign_status,
    cancel_campaign,
    list_campaigns,
    pause_campaign,
    resume_campaign,
)
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
    "Campaign",
    "CampaignRefused",
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
    "campaign",
    "campaign_status",
    "cancel",
    "cancel_campaign",
    "get",
    "list_campaigns",
    "list_schedules",
    "pause_campaign",
    "remove_schedule",
    "resume_campaign",
    "send",
    "send_many",
]
__version__ = "0.1.0"
