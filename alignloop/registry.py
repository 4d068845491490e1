"""Versioned artifacts (reward heads, LoRA adapters, rollouts) under an fsspec URL: trainers publish, serving reads.

    from alignloop.registry import Registry

    reg = Registry()                      # ALIGNLOOP_REGISTRY, else ALIGNLOOP_HOME/registry; or Registry("s3://b/reg")
    m = reg.publish(kind="reward", files={"head.safetensors": "/tmp/head.safetensors"},
                    base={"clip": "shapes-clip-tiny"}, data={"snapshot_version": 3},
                    config={"lr": 1e-3}, metrics={"pref_acc": 0.81}, who="trainer", why="gate: 0.81 > 0.78")
    reg.set_state("reward", m.version, "live", who="guardrail", why="A/B: +4% thumbs-up")
    folder = reg.fetch("reward", reg.live("reward").version)    # local folder, checksums verified

Kinds: "reward" (heads), "adapter" (LoRA adapters) and "rollout" (which adapters serve which share of users;
alignloop.rollout owns its logic, and publishes every rollout live, so the current one is `latest("rollout", "live")`).

Layout, one folder per version, numbered per kind:

    <url>/<kind>/v000001/head.safetensors
    <url>/<kind>/v000001/manifest.json    written last: a version without it is not visible
    <url>/<kind>/.lock                     (local registries) serializes state changes
    <url>/<kind>/.operation.lock           (local registries) serializes compound changes (see operation_lock)

Guarantees, and how:
1. A version is visible only when complete. Its number is claimed first (an atomic create of its folder, or of
   a claim marker in it), its files are written into the claimed folder, and its manifest is written last, as
   one atomic replace (local: fsync + rename; fsspec: a temporary object moved into place). Readers list only
   folders holding a manifest, so a crash mid-publish, or a publish still running, shows nothing; the claimed
   number is simply never used again (numbers are monotonic, not contiguous).
2. Two publishers never share a number: on a local folder `os.mkdir` either creates the folder or fails. On
   fsspec URLs the claim marker is created with mode "xb" (create-exclusive): atomic on stores that support
   conditional writes (s3fs and gcsfs send if-none-match / if-generation-match); where "xb" is only
   check-then-write, the marker holds a random token that the claimer reads back, which catches most lost
   races but is not a guarantee, so run one publisher per kind on such stores. Threads of one process are
   always serialized.
3. At most one live version per kind. Promoting writes the new live manifest first and then retires the
   previous one (with a reason naming its successor), under a lock (local: fcntl on `<kind>/.lock`; fsspec:
   per process only, so run one promoter per kind, as the guardrail is). A crash between the two steps leaves
   two live manifests for a moment; `live()` then answers the one made live most recently, which is the
   intended one, and the next promotion retires the other.
4. Every file's sha256 is recorded at publish and checked by `fetch`; a mismatch is an error naming the file,
   never a silently used artifact.
"""

import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional, Union, get_args

import fsspec
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from alignloop.durable import fsync_dir, make_dirs_durably, write_durably
from alignloop.errors import UserFacingError
from alignloop.settings import home

log = logging.getLogger(__name__)

Kind = Literal["reward", "adapter", "rollout"]  # every method is generic over the kind
State = Literal["candidate", "canary", "live", "retired"]
KINDS: tuple[str, ...] = get_args(Kind)
STATES: tuple[str, ...] = get_args(State)

MANIFEST = "manifest.json"
_VERSION = re.compile(r"^v\d{6,}$")  # v000001; more digits after a million versions
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a plain name: no separators, no dot files
_SHA256 = r"^[0-9a-f]{64}$"
_CHUNK = 1 << 20

Source = Union[str, os.PathLike, bytes]


class RegistryError(UserFacingError):
    """A registry request that cannot be served as asked; the message names what exists or what to fix."""


