"""Registry of provider kinds: kind name -> adapter class, imported on first use."""

from __future__ import annotations

import importlib

from .base import Adapter

_KINDS = {
    "esimfly": "dispatcher.providers.esimfly:EsimflyAdapter",
    "esimaccess": "dispatcher.providers.esimaccess:EsimAccessAdapter",
    "emnify": "dispatcher.providers.emnify:EmnifyAdapter",
    "esms_africa": "dispatcher.providers.esms_africa:EsmsAfricaAdapter",
    "emsgnow": "dispatcher.providers.emsgnow:EmsgnowAdapter",
}


def known_kinds() -> list[str]:
    return list(_KINDS)


def adapter_class(kind: str) -> type[Adapter]:
    module, _, name = _KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)
