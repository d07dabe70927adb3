"""Hugging Face Hub sources: a model repo at one commit, fetched through huggingface_hub.

huggingface_hub does the transfer with its own cache (``HF_HUB_CACHE`` / ``HF_HOME``), its
token (``HF_TOKEN``, or ``hf auth login``) and its endpoint (``HF_ENDPOINT``), all read from
the environment. What this adds: a source names a commit, so a key names the same files
forever; and each way the Hub can fail is one line.

huggingface_hub is imported when a Hub source is used, not with this module: loading
recipes of other sources never pays for it.
"""

import contextlib
import logging
import re
import shutil
from pathlib import Path

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_commit(revision):
    """True for a full commit id (what git names by content); a branch or tag name moves."""
    return bool(_COMMIT.fullmatch(revision))


def commit(repo, revision):
    """The commit ``revision`` names in ``repo``: itself if it is one, else where the Hub says it is now."""
    if is_commit(revision):
        return revision
    from huggingface_hub import HfApi

    with _one_line(repo, revision, f"so revision {revision!r} cannot be resolved to its commit"):
        sha = HfApi().model_info(repo, revision=revision).sha
    log.info("%s: revision %s is commit %s", repo, revision, sha)
    return sha


def download(repo, commit, files, dest):
    """Copy ``repo``'s files at ``commit`` that match ``files`` (globs; None: all) into the folder
    ``dest``, through the Hub's cache (downloaded only when it does not hold them)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    log.info("fetching %s at %s%s", repo, commit, f" ({', '.join(files)})" if files else "")
    with _one_line(repo, commit, f"and the Hugging Face cache does not hold commit {commit}"):
        folder = Path(snapshot_download(repo, revision=commit, allow_patterns=files))
    # The cache's folder for a commit also keeps files that other downloads of it asked for.
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    wanted = sorted(filter_repo_objects(present, allow_patterns=files))
    if not wanted:
        matching = f" matching {', '.join(files)}" if files else ""
        raise UserError("source.files" if files else "source.hf", f"{repo} has no files{matching} at {commit}")
    for rel in wanted:
        target = Path(dest) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, target)  # a copy of the cache's blob, not its symlink


@contextlib.contextmanager
def _one_line(repo, revision, unreachable):
    """huggingface_hub's errors (several lines each, some a traceback) as one UserError line.

    ``unreachable`` ends the message when the Hub cannot be reached: what that leaves undone.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import httpx

    hub = constants.ENDPOINT
    try:
        yield
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise UserError("source.hf", f"{repo} on {hub} is gated: accept its terms there, and set HF_TOKEN "
                                     "to a token of that account") from None
    except RepositoryNotFoundError:  # the Hub answers the same for a private repo without a token
        raise UserError("source.hf", f"no model repo {repo} on {hub} (if it is private, set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError("source.revision", f"{repo} on {hub} has no revision {revision!r}") from None
    except HfHubHTTPError as e:
        raise UserError("source.hf", f"{repo}: {hub} answered HTTP {e.response.status_code}") from None
    except HFValidationError as e:
        raise UserError("source.hf", f"{repo!r} is not a repo id: {_first_line(e)}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError) as e:
        raise UserError("source.hf", f"{repo}: the Hub at {hub} cannot be reached ({_why_unreachable(e)}), "
                                     f"{unreachable}") from None


def _why_unreachable(error):
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    # snapshot_download says "not in the cache" and keeps what kept it from the Hub as the cause.
    while isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    return _first_line(error)


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
