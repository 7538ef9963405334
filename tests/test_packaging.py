"""The built wheel carries what an installed jaxinfer needs at run time."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxinfer.rules import RULES_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_rules_tables(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("jaxinfer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for table in sorted(p.name for p in (ROOT / "sharding_rules").glob("*.toml")):
        assert f"jaxinfer/sharding_rules/{table}" in names
    assert "jaxinfer/model/transformer.py" in names
    assert "jaxinfer/convert/gguf.py" in names


def test_rules_dir_found():
    assert (RULES_DIR / "tp_mlp.toml").is_file()
