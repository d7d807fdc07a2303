"""Hugging Face Hub sources as the Hub's own tools see them: `hf://` URIs, revisions, the local cache.

- URIs: `hf://ORG/REPO[@REVISION][/SUBFOLDER]`, parsed by huggingface_hub's own parser (the grammar
  `HfFileSystem` uses: `refs/pr/N` verbatim, other revisions holding a '/' URL-encoded as `%2F`).
  A plain `ORG/REPO[@REVISION]` that is no local path means the same repository.
- The cache: a repository fetched with `hf download` / `snapshot_download` lives in the Hub cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`) as `models--ORG--REPO/refs/<branch>` (a commit) and
  `snapshots/<commit>/<file>` (links to content-addressed blobs, named by the file's etag).
  With `HF_HUB_OFFLINE=1` sources come from the cache alone; nothing asks the network, and a
  repository or revision that is not cached is an error at once. Online, the revision is resolved
  on the Hub and files of that commit already in the cache are read locally (a commit's files never
  change, so the cached blob is the same bytes the Hub would send).

Environment variables are read when a source is opened, not when huggingface_hub is imported, so a
worker or a test sees the environment it runs in.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ckpt_transforms.storage.sources import LocalSource, SourceError, check_member_name

log = logging.getLogger("ckptbeam")

HF_SCHEME = "hf://"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_PLAIN_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}(@\S+)?$")
_EXPECTED = "expected hf://ORG/REPO, hf://ORG/REPO@REVISION or hf://ORG/REPO@REVISION/SUBFOLDER"
_TRUE = ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HfRef:
    """One model repository location: repo id, revision (None: the default branch), subfolder."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def parse(cls, uri: str) -> HfRef:
        from huggingface_hub.errors import HfUriError
        from huggingface_hub.utils import parse_hf_uri

        text = uri if uri.startswith(HF_SCHEME) else HF_SCHEME + uri
        try:
            parsed = parse_hf_uri(text)
        except HfUriError:
            raise SourceError(f"{uri!r} is not a Hugging Face model URI ({_EXPECTED})") from None
        if parsed.type != "model":
            raise SourceError(f"{uri!r}: only model repositories can be converted ({_EXPECTED})")
        subfolder = parsed.path_in_repo.strip("/")
        if subfolder:
            check_member_name(subfolder, "subfolder")
        return cls(parsed.id, parsed.revision, subfolder)

    def with_revision(self, revision: str | None) -> HfRef:
        """Apply `--revision`; a different `@REVISION` in the URI is a contradiction, not a choice."""
        if not revision:
            return self
        if self.revision is not None and self.revision != revision:
            raise SourceError(
                f"{self.uri()}: the URI asks for revision {self.revision!r} and --revision for {revision!r}; "
                "give one of them"
            )
        return HfRef(self.repo_id, revision, self.subfolder)

    def uri(self, commit: str | None = None) -> str:
        """`hf://ORG/REPO@REV/SUBFOLDER` as HfFileSystem spells it (a '/' in a branch name as %2F)."""
        revision = commit or self.revision
        text = HF_SCHEME + self.repo_id
        if revision is not None:
            special = re.fullmatch(r"refs/(pr/\d+|convert/[\w.-]+)", revision)
            text += "@" + (revision if special else revision.replace("/", "%2F"))
        return text + (f"/{self.subfolder}" if self.subfolder else "")

    def member(self, name: str) -> str:
        """A file name inside the source as a path in the repository."""
        check_member_name(name)
        return f"{self.subfolder}/{name}" if self.subfolder else name


