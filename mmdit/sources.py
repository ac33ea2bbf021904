"""Where shards come from, and how one is read: source specs as webdataset users write them, opened and iterated
through the webdataset library, with faults counted instead of fatal.

A source spec (data.shards, data.val_shards, data/precompute.py --input) is one of:

    shards/train                                  a local folder holding manifest.json (its shards, its counts)
    shards/train/manifest.json, https://h/b/manifest.json    a manifest file or URL (shards named relative to it)
    /data/shards/{00000..09999}.tar               a brace pattern of paths or URLs, read exactly as given
    https://host/bucket/train-{000000..000123}.tar
    pipe:aws s3 cp s3://bucket/x-{0..9}.tar -     a command whose standard output is the tar (webdataset's pipe:)

or a list of those, each optionally {source: SPEC, weight: W}, to mix datasets. A pattern in a local folder that
holds a manifest uses the manifest's counts and identities for the shards it names, and only those. Without a
manifest, nothing is known about a shard before it is read: no sample counts (so an epoch ends where the shard list
does, and a tar cut cleanly at a member boundary is only caught by its missing end-of-archive blocks).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlparse

from mmdit.shards import MANIFEST, SCHEMA_VERSION, decode_sample

logger = logging.getLogger(__name__)

# webdataset's gopen opens these schemes (local paths and file: besides); http(s) go through curl with our limits.
SCHEMES = ("file", "http", "https", "pipe", "gs", "ais", "sftp", "ftps", "scp", "hf", "htgs")


@dataclass(frozen=True)
class Source:
    spec: str                         # as the recipe wrote it
    urls: tuple[str, ...]             # shard paths or URLs, in the order given
    weight: float = 1.0
    counts: dict | None = None        # url -> samples, from a manifest; None when there is none
    identities: dict | None = None    # the encoders and VAE the shards were made with (manifest), for checks

    @property
    def remote(self) -> bool:
        return any(is_remote(u) for u in self.urls)

    @property
    def samples(self) -> int | None:
        return sum(self.counts.values()) if self.counts is not None else None


def is_remote(url: str) -> bool:
    scheme = _scheme(url)
    return scheme not in ("", "file")


def names_folder(spec) -> bool:
    """Whether a spec names a local shard folder (one that data.prepare may create), not a file, pattern or URL."""
    return isinstance(spec, str) and _scheme(spec) in ("", "file") and "{" not in spec \
        and not spec.endswith((".tar", ".json"))


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme   # "C:\\x" is a path


def check_scheme(spec: str) -> str:
    """The spec's scheme ("" for a local path), or a ValueError naming the accepted ones."""
    scheme = _scheme(spec)
    if scheme and scheme not in SCHEMES:
        raise ValueError(f"shard source {spec!r}: unknown scheme {scheme}:; accepted: local paths, "
                         f"{', '.join(s + ':' for s in SCHEMES)} (S3: 'pipe:aws s3 cp s3://bucket/x.tar -')")
    return scheme


def expand(pattern: str) -> list[str]:
    """A brace pattern's paths, in order; an empty or malformed range is an error, never a silent literal."""
    from braceexpand import braceexpand

    urls = list(braceexpand(pattern))
    # A command may hold braces of its own (${HOME}, awk '{print}'): only an empty expansion is refused there.
    bad = [] if pattern.startswith("pipe:") else [u for u in urls if "{" in u or "}" in u]
    if not urls or bad:
        raise ValueError(f"shard pattern {pattern!r} has an empty or malformed brace range; accepted: "
                         f"{{00000..00099}} or {{a,b,c}}")
    return urls


def read_text(url: str, timeout: float = 30) -> str:
    """A small file (a manifest) through webdataset's opener."""
    stream = open_url(url, timeout=timeout)
    try:
        data = stream.read()
    except OSError:
        data = None
    _close(stream)
    failed = _command_error(stream)
    if failed or data is None:
        raise failed or OSError("the read failed")
    return data.decode("utf-8")


def _checked_manifest(text: str, where: str) -> dict:
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ValueError(f"shard manifest {where} is not JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise ValueError(f"shard manifest {where} has no 'shards' mapping of names to sample counts")
    if manifest.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"shard manifest {where} has schema {manifest.get('schema')!r}; this code reads "
                         f"{SCHEMA_VERSION} (precompute the shards again with data/precompute.py)")
    return manifest


