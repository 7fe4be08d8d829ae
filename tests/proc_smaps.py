"""What /proc/self/smaps says about the mapping that holds an address (Linux): for tests of where memory lives."""

from __future__ import annotations

import sys


def smaps_field(address: int, field: str) -> str:
    """The value of `field` (e.g. "Rss", "VmFlags") for the mapping holding `address`, as smaps writes it."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == f"{field}:":
                return rest.strip()
    raise AssertionError(f"{address:#x} is in no mapping, or its smaps entry has no {field}")


def resident_bytes(address: int) -> int:
    """Rss of the mapping holding `address`."""
    value, unit = smaps_field(address, "Rss").split()
    assert unit == "kB", unit
    return int(value) * 1024


def vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping holding `address` ('hg': huge pages asked for by madvise)."""
    return smaps_field(address, "VmFlags").split()


def thp_offered() -> bool:
    """Whether this kernel hands out transparent huge pages at all (on request or always)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False
