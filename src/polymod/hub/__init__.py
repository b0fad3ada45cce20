"""The module hub: the on-disk module format, and (later) the store, server and client."""

from polymod.hub.format import load, save

__all__ = ["load", "save"]
