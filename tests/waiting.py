"""Polling with a deadline: the only way tests wait (no sleeps as synchronisation)."""

from postroom_cli.local import wait_until

__all__ = ["wait_until"]
