"""The distributed audit as a Ray job.

    ray job submit --working-dir . -- python jobs/audit.py \
        's3://bucket/laion/{00000..00099}.tar' --model /ckpt/sd-v1-4 --catalog s3://bucket/memray-catalog

Same arguments as `memray audit` (which starts a local Ray on demand); under `ray job submit`
it joins the job's cluster. Rerunning the same command resumes: audited images are skipped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the repository is the working directory, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memray.cli import main  # noqa: E402
from memray.formatting import log_to_stderr  # noqa: E402

if __name__ == "__main__":
    log_to_stderr(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")  # ids and paths escaped
    sys.exit(main(["audit", *sys.argv[1:]]))
