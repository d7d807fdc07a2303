"""`ckptbeam` whose conversions never finish: each process converts one work item, then blocks.

For tests that stop a run midway (Ctrl-C, a killed worker) at a known point, without timing:
the test waits until the progress line shows an item done, then acts.
Run as `python tests/blocking_convert.py convert ARGS...` (the CLI's own main()).
"""

from __future__ import annotations

import sys
import threading

from pipelines import cli
from pipelines.convert import run
from pipelines.graph import ConvertWorkItem


class OneItemThenBlock(ConvertWorkItem):
    """The first work item a process starts is converted; every later one waits forever."""

    started = 0

    def start_attempt(self, item, db_id):
        type(self).started += 1
        if type(self).started > 1:
            threading.Event().wait()  # until the process is interrupted or killed
        return super().start_attempt(item, db_id)


if __name__ == "__main__":
    cli.COMMANDS["convert"] = lambda argv: run(argv, convert_fn=OneItemThenBlock) and 0
    sys.exit(cli.main(sys.argv[1:]))