def _is_manifest(spec: str) -> bool:
    if _scheme(spec) == "pipe":   # a command that names a .json file (cat m.json, aws s3 cp s3://b/m.json -)
        return any(word.endswith(".json") for word in spec[5:].split())
    return (urlparse(spec).path if _scheme(spec) else spec).endswith(".json")


def parse_source(spec, weight: float = 1.0, timeout: float = 30) -> Source:
    """One spec (see the module's docstring) -> a Source; a bad one is a ValueError of one line."""
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a shard source must be a non-empty string, got {spec!r}")
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < float("inf")):
        raise ValueError(f"shard source {spec!r}: weight must be a positive number, got {weight!r}")
    scheme = check_scheme(spec)
    local = Path(os.path.expanduser(spec.removeprefix("file://"))) if scheme in ("", "file") else None
    if local is not None and local.is_dir():
        if not (local / MANIFEST).is_file():
            raise ValueError(f"shard folder {spec} has no {MANIFEST}; give one, or a pattern such as "
                             f"{spec.rstrip('/')}/{{00000..00009}}.tar")
        return _from_manifest(spec, str(local / MANIFEST), weight, timeout)
    if local is not None and not local.exists() and "{" not in spec and not spec.endswith(".tar"):
        raise ValueError(f"shard source {spec} does not exist; accepted: a folder with {MANIFEST}, a manifest, a "
                         f".tar, a brace pattern, a URL or a pipe: command")
    if _is_manifest(spec):
        if scheme == "pipe":   # its shards would be named relative to nothing
            raise ValueError(f"shard source {spec!r}: a manifest is read from a path or URL, not a pipe: command; "
                             f"give the shards as a pattern ('pipe:aws s3 cp s3://b/x-{{000..009}}.tar -')")
        if local is not None and not local.is_file():
            raise ValueError(f"shard manifest {spec} does not exist")
        return _from_manifest(spec, str(local) if local is not None else spec, weight, timeout)
    urls = expand(spec)
    counts, identities = None, None
    if local is not None:   # a local pattern: the folder's manifest, if any, for exactly the shards named
        urls = [str(Path(os.path.expanduser(u.removeprefix("file://")))) for u in urls]
        folders = {str(Path(u).parent) for u in urls}
        if len(folders) == 1 and (Path(next(iter(folders))) / MANIFEST).is_file():
            manifest = _checked_manifest((Path(next(iter(folders))) / MANIFEST).read_text(), str(folders))
            if all(Path(u).name in manifest["shards"] for u in urls):
                counts = {u: int(manifest["shards"][Path(u).name]) for u in urls}
                identities = manifest.get("identities")
    return Source(spec, tuple(urls), float(weight), counts, identities)


def beside(where: str, name: str) -> str:
    """The path or URL of a file named in the manifest at `where`: its folder, whatever the scheme (urljoin knows
    only some: gs://b/s/manifest.json and 00000.tar must give gs://b/s/00000.tar)."""
    if not is_remote(where):
        return str(Path(where).parent / name)
    if _scheme(where) in ("http", "https"):
        return urljoin(where, name)
    base = where.split("?", 1)[0]
    return base[: base.rindex("/") + 1] + name


def _from_manifest(spec: str, where: str, weight: float, timeout: float = 30) -> Source:
    try:
        text = read_text(where, timeout)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read shard manifest {where}: {e}") from None
    manifest = _checked_manifest(text, where)
    counts = {beside(where, name): int(n) for name, n in sorted(manifest["shards"].items())}
    if not counts:
        raise ValueError(f"shard manifest {where} names no shards")
    return Source(spec, tuple(counts), float(weight), counts, manifest.get("identities"))


