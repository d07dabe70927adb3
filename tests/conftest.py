import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `from tests.tiny_llama import ...` without installing tests


@pytest.fixture
def write(tmp_path):
    """write("a/b.yaml", text) -> the path, folders created."""
    def _write(rel, text):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    return _write
