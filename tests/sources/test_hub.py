"""Hub sources through huggingface_hub, against a real HTTP stand-in for the Hub (tests/hub_server.py)."""

import socket

import pytest

from ane_build.sources import hub as hub_source
from ane_build.util.errors import UserError

SHA0 = "0" * 40


@pytest.fixture
def repo(tmp_path):
    """A small repo's files: two the recipe wants, one in a folder, one it does not."""
    folder = tmp_path / "repo"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 5000)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"b" * 100)
    return folder


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def one_line(call, *args):
    with pytest.raises(UserError) as e:
        call(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_commit_resolves_to_itself_without_asking_the_hub(hub):
    assert hub_source.commit("org/tiny", SHA0) == SHA0
    assert hub.requests == []


def test_a_branch_resolves_to_where_it_points_now(hub, repo):
    first = hub.push("org/tiny", repo)
    assert hub_source.commit("org/tiny", "main") == first
    (repo / "config.json").write_text('{"dim": 1}')
    second = hub.push("org/tiny", repo)
    assert second != first and hub_source.commit("org/tiny", "main") == second
    assert not hub_source.is_commit("main") and hub_source.is_commit(first)


def test_download_copies_the_commits_matching_files_only(hub, repo, tmp_path):
    sha = hub.push("org/tiny", repo)
    hub_source.download("org/tiny", sha, None, tmp_path / "all")
    assert files_under(tmp_path / "all") == files_under(repo)
    # The cache's snapshot now holds every file; a narrower fetch still copies only its own.
    hub_source.download("org/tiny", sha, ["*.json", "*.safetensors"], tmp_path / "some")
    assert files_under(tmp_path / "some") == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert (tmp_path / "some" / "model.safetensors").read_bytes() == b"w" * 5000
    assert not (tmp_path / "some" / "model.safetensors").is_symlink()


def test_a_gated_repo_is_one_line_and_its_token_opens_it(hub, repo, tmp_path):
    sha = hub.push("org/gated", repo, token="s3cret")
    msg = one_line(hub_source.download, "org/gated", sha, None, tmp_path / "out")
    assert msg == (f"source.hf: org/gated on {hub.url} is gated: accept its terms there, and set HF_TOKEN "
                   "to a token of that account")
    hub.setenv(HF_TOKEN="not-it")  # a token without access: the Hub answers 403, not 401
    assert one_line(hub_source.download, "org/gated", sha, None, tmp_path / "out") == msg
    hub.setenv(HF_TOKEN="s3cret")
    hub_source.download("org/gated", sha, None, tmp_path / "out")
    assert files_under(tmp_path / "out") == files_under(repo)


def test_a_missing_repo_is_one_line(hub, tmp_path):
    expected = f"source.hf: no model repo org/nope on {hub.url} (if it is private, set HF_TOKEN)"
    assert one_line(hub_source.commit, "org/nope", "main") == expected
    assert one_line(hub_source.download, "org/nope", SHA0, None, tmp_path / "out") == expected


def test_a_missing_revision_is_one_line(hub, repo, tmp_path):
    hub.push("org/tiny", repo)
    expected = f"source.revision: org/tiny on {hub.url} has no revision "
    assert one_line(hub_source.commit, "org/tiny", "v2") == expected + "'v2'"
    assert one_line(hub_source.download, "org/tiny", SHA0, None, tmp_path / "out") == expected + f"'{SHA0}'"


def test_globs_matching_nothing_are_one_line(hub, repo, tmp_path):
    sha = hub.push("org/tiny", repo)
    msg = one_line(hub_source.download, "org/tiny", sha, ["*.gguf"], tmp_path / "out")
    assert msg == f"source.files: org/tiny has no files matching *.gguf at {sha}"


def test_offline_a_cached_commit_is_fetched_and_anything_else_is_one_line(hub, repo, tmp_path):
    sha = hub.push("org/tiny", repo)
    hub_source.download("org/tiny", sha, None, tmp_path / "online")
    hub.setenv(HF_HUB_OFFLINE="1")
    asked = len(hub.requests)
    hub_source.download("org/tiny", sha, None, tmp_path / "offline")  # from huggingface_hub's cache
    assert files_under(tmp_path / "offline") == files_under(repo) and len(hub.requests) == asked
    unreachable = f"source.hf: org/tiny: the Hub at {hub.url} cannot be reached (HF_HUB_OFFLINE is set), "
    assert one_line(hub_source.download, "org/tiny", SHA0, None, tmp_path / "out") == (
        unreachable + f"and the Hugging Face cache does not hold commit {SHA0}")
    assert one_line(hub_source.commit, "org/tiny", "main") == (
        unreachable + "so revision 'main' cannot be resolved to its commit")


def test_no_server_listening_is_one_line(hub):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    hub.setenv(HF_ENDPOINT=closed)
    msg = one_line(hub_source.commit, "org/tiny", "main")
    assert msg.startswith(f"source.hf: org/tiny: the Hub at {closed} cannot be reached (")
    assert msg.endswith("), so revision 'main' cannot be resolved to its commit")