def parse_sources(spec, timeout: float = 30) -> list[Source]:
    """data.shards as written: one spec, or a list of specs and {source: SPEC, weight: W} mappings. Read once, at
    the start of a run: a remote manifest is not fetched again, so an epoch means what it meant at the start."""
    if isinstance(spec, Source):
        return [spec]
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if entries and all(isinstance(e, Source) for e in entries):
        return entries
    if not entries:
        raise ValueError("no shard source given: e.g. data.shards=shards/train or 'shards/{00000..00009}.tar'")
    sources = []
    for entry in entries:
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - {"source", "weight"})
            if unknown or "source" not in entry:
                raise ValueError(f"shard source {entry!r}: accepted keys are source and weight")
            sources.append(parse_source(entry["source"], entry.get("weight", 1.0), timeout))
        else:
            sources.append(parse_source(entry, timeout=timeout))
    known = [s for s in sources if s.identities is not None]
    for s in known[1:]:
        if identity_key(s.identities) != identity_key(known[0].identities):
            raise ValueError(f"shard sources {known[0].spec} and {s.spec} were made with different encoders or VAE "
                             f"(manifest identities differ); mix only shards of one model")
    return sources


def identity_key(identities: dict) -> dict:
    """What must agree between shard sets: every identity but the path the model was read from."""
    return {k: v for k, v in identities.items() if k != "model"}


def missing_local(sources: list[Source]) -> list[str]:
    return [u for s in sources for u in s.urls if not is_remote(u) and not Path(u).is_file()]


def unreachable(source: Source, probes: int = 3, timeout: float = 30) -> str | None:
    """For a remote source, why it cannot be read at all (its first shards all fail to open), else None."""
    if not source.remote:
        return None
    errors = []
    for url in source.urls[:probes]:
        try:
            stream = open_url(url, timeout=timeout)
        except OSError as e:
            errors.append(f"{url}: {e}")
            continue
        try:
            whole = len(stream.read(tarfile.BLOCKSIZE)) == tarfile.BLOCKSIZE
        except OSError:
            whole = False
        _close(stream)
        failed = None if whole else _command_error(stream, closed=True)
        if whole:
            return None
        errors.append(f"{url}: {failed or 'shorter than one tar block'}")
    return errors[0] if errors else None


# ---------------------------------------------------------------------------------------------------------------
# Opening and reading one shard

CURL_ERRORS = {6: "host not found", 7: "connection refused", 18: "transfer cut short", 22: "HTTP error (>= 400)",
               28: "timed out", 52: "empty reply", 56: "connection dropped"}


def open_url(url: str, timeout: float = 30):
    """A readable byte stream of url through webdataset's gopen. http(s) go through curl as webdataset's own
    handler does, but with our limits: no retries of its own (ours are counted), a connect timeout, and a stall
    limit (under 1 byte/s for `timeout` seconds) instead of an overall one that long shards would hit."""
    from webdataset.gopen import gopen

    url = str(url)
    if _scheme(url) in ("http", "https"):
        t = max(1, int(timeout))
        url = f"pipe:curl -f -s -L --connect-timeout {t} --speed-limit 1 --speed-time {t} {shlex.quote(url)}"
    elif _scheme(url) == "":
        url = os.path.expanduser(url)
    stream = gopen(url, "rb")
    return stream


class _Tracked:
    """A stream that keeps its byte count and last two blocks, so the end-of-archive marker can be checked."""

    def __init__(self, stream):
        self.stream, self.bytes, self.tail, self.head = stream, 0, b"", b""

    def read(self, n=-1):
        data = self.stream.read(n)
        if len(self.head) < 6:
            self.head += data[: 6 - len(self.head)]
        self.bytes += len(data)
        keep = 2 * tarfile.BLOCKSIZE   # only the last two blocks: a long read is not copied again
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        return data

    @property
    def compressed(self) -> bool:   # gzip, bzip2, xz: their own end markers and checksums catch a cut
        return self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))

    def drain(self):
        while self.read(1 << 16):
            pass


