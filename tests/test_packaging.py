"""pymilter's top-level `milter` module must stay the one `import milter` returns."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import milter
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import milter, mailgate.milter.app; print(milter.__file__); print(hasattr(milter, 'setconn'))"


def test_under_the_test_runner():
    assert milter.__file__ and milter.__file__.endswith(".so")
    assert hasattr(milter, "setconn") and hasattr(milter, "main")


@pytest.mark.e2e
def test_from_the_source_tree_and_elsewhere(tmp_path):
    for cwd in (ROOT, tmp_path):
        result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        path, has_setconn = result.stdout.split()
        assert path.endswith(".so") and has_setconn == "True", (cwd, path)


def test_installed_distribution_has_no_top_level_milter_or_policy():
    files = importlib.metadata.files("mailgate") or []
    top = {f.parts[0] for f in files if f.suffix == ".py"}
    assert "milter" not in top and "policy" not in top
    assert importlib.metadata.entry_points(group="console_scripts", name="mailgate")


@pytest.mark.e2e
def test_console_script_runs():
    result = subprocess.run([str(Path(sys.executable).with_name("mailgate")), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "explain" in result.stdout
