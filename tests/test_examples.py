"""The spec's examples run unchanged: each exits 0 within 30 s and prints its story."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "basic").glob("0*.py"))

EXPECTED_OUTPUT = {
    "01_end_to_end.py": "value='Hello, World!'",
    "02_eta_delayed_execution.py": "Third task ran at",
    "03_bounded_concurrency.py": "At most 2 tasks ran at once",
    "04_failures_and_tracebacks.py": "ZeroDivisionError: division by zero",
    "05_sync_client_with_worker.py": "Task ",
}


def test_the_five_spec_examples_are_present() -> None:
    assert [path.name for path in EXAMPLES] == sorted(EXPECTED_OUTPUT)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(example)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert EXPECTED_OUTPUT[example.name] in done.stdout
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir()), "examples clean up their temporary database"