class Transition(BaseModel):
    """One entry of a version's history: who put it in which state, why, and when."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    state: State
    who: str = Field(min_length=1)
    why: str = Field(min_length=1)
    at: AwareDatetime


class Manifest(BaseModel):
    """What a version is, where it came from, how it measured, and what state it is in (manifest.json)."""

    # NaN metrics (a failed evaluation) survive the round trip as the JSON constant NaN, which Python reads.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, ser_json_inf_nan="constants")

    version: str = Field(pattern=_VERSION.pattern)
    kind: Kind
    parent: Optional[str] = Field(default=None, pattern=_VERSION.pattern)  # a version of the same kind
    created_at: AwareDatetime
    base: dict[str, JsonValue] = {}  # base model ids and hashes
    data: dict[str, JsonValue] = {}  # training snapshot version, Kafka offsets
    config: dict[str, JsonValue] = {}
    metrics: dict[str, JsonValue] = {}  # the first entry is the headline `alignloop registry list` shows
    state: State
    reason: str  # why it is in its state: the newest history entry's `why`
    history: list[Transition] = Field(min_length=1)
    files: dict[str, str] = Field(min_length=1)  # name -> sha256 hex

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name, digest in files.items():
            if not _plain_name(name):
                raise ValueError(_bad_file_name(name))
            if not re.match(_SHA256, digest):
                raise ValueError(f"files[{name!r}] must be a sha256 hex digest, got {digest!r}")
        return files

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def default_registry_url() -> str:
    """ALIGNLOOP_REGISTRY (any fsspec URL or a local path), else a folder under ALIGNLOOP_HOME."""
    return os.environ.get("ALIGNLOOP_REGISTRY") or str(home() / "registry")


class Registry:
    def __init__(self, url: Union[str, os.PathLike, None] = None):
        self.url = str(url or default_registry_url()).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols  # plain paths and file:// get fsync'd writes and fcntl locks

    # -- reading --------------------------------------------------------------------------------------------

    def versions(self, kind: str) -> list[Manifest]:
        """Complete versions of `kind`, oldest first."""
        _check_kind(kind)
        self._forget_listings()
        found = self.fs.glob(f"{self.root}/{kind}/v*/{MANIFEST}")
        names = sorted((p.rsplit("/", 2)[-2] for p in found if _VERSION.match(p.rsplit("/", 2)[-2])), key=_number)
        return [self._read_manifest(kind, version) for version in names]

    def get(self, kind: str, version: str) -> Manifest:
        _check_kind(kind)
        if not (isinstance(version, str) and _VERSION.match(version)) or not self.fs.exists(f"{self._dir(kind, version)}/{MANIFEST}"):
            existing = [m.version for m in self.versions(kind)]
            has = ", ".join(existing[-10:]) if existing else "no complete versions"
            more = f" ({len(existing)} in all)" if len(existing) > 10 else ""
            raise RegistryError(f"no {kind} version {version!r} in {self.url}; it has {has}{more}")
        return self._read_manifest(kind, version)

    def live(self, kind: str) -> Optional[Manifest]:
        """The live version, or None. Should a crash have left two, the one made live most recently."""
        return newest_live(self.versions(kind))

    def latest(self, kind: str, state: Optional[str] = None) -> Optional[Manifest]:
        """The highest-numbered complete version (in `state`, if given), or None.

        Reads manifests from the top number down and stops at the first match, so it costs one listing and one
        manifest when the match is the newest version (the current rollout always is): cheap enough to poll.
        """
        _check_kind(kind)
        if state is not None:
            _check_state(state)
        for version in sorted(self._claimed(kind), key=_number, reverse=True):
            try:
                manifest = self._read_manifest(kind, version)
            except FileNotFoundError:  # claimed, still being written (or abandoned by a crash): not visible
                continue
            if state is None or manifest.state == state:
                return manifest
        return None

    def read_file(self, manifest: Manifest, name: str) -> bytes:
        """One small file of a version, checked against the manifest's sha256 (use fetch for large ones)."""
        what = f"{manifest.kind} {manifest.version}"
        if name not in manifest.files:
            raise RegistryError(f"{what} has no file {name!r}; it has {', '.join(sorted(manifest.files))}")
        try:
            data = self.fs.cat_file(f"{self._dir(manifest.kind, manifest.version)}/{name}")
        except FileNotFoundError:
            raise RegistryError(f"{what}: file {name!r} is missing from {self.url}") from None
        digest, expected = hashlib.sha256(data).hexdigest(), manifest.files[name]
        if digest != expected:
            raise RegistryError(_mismatch(manifest.kind, manifest.version, name, self.url, digest, expected))
        return data

    def fetch(self, kind: str, version: str) -> Path:
        """A local folder holding the version's files, every checksum verified.

        A local registry answers the version's own folder; a remote one a cached copy under
        ALIGNLOOP_HOME/registry-cache, downloaded once (a corrupt cached copy is discarded and downloaded again).
        """
        manifest = self.get(kind, version)
        if self.local:
            folder = Path(self._dir(kind, version))
            _verify(folder, manifest, where=self.url)
            return folder

        cache = home() / "registry-cache" / hashlib.sha256(self.url.encode()).hexdigest()[:16] / kind
        target = cache / version
        if target.exists():
            try:
                _verify(target, manifest, where=str(target))
                write_durably(target / MANIFEST, manifest.to_json().encode())  # its state as of this fetch
                return target
            except RegistryError as err:
                log.warning("discarding the cached copy: %s", err)
                shutil.rmtree(target)
        # Download into a temporary folder, verify while streaming, then rename: the cache, like the registry,
        # never shows a partial version.
        tmp = cache / f".tmp-{version}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            for name, expected in manifest.files.items():
                remote = f"{self._dir(kind, version)}/{name}"
                try:
                    with self.fs.open(remote, "rb") as src, open(tmp / name, "wb") as dst:
                        digest = _copy_hashing(src, dst)
                        dst.flush()
                        os.fsync(dst.fileno())
                except FileNotFoundError:
                    raise RegistryError(f"{kind} {version}: file {name!r} is missing from {self.url}") from None
                if digest != expected:
                    raise RegistryError(_mismatch(kind, version, name, self.url, digest, expected))
            write_durably(tmp / MANIFEST, manifest.to_json().encode())
            try:
                os.rename(tmp, target)
            except OSError:  # a concurrent fetch put its verified copy there first; use that one
                if not target.exists():
                    raise
            fsync_dir(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # -- writing --------------------------------------------------------------------------------------------

    def publish(self, kind: str, files: dict[str, Source], parent: Optional[str] = None,
                base: Optional[dict] = None, data: Optional[dict] = None, config: Optional[dict] = None,
                metrics: Optional[dict] = None, state: str = "candidate", who: Optional[str] = None,
                why: Optional[str] = None) -> Manifest:
        """Write a new version of `kind` from `files` (name -> local path or bytes); returns its manifest."""
        # 1. Check inputs, all of them, before anything is written.
        _check_kind(kind)
        _check_state(state)
        _check_who_why("publish", who, why)
        if not files:
            raise RegistryError(f"files is empty: a {kind} version needs at least one file")
        for name, source in files.items():
            _check_file_name(name)
            if not isinstance(source, (bytes, bytearray, memoryview)) and not Path(source).is_file():
                raise RegistryError(f"files[{name!r}]: {str(source)!r} is not a file")
        if parent is not None:
            self.get(kind, parent)  # raises, naming the versions that exist
        now = datetime.now(timezone.utc)
        fields = dict(kind=kind, parent=parent, created_at=now, base=base or {}, data=data or {},
                      config=config or {}, metrics=metrics or {}, state=state, reason=why,
                      history=[Transition(state=state, who=who, why=why, at=now)])
        _manifest(**fields, version="v000000", files={name: "0" * 64 for name in files})  # e.g. metrics not JSON

        # 2. Claim the next number; its folder stays invisible until step 4.
        version = self._claim(kind)

        # 3. Write the files, hashing as they stream.
        digests = {name: self._write_file(f"{self._dir(kind, version)}/{name}", source)
                   for name, source in files.items()}
        if self.local:
            fsync_dir(Path(self._dir(kind, version)))  # the files' entries are durable before the manifest's

        # 4. The manifest, last: from here on the version is visible. A live one then retires its predecessor.
        manifest = _manifest(**fields, version=version, files=digests)
        with self._state_lock(kind):
            self._write_manifest(manifest)
            if state == "live":
                self._retire_others(manifest, who, why)
        log.info("published %s %s (%s) to %s", kind, version, state, self.url)
        return manifest

    def set_state(self, kind: str, version: str, state: str, who: str, why: str) -> Manifest:
        """Move a version to `state`, recording who and why; making one live retires the previous live one."""
        _check_kind(kind)
        _check_state(state)
        _check_who_why("set_state", who, why)
        with self._state_lock(kind):
            updated = _transition(self.get(kind, version), state, who, why)
            self._write_manifest(updated)
            if state == "live":
                self._retire_others(updated, who, why)
        log.info("%s %s is now %s (%s: %s)", kind, version, state, who, why)
        return updated

    @contextmanager
    def operation_lock(self, kind: str):
        """Hold this while a change spans several calls that must not interleave with another such change (the
        rollout's: adapter states, then a new rollout version). It is a lock of its own, apart from the one
        publish and set_state take inside, so those can be called while holding it. Same reach as the state
        lock: across processes on a local folder, within one process otherwise."""
        _check_kind(kind)
        with self._file_lock(kind, "operation", ".operation.lock"):
            yield

    # -- internals ------------------------------------------------------------------------------------------

    def _dir(self, kind: str, version: Optional[str] = None) -> str:
        return f"{self.root}/{kind}" + (f"/{version}" if version else "")

    def _forget_listings(self) -> None:
        # Object-store filesystems cache directory listings; a registry must see versions published since.
        if not self.local:
            self.fs.invalidate_cache()

    def _read_manifest(self, kind: str, version: str) -> Manifest:
        path = f"{self._dir(kind, version)}/{MANIFEST}"
        try:
            manifest = Manifest.model_validate_json(self.fs.cat_file(path))
        except ValidationError as err:
            raise RegistryError(f"{self.url}: {kind}/{version}/{MANIFEST} is not a valid manifest: {err}") from None
        if (manifest.kind, manifest.version) != (kind, version):  # a folder copied or renamed by hand
            raise RegistryError(f"{self.url}: {kind}/{version}/{MANIFEST} describes {manifest.kind} "
                                f"{manifest.version}; fix or remove that folder")
        return manifest

    def _claimed(self, kind: str) -> list[str]:
        """Every version folder of `kind` claimed so far, complete or not; one fresh listing."""
        self._forget_listings()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._dir(kind), detail=False)]
        except FileNotFoundError:
            return []
        return [n for n in names if _VERSION.match(n)]

    def _highest(self, kind: str) -> int:
        """The highest number claimed so far, complete or not."""
        return max(map(_number, self._claimed(kind)), default=0)

    def _claim(self, kind: str) -> str:
        if self.local:
            kind_dir = Path(self._dir(kind))
            make_dirs_durably(kind_dir)
            while True:
                version = f"v{self._highest(kind) + 1:06d}"
                try:
                    os.mkdir(kind_dir / version)  # atomic: exactly one process creates it
                except FileExistsError:
                    continue
                fsync_dir(kind_dir)
                return version
        with _process_lock(self.url, kind, "claim"):
            while True:
                version = f"v{self._highest(kind) + 1:06d}"
                marker = f"{self._dir(kind, version)}/.claim"
                token = uuid.uuid4().hex.encode()
                try:
                    with self.fs.open(marker, "xb") as f:
                        f.write(token)
                except FileExistsError:
                    continue
                if self.fs.cat_file(marker) == token:  # see guarantee 2 in the module docstring
                    return version

    def _write_file(self, path: str, source: Source) -> str:
        """Write one artifact file into the (still invisible) version folder; returns its sha256."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            src = io.BytesIO(source)
        else:
            src = open(source, "rb")
        with src, (open(path, "wb") if self.local else self.fs.open(path, "wb")) as dst:
            digest = _copy_hashing(src, dst)
            if self.local:  # durable before the manifest that vouches for it
                dst.flush()
                os.fsync(dst.fileno())
        return digest

    def _write_manifest(self, manifest: Manifest) -> None:
        """Replace a version's manifest atomically: readers see the old one or the new one, never a torn file."""
        path = f"{self._dir(manifest.kind, manifest.version)}/{MANIFEST}"
        data = manifest.to_json().encode()
        if self.local:
            write_durably(Path(path), data)
            return
        # An object PUT is atomic already; the temporary object makes the replace atomic on other fsspec
        # filesystems too (a move is a rename there), and on memory:// whose files are visible while written.
        tmp = f"{self._dir(manifest.kind, manifest.version)}/.{MANIFEST}.{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def _retire_others(self, successor: Manifest, who: str, why: str) -> None:
        for other in self.versions(successor.kind):
            if other.state == "live" and other.version != successor.version:
                self._write_manifest(_transition(other, "retired", who,
                                                 f"replaced by {successor.version} as live: {why}"))

    def _state_lock(self, kind: str):
        """Serialize read-modify-write of manifests: across processes on a local folder, within one otherwise."""
        return self._file_lock(kind, "state", ".lock")

    @contextmanager
    def _file_lock(self, kind: str, purpose: str, file_name: str):
        with _process_lock(self.url, kind, purpose):
            if not self.local:
                yield
                return
            kind_dir = Path(self._dir(kind))
            kind_dir.mkdir(parents=True, exist_ok=True)
            with open(kind_dir / file_name, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                yield


def newest_live(manifests: list[Manifest]) -> Optional[Manifest]:
    """The live one of `manifests` (one kind's versions), or None; should a crash have left two, the one made
    live most recently."""
    live = [m for m in manifests if m.state == "live"]
    return max(live, key=lambda m: m.history[-1].at, default=None)


_LOCKS: dict[tuple, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextmanager
def _process_lock(*key):
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield


def _transition(manifest: Manifest, state: str, who: str, why: str) -> Manifest:
    entry = Transition(state=state, who=who, why=why, at=datetime.now(timezone.utc))
    fields = manifest.model_dump()
    fields.update(state=state, reason=why, history=[*manifest.history, entry])
    return _manifest(**fields)


def _manifest(**fields) -> Manifest:
    """Build a manifest, a validation failure becoming a RegistryError that names the field."""
    try:
        return Manifest(**fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors())
        raise RegistryError(f"invalid manifest: {problems}") from None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")


def _check_state(state: str) -> None:
    if state not in STATES:
        raise RegistryError(f"state must be one of {', '.join(STATES)}; got {state!r}")


def _check_who_why(method: str, who, why) -> None:
    if not (isinstance(who, str) and who.strip() and isinstance(why, str) and why.strip()):
        raise RegistryError(f"{method} needs who and why as non-empty strings, for the version's history; "
                            f"got who={who!r}, why={why!r}")


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(_FILE_NAME.match(name)) and name != MANIFEST


def _bad_file_name(name) -> str:
    return (f"file name {name!r} must be a plain name (letters, digits, '.', '_', '-'; no path separators, "
            f"not starting with '.'; {MANIFEST!r} is reserved)")


def _check_file_name(name) -> None:
    if not _plain_name(name):
        raise RegistryError(_bad_file_name(name))


def _number(version: str) -> int:
    return int(version[1:])


def _copy_hashing(src, dst) -> str:
    """sha256 of `src`, read in chunks (adapters can be large), written on to `dst` unless it is None."""
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest()


def _verify(folder: Path, manifest: Manifest, where: str) -> None:
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise RegistryError(f"{manifest.kind} {manifest.version}: file {name!r} is missing from {where}")
        with open(path, "rb") as f:
            digest = _copy_hashing(f, None)
        if digest != expected:
            raise RegistryError(_mismatch(manifest.kind, manifest.version, name, where, digest, expected))


def _mismatch(kind, version, name, where, digest, expected) -> str:
    return (f"{kind} {version}: file {name!r} in {where} is corrupt (sha256 {digest[:12]}..., the manifest "
            f"recorded {expected[:12]}...); not using it")
