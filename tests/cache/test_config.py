"""ane-build.toml and the environment: where the remote cache is, and a mistake as one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ane_build.cache import config, remote
from ane_build.util.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def settings(tmp_path, text=None, **environ):
    path = tmp_path / "ane-build.toml"
    if text is not None:
        path.write_text(text)
    return config.cache_settings(path, environ)


def test_no_file_and_no_environment_is_no_remote(tmp_path):
    assert settings(tmp_path)[:2] == (None, "readwrite")


def test_the_file_names_the_remote_and_the_environment_overrides_it(tmp_path):
    text = '[cache]\nurl = "s3://bucket/prefix"\nmode = "read"\n'
    url, mode, where = settings(tmp_path, text)
    assert (url, mode) == ("s3://bucket/prefix", "read") and where.endswith("ane-build.toml: cache.url")
    assert settings(tmp_path, text, ANE_BUILD_CACHE="file:///x", ANE_BUILD_CACHE_MODE="readwrite") == (
        "file:///x", "readwrite", "ANE_BUILD_CACHE")
    assert settings(tmp_path, text, ANE_BUILD_CACHE="")[0] is None  # set and empty: no remote cache


@pytest.mark.parametrize("text, environ, message", [
    ('[cache]\nmode = "write"\n', {}, "ane-build.toml: cache.mode: expected one of read, readwrite; got 'write'"),
    ("", {"ANE_BUILD_CACHE_MODE": "rw"}, "ANE_BUILD_CACHE_MODE: expected one of read, readwrite; got 'rw'"),
    ('[cache]\nurll = "s3://b"\n', {}, "ane-build.toml: cache.urll: unknown key (expected url, mode)"),
    ('[remote]\nurl = "s3://b"\n', {}, "ane-build.toml: remote: unknown setting (expected a [cache] table)"),
    ("[cache]\nurl = 3\n", {}, "ane-build.toml: cache.url: expected a string; got 3"),
    ("[cache\n", {}, "ane-build.toml: not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"),
])
def test_a_bad_setting_is_one_error_naming_where(tmp_path, monkeypatch, text, environ, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        settings(tmp_path, text, **environ)
    assert str(e.value) == message


@pytest.mark.parametrize("url, message", [
    ("/abs/path", "expected an fsspec URL such as file:///path, s3://bucket/prefix or gs://bucket/prefix; got '/abs/path'"),
    ("s3://", "expected an fsspec URL such as file:///path, s3://bucket/prefix or gs://bucket/prefix; got 's3://'"),
    ("file://relative/x", "a file:// URL takes an absolute path (file:///...); got 'file://relative/x'"),
    ("nosuch://bucket/x", "unknown protocol nosuch:// in 'nosuch://bucket/x'"),
])
def test_a_bad_url_is_one_error_naming_where(url, message):
    with pytest.raises(UserError) as e:
        remote.open_remote(url, "readwrite", "ANE_BUILD_CACHE")
    assert str(e.value) == f"ANE_BUILD_CACHE: {message}"


def test_ane_build_with_a_bad_cache_setting_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "ane-build.toml").write_text('[cache]\nurl = "s3:/bucket"\n')
    proc = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "status"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("error: ane-build.toml: cache.url: expected an fsspec URL such as file:///path, "
                           "s3://bucket/prefix or gs://bucket/prefix; got 's3:/bucket'\n")


def test_doit_with_a_bad_cache_setting_is_one_line_and_nonzero(tmp_path):
    env = {"ANE_BUILD_RECIPES": str(tmp_path), "ANE_BUILD_ARTIFACTS": str(tmp_path / "a"),
           "ANE_BUILD_CONFIG": str(tmp_path / "none.toml"), "ANE_BUILD_CACHE": "file:///x",
           "ANE_BUILD_CACHE_MODE": "write", "PATH": os.environ["PATH"]}
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "list"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: ANE_BUILD_CACHE_MODE: expected one of read, readwrite; got 'write'\n"
