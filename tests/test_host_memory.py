"""Host memory as the committee's pinned copies see it: MemAvailable, not physical RAM, bounds what is pinned."""
from __future__ import annotations

import pytest

from moetandem.experts import swapper
from moetandem.host_memory import host_memory

GIB = 2**30


def test_host_memory_reads_this_machine() -> None:
    avail, total = host_memory()
    assert 0 < avail <= total


@pytest.mark.parametrize("avail, ram, mapped, want", [
    (120, 128, True, 36),  # plenty available: the whole copy (36 GiB) may be pinned
    (38, 128, True, 28.5),  # /dev/shm holding ~90 GiB: 3/4 of the 38 available, not 3/4 of 128 (96) as before
    (120, 128, False, 32),  # a cache of copies: a quarter of RAM
    (20, 128, False, 10),  # ... and at most half of what is available
])
def test_pinned_cap_follows_available_memory(avail: float, ram: float, mapped: bool, want: float,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOETANDEM_PINNED_BYTES", raising=False)
    monkeypatch.setattr(swapper, "host_memory", lambda: (int(avail * GIB), int(ram * GIB)))
    assert swapper.pinned_cap(36 * GIB, mapped=mapped) == int(want * GIB)


def test_pinned_cap_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOETANDEM_PINNED_BYTES", str(5 * GIB))
    monkeypatch.setattr(swapper, "host_memory", lambda: (1, 2))
    assert swapper.pinned_cap(36 * GIB, mapped=True) == 5 * GIB
