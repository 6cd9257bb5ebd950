"""What the house promises about itself: the schema version the docs state is the code's, and the
configuration, the help and the catalog's read side load without torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memray.catalog.schema import SCHEMA_VERSION

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("document", "pattern"),
    [("docs/catalog.md", r"## Rows \(schema version (\d+)\)"), ("README.md", r"schema\.py \(version (\d+)\)")],
)
def test_the_documented_schema_version_is_the_codes(document, pattern):
    stated = re.findall(pattern, (REPO / document).read_text())
    assert stated and all(int(v) == SCHEMA_VERSION for v in stated), (document, stated, SCHEMA_VERSION)


@pytest.mark.parametrize("module", ["memray.config", "memray.cli", "memray.catalog.reader", "memray.auditing.registry"])
def test_a_module_that_needs_no_model_loads_without_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0, f"{module} imports torch"