def _command_error(stream, closed: bool = False) -> OSError | None:
    """Why a pipe's command (webdataset's Pipe) failed, from its exit status, or None (a file, or success). Read
    after the stream is closed where it broke off: a command still writing into a full pipe would never exit."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=10)
    except Exception:
        return None
    if status == 0 or closed and status in (141, -13, 23):   # stopped by our closing the pipe (SIGPIPE; curl: 23)
        return None
    return OSError(CURL_ERRORS.get(status, f"the command exited with status {status}"))


def reason(error: BaseException) -> str:
    """An error's first argument (webdataset appends the stream and URL to its exceptions' arguments)."""
    first = error.args[0] if error.args else ""
    return (str(first).split(" @ ")[0].strip() if isinstance(first, str) else str(error)) or type(error).__name__


def _close(stream):
    try:
        stream.close()
    except OSError:   # a pipe's failed command: reported through _command_error where it matters
        pass


def tar_groups(url: str, timeout: float = 30):
    """(key, {extension: bytes}) for each run of adjacent members sharing a key, through webdataset's tar iteration
    (tar_file_expander, group_by_keys). A group is yielded only once the next one has begun or the tar has ended
    whole, so a sample cut short is never yielded. Raises OSError or tarfile.TarError for a tar that cannot be
    opened, is cut short (also exactly at a member boundary: no end-of-archive blocks), or whose command fails."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_url(url, timeout)
    tracked, held = _Tracked(stream), None
    try:
        try:
            for group in group_by_keys(tar_file_expander([{"url": url, "stream": tracked}])):
                if held is not None:
                    yield held
                held = (Path(group["__key__"]).name, {k: v for k, v in group.items() if not k.startswith("__")})
            tracked.drain()
            whole = tracked.compressed or (tracked.bytes % tarfile.BLOCKSIZE == 0
                                           and tracked.tail == bytes(2 * tarfile.BLOCKSIZE))
            if not whole:
                raise tarfile.ReadError("no end-of-archive marker (cut short)")
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            _close(stream)
            raise (_command_error(stream, closed=True) or e) from None
        _close(stream)
        failed = _command_error(stream)   # a download that failed even though its bytes looked whole
        if failed:
            raise failed
    finally:
        _close(stream)
    if held is not None:
        yield held


@dataclass
class ReadStats:
    """What reading skipped: faults are counted and logged once per shard, never fatal."""

    samples: int = 0
    corrupt_samples: int = 0
    failed_shards: int = 0          # could not be opened, or cut short: after every retry, the rest is skipped
    retries: int = 0
    failed: dict = field(default_factory=dict)   # url -> reason, each logged once

    def counts(self) -> dict:
        return {"samples": self.samples, "corrupt_samples": self.corrupt_samples,
                "failed_shards": self.failed_shards, "retries": self.retries}


@dataclass(frozen=True)
class ReadPolicy:
    retries: int = 2                 # attempts after the first, for remote shards
    retry_delay: float = 1.0         # seconds before the first retry, doubling after each
    timeout: float = 30.0            # connect timeout and stall limit, seconds


def read_groups(url: str, stats: ReadStats, policy: ReadPolicy = ReadPolicy(), expected: int | None = None):
    """(key, members) of one tar, in order, through tar_groups. A tar that cannot be opened or breaks off is
    retried (remote ones, policy.retries times, skipping the groups already yielded, so nothing repeats), then
    counted in stats and logged once with its name. expected (from a manifest): a tar that gives fewer groups is
    cut short."""
    url = str(url)
    done, attempts = 0, 1 + (policy.retries if is_remote(url) else 0)
    for attempt in range(attempts):
        if attempt:
            stats.retries += 1
            time.sleep(policy.retry_delay * 2 ** (attempt - 1))
        seen = 0
        try:
            for key, members in tar_groups(url, policy.timeout):
                seen += 1
                if seen > done:
                    done = seen
                    yield key, members
            if expected is not None and seen < expected:
                raise tarfile.ReadError(f"{seen} samples where its manifest says {expected}")
            return
        except (OSError, tarfile.TarError, EOFError, ValueError) as e:
            why = reason(e)
    stats.failed_shards += 1
    if url not in stats.failed:
        stats.failed[url] = why
        logger.warning("shard %s failed (%s) after %d attempt(s); its remaining samples are skipped", url, why,
                       attempts)


def read_shard(url: str, stats: ReadStats | None = None, policy: ReadPolicy = ReadPolicy(),
               expected: int | None = None):
    """The decoded samples of one shard, in order (read_groups: retries, faults counted and logged once); a sample
    that does not decode is skipped and counted."""
    stats = stats if stats is not None else ReadStats()
    for key, members in read_groups(url, stats, policy, expected):
        try:
            sample = decode_sample(members)
        except (KeyError, ValueError, TypeError, AttributeError, OSError) as e:
            stats.corrupt_samples += 1
            logger.warning("skipping sample %s of %s: %s", key, url, e)
            continue
        stats.samples += 1
        yield sample
