"""Refuse host allocations sized by the user before making them: `check_host_bytes(n, what)`
raises a ValueError naming `what` when `n` bytes exceed the memory the OS reports available
(`MemAvailable` of /proc/meminfo; elsewhere the physical memory), instead of a MemoryError
traceback (or the OOM killer) after part of the work."""
from __future__ import annotations

import os


def available_bytes() -> int | None:
    """Memory available for new allocations, or None when the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def check_host_bytes(nbytes: int, what: str) -> None:
    """ValueError when `nbytes` (an estimate of what `what` will allocate on this host) exceeds
    the available memory."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} needs about {_gib(nbytes)} of host memory but only {_gib(avail)} is available; "
                         "refusing before allocating (use smaller sizes)")
