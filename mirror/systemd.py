"""The service manager's notification protocol (sd_notify) over ``$NOTIFY_SOCKET``, without libsystemd.

systemd passes the address of a unix datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, the watchdog timeout in ``WATCHDOG_USEC``. Each notification
is one datagram of ``KEY=VALUE`` lines. Outside systemd the variables are unset and every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("mirror.systemd")


class Notifier:
    """Sends READY=1, RELOADING=1, STOPPING=1 and WATCHDOG=1 to the service manager."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """The notifier that systemd's variables in ``environ`` set up for ``pid`` (default: this process)."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s is not a unix socket address; not notifying", address)
            address = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 and for_us else None
        return cls(address, watchdog)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half the timeout), or None when no watchdog is set."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec and self.address else None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; return whether it was sent (never raises)."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), target)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager the service is up (it listens); optionally with a status line."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """Tell the manager a configuration reload started; call ``ready()`` when it is done."""
        # systemd >= 253 wants the monotonic time with it, to tell this reload from a later one.
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now}")

    def stopping(self, status: str | None = None) -> bool:
        """Tell the manager the service is shutting down."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def ping(self) -> bool:
        """Keep the watchdog from firing (call every ``watchdog_interval`` seconds)."""
        return self.notify("WATCHDOG=1")
