"""TEST-ONLY fault injection: kill this process at a named step of a run.

`CKPTBEAM_FAULT=<point>[@<n>]:<kill|term>` makes the n-th arrival (default the first) at
`point(<point>)` in this process send itself SIGKILL (`kill`) or SIGTERM (`term`). The fault tests
(tests/test_faults.py) use it to stop a run exactly between two steps and then check that the old
output or the new one is there, never a mix. Unset (always, outside those tests) a point costs one
comparison. The points, in run order:

    plan          planning is done, nothing at OUT has been touched (launcher)
    item          a work item has been written and reported (worker; `item@3`: the third)
    stitch        convert: databases merged, not committed; export: files written, not published
    swap          the new output is in place, the old one not yet deleted (local publish)
    force_delete  gs:// --force: the old output's completion markers are deleted, its data not yet
"""

from __future__ import annotations

import os
import signal

ENV = "CKPTBEAM_FAULT"
_SPEC = os.environ.get(ENV) or None
_arrivals: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, signal.Signals]:
    """'item@3:term' -> ('item', 3, SIGTERM)."""
    where, _, action = spec.rpartition(":")
    name, _, nth = where.partition("@")
    signals = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
    if not name or action not in signals:
        raise ValueError(f"{ENV}={spec!r}: expected <point>[@<n>]:<kill|term>")
    return name, int(nth or 1), signals[action]


def point(name: str) -> None:
    """A named step of a run; does nothing unless CKPTBEAM_FAULT names it."""
    if _SPEC is None:
        return
    target, nth, sig = parse(_SPEC)
    if name != target:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] == nth:
        os.kill(os.getpid(), sig)
