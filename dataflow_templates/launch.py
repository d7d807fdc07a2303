"""Flex Template entry point: plan on the launcher, submit the Beam job, return.

The stitch and commit run inside the pipeline, so the launcher does not need to wait for the job.
"""

import logging
import sys

from pipelines.convert import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run(sys.argv[1:])
