"""How many SMS parts a text takes: GSM-7 (160 / 153 septets) or UCS-2 (70 / 67 code units).

GSM 03.38 extension characters cost two septets (escape + char) and an escape pair never
straddles two parts; in UCS-2 a character outside the BMP (most emoji) is a surrogate pair,
two code units, which likewise never straddles parts.
"""

from __future__ import annotations

from dataclasses import dataclass

GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = set("^{}\\[~]|€\f")

_GSM7_ALL = frozenset(GSM7_BASIC | GSM7_EXTENSION)
_GSM7_ONE = frozenset(GSM7_BASIC)  # one septet each

SINGLE = {"gsm7": 160, "ucs2": 70}
MULTI = {"gsm7": 153, "ucs2": 67}
_ALWAYS_ONE = SINGLE["ucs2"] // 2  # characters that fit one part whatever they are (none costs over 2 units)


@dataclass(frozen=True)
class Segments:
    encoding: str  # "gsm7" or "ucs2"
    units: int  # septets (gsm7) or UTF-16 code units (ucs2)
    count: int  # parts the text takes (0 for an empty text)
    parts: tuple[str, ...]  # the text split as a handset would receive it


def is_gsm7(text: str) -> bool:
    return _GSM7_ALL.issuperset(text)


def _unit_cost(ch: str, encoding: str) -> int:
    if encoding == "gsm7":
        return 2 if ch in GSM7_EXTENSION else 1
    return 2 if ord(ch) > 0xFFFF else 1


def _units(text: str, encoding: str) -> int:
    """What _unit_cost sums over the text, counted in C (bulk loads count every row's text)."""
    if encoding == "gsm7":
        return len(text) + sum(text.count(ch) for ch in GSM7_EXTENSION)
    return len(text.encode("utf-16-le")) // 2


def split(text: str) -> Segments:
    """Split `text` into the parts it would be sent as."""
    if _GSM7_ONE.issuperset(text):  # the common case: no extension character, a septet a character
        encoding, units = "gsm7", len(text)
    else:
        encoding = "gsm7" if is_gsm7(text) else "ucs2"
        units = _units(text, encoding)
    if not text:
        return Segments(encoding, 0, 0, ())
    if units <= SINGLE[encoding]:
        return Segments(encoding, units, 1, (text,))
    per_part = MULTI[encoding]
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for ch in text:
        cost = _unit_cost(ch, encoding)
        if used + cost > per_part:  # the whole character (escape pair / surrogate pair) moves on
            parts.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += cost
    parts.append("".join(current))
    return Segments(encoding, units, len(parts), tuple(parts))


def count_segments(text: str) -> Segments:
    return split(text)


def count(text: str) -> int:
    """How many parts `text` takes: split(text).count, without splitting a text that fits in one
    part (the common case; send_many() counts every message's)."""
    if not text:
        return 0
    if len(text) <= _ALWAYS_ONE or (len(text) <= SINGLE["gsm7"] and _GSM7_ONE.issuperset(text)):
        return 1
    return split(text).count
