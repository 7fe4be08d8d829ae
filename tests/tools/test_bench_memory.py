"""tools/bench_memory.py's reading of /proc/[pid]/status and its summary line (the measurement itself is a tool run,
not a test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_memory import Resident, Run, main, summary  # noqa: E402

STATUS = """Name:\tpython
VmPeak:\t 5000000 kB
VmRSS:\t 1228800 kB
RssAnon:\t  983040 kB
RssFile:\t  245760 kB
RssShmem:\t       0 kB
"""


def test_resident_memory_is_read_from_the_status_fields_in_mib():
    assert Resident.parse(STATUS) == Resident(1200.0, 960.0, 240.0)


def test_a_status_without_the_fields_is_an_error():
    with pytest.raises(KeyError):
        Resident.parse("Name:\tpython\n")


def test_the_summary_gives_ranges_over_runs():
    runs = [Run(Resident(900, 800, 100), Resident(1181, 945, 236), 570, 1.2),
            Run(Resident(901, 801, 100), Resident(1186, 950, 236), 570, 1.3)]
    line = summary("b", runs)
    assert line.startswith("b: resident 1181-1186 MB (anonymous 945-950, file 236); at load 900-901 MB")
    assert line.endswith("570-token prompt median 1.25 s")


def test_pythonpath_is_given_once_or_once_per_build(capsys):
    with pytest.raises(SystemExit):
        main(["a", "b", "c", "--pythonpath", "x", "--pythonpath", "y"])
    assert "once per build (3), not 2 times" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_a_run_on_a_tiny_build_reports_its_memory(tiny_build, capsys):
    build = tiny_build("llama")
    assert main([str(build), "--runs", "1", "--prompt-words", "20"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{build}: resident ") and "-token prompt median" in last