def looks_like_repo_id(text: str) -> bool:
    """A plain 'ORG/REPO[@REV]' (no scheme) that may mean a Hub model, not a relative path."""
    return bool(_PLAIN_REPO_ID.match(text))


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE), as huggingface_hub reads them."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def hub_cache_dir() -> str:
    """The Hub cache directory by huggingface_hub's precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def repo_cache_dir(repo_id: str) -> str:
    return os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))


def cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit the cache holds for `revision` (a commit, or a branch/tag with a refs/ file)."""
    if revision is not None and COMMIT.match(revision):
        return revision
    refs = os.path.join(repo_cache_dir(repo_id), "refs")
    ref = os.path.normpath(os.path.join(refs, revision or "main"))
    if os.path.dirname(ref) != refs and not ref.startswith(refs + os.sep):
        return None
    try:
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    except OSError:
        return None
    return commit if COMMIT.match(commit) else None


class CachedSnapshot(LocalSource):
    """A commit's files in the local Hub cache, read as a local directory.

    Snapshot entries link into the repository's `blobs/`, so links may leave the snapshot folder
    but not the repository's cache folder. `uri` and fingerprints are the Hub's (`hf://...@commit`,
    size + etag + commit): a conversion records the same provenance from the cache as online.
    """

    def __init__(self, ref: HfRef, commit: str):
        self.ref, self.commit = ref, commit
        self.repo_dir = os.path.realpath(repo_cache_dir(ref.repo_id))
        snapshot = os.path.join(self.repo_dir, "snapshots", commit)
        self._snapshot = snapshot
        super().__init__(os.path.join(snapshot, ref.subfolder) if ref.subfolder else snapshot)
        self.uri = ref.uri(commit)

    def _path(self, name: str) -> str:
        path = os.path.join(self.root, check_member_name(name))
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.repo_dir]) != self.repo_dir:
            raise SourceError(f"{self.uri}/{name}: the cached file links outside {self.repo_dir}")
        return path

    def fingerprint(self, name: str) -> dict:
        path = self._path(name)
        real = os.path.realpath(path)
        size = os.path.getsize(real)
        if os.path.dirname(real) == os.path.join(self.repo_dir, "blobs"):
            return {"size": size, "etag": os.path.basename(real), "commit": self.commit}
        return {"size": size, "mtime_ns": os.stat(real).st_mtime_ns, "commit": self.commit}


def cached_snapshot(ref: HfRef, commit: str | None) -> CachedSnapshot | None:
    """The cached snapshot of `commit`, if the cache has one (whole or in part)."""
    if commit is None or not os.path.isdir(os.path.join(repo_cache_dir(ref.repo_id), "snapshots", commit)):
        return None
    try:
        return CachedSnapshot(ref, commit)
    except SourceError:  # the subfolder is not in this snapshot
        return None


def _not_cached(ref: HfRef) -> str:
    revision = f" --revision {ref.revision}" if ref.revision else ""
    return (
        f"{ref.uri()}: not in the Hugging Face cache {hub_cache_dir()} and HF_HUB_OFFLINE is set "
        f"(download it first with `hf download {ref.repo_id}{revision}`, or unset HF_HUB_OFFLINE)"
    )


def open_hf(uri: str, revision: str | None = None, probe: bool = False):
    """The ByteSource for an hf:// URI (the factory registered for the scheme).

    `revision` is `--revision`; `probe` marks a plain ORG/REPO that might have been a mistyped
    local path: the Hub is asked once, without retries.
    """
    from ckpt_transforms.storage.remote import HfSource, RemoteError, RetryPolicy

    ref = HfRef.parse(uri).with_revision(revision)
    if hf_offline():
        snapshot = cached_snapshot(ref, cached_commit(ref.repo_id, ref.revision))
        if snapshot is None:
            raise SourceError(_not_cached(ref))
        return snapshot
    policy = RetryPolicy(attempts=1) if probe else None
    try:
        source = HfSource(ref, policy)
    except RemoteError as e:
        commit = cached_commit(ref.repo_id, ref.revision)
        snapshot = None if e.status is not None else cached_snapshot(ref, commit)
        if snapshot is None:
            raise
        # huggingface_hub does the same when the Hub cannot be reached: use what the cache has
        log.warning("%s; reading the cached snapshot %s instead", e, commit)
        return snapshot
    source.local = cached_snapshot(ref, source.commit)
    return source
