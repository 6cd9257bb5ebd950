"""The nightly release gate as a Ray job: audit the newest checkpoint on the protected set, compare it
with the model audited before it, write a report, and exit 1 when the comparison violates the policy.

    ray job submit --working-dir . -- python jobs/nightly.py \
        --checkpoints-prefix s3://bucket/checkpoints --protected 's3://bucket/protected/{00000..00009}.tar' \
        --catalog s3://bucket/memray-catalog --report /reports/nightly.html

The flags and exit codes: memray.nightly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the repository is the working directory, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memray.formatting import log_to_stderr  # noqa: E402
from memray.nightly import main  # noqa: E402

if __name__ == "__main__":
    log_to_stderr(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")  # ids and paths escaped
    sys.exit(main())
