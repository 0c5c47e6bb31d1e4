"""`python -m resnest_train.models`: the table's values (written down from real builds and forwards on CPU)
and its speed (the meta device: no weights, no arithmetic)."""

from __future__ import annotations

import contextlib
import io
import time

from resnest_train.models.__main__ import main

# name -> (params in M, GMACs, resolution): the table printed by real builds and CPU forwards (torch 2.14.1).
TABLE = {
    "resnest101": (48.28, 13.32, 256),
    "resnest14": (10.61, 2.75, 224),
    "resnest200": (70.20, 35.52, 320),
    "resnest26": (17.07, 3.62, 224),
    "resnest269": (110.93, 77.35, 416),
    "resnest50": (27.48, 5.37, 224),
    "resnest50_1s1x64d": (26.22, 5.37, 224),
    "resnest50_1s2x40d": (25.95, 5.18, 224),
    "resnest50_1s4x24d": (25.68, 4.99, 224),
    "resnest50_2s1x64d": (27.48, 5.37, 224),
    "resnest50_2s2x40d": (26.94, 5.18, 224),
    "resnest50_4s1x64d": (31.91, 5.38, 224),
    "resnest50_4s2x40d": (30.42, 5.18, 224),
    "resnest50_fast_1s1x64d": (26.22, 4.33, 224),
    "resnest50_fast_1s2x40d": (25.95, 4.36, 224),
    "resnest50_fast_1s4x24d": (25.68, 4.40, 224),
    "resnest50_fast_2s1x64d": (27.48, 4.33, 224),
    "resnest50_fast_2s2x40d": (26.94, 4.37, 224),
    "resnest50_fast_4s1x64d": (31.91, 4.34, 224),
    "resnest50_fast_4s2x40d": (30.42, 4.37, 224),
    "resnet50d": (25.58, 4.33, 224),
    "seresnet50": (28.09, 4.09, 224),
    "skresnext50_32x4d": (27.48, 4.46, 224),
}


def test_table_of_the_whole_zoo_in_seconds():
    printed = io.StringIO()
    # CPU time, not wall time, so a busy shared machine does not fail the test: real builds and forwards
    # took about 70 s of it for the zoo, the meta device about 7 s.
    start = time.process_time()
    with contextlib.redirect_stdout(printed):
        assert main([]) == 0
    seconds = time.process_time() - start
    header, *rows = printed.getvalue().splitlines()
    assert header.split() == ["model", "params", "(M)", "GMACs", "res"]
    table = {name: (float(params), float(gmacs), int(size))
             for name, params, gmacs, size in (row.split() for row in rows)}
    assert sorted(table) == sorted(TABLE)
    for name, (params, gmacs, size) in TABLE.items():
        assert table[name][0] == params and table[name][2] == size, name
        assert abs(table[name][1] - gmacs) <= 0.01, name
    assert seconds < 20, f"{seconds:.1f} s of CPU time for the table"
