"""Host RAM as the loaders see it: what is still available (MemAvailable: free memory plus the page cache and other
memory the kernel can reclaim; a tmpfs such as /dev/shm is not reclaimable and is not counted) and the total."""
from __future__ import annotations

import os
from pathlib import Path


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of host RAM, from /proc/meminfo, else sysconf (free pages: a lower bound)."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = info.get("MemTotal") or page * os.sysconf("SC_PHYS_PAGES")
        avail = info.get("MemAvailable") or page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX) and no /proc: nothing known
        return 0, 0
    return int(avail), int(total)
