import pytest

from tests.runtime.tiny_programs import build_twin, export_add_one, export_without_metadata, write_checkpoint


@pytest.fixture(scope="session")
def twin(tmp_path_factory):
    """twin(name) -> path of that tiny twin.pte, built once per session when first asked for."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_twin(tmp_path_factory.mktemp(name), name)
        return built[name]
    return get


@pytest.fixture(scope="session")
def bare_pte(tmp_path_factory):
    return export_without_metadata(tmp_path_factory.mktemp("bare") / "bare.pte")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def coreml_pte(tmp_path_factory):
    return export_add_one(tmp_path_factory.mktemp("coreml") / "model.pte", coreml=True)
