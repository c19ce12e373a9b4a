"""Where data lives: the one place that decides how a path the user gives is read and written.

Every path the commands take (``build --source/--out/--manifests``, ``report``, ``inspect``,
``export``) may be a plain path, a ``file://`` URL or an fsspec URL (``s3://``, ``gs://``, ``az://``,
...). :func:`path` turns it into a ``pathlib.Path`` (local: exactly as before) or a
``upath.UPath`` (a URL: pathlib's API over fsspec), so that the code above reads ``p / "shards"``,
``p.is_file()``, ``p.open("rb")`` the same way for both.

Writes go through :mod:`datagen.files` (atomic on both: a URL's object is one PUT or a completed
multipart upload, see :func:`upload`). Credentials come from where the cloud SDKs look (environment,
their config files, instance roles); the endpoint from ``AWS_ENDPOINT_URL`` (or fsspec's own
configuration, ``FSSPEC_S3_ENDPOINT_URL``). They are never printed nor written: a URL that carries
a secret (``s3://KEY:SECRET@bucket``, a pre-signed query) is refused, and :func:`public` is what
manifests record of a URL.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# The package that brings each scheme's filesystem (named when it is missing).
PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp",
}
# Query parameters that carry a secret (pre-signed S3 URLs, Azure SAS tokens, generic tokens).
SECRET_QUERY_KEYS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "sig", "token", "access_token", "secret", "password", "x-goog-signature", "x-goog-credential",
})


class StorageError(ValueError):
    """A path or URL that cannot be used: its one-line message names it and the cause."""


AnyPath = Any  # pathlib.Path or upath.UPath


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a remote filesystem (``file://`` and plain paths do not)."""
    if not isinstance(location, str):
        return _is_remote(location)
    scheme = urlsplit(location).scheme if "://" in location else ""
    return bool(scheme) and scheme != "file"


def _is_remote(p: Any) -> bool:
    return not isinstance(p, Path) and getattr(p, "protocol", "") not in ("", "file", "local")


def path(location: str | os.PathLike) -> AnyPath:
    """``location`` as a path object: ``Path`` for local paths (``file://`` stripped), ``UPath`` for URLs."""
    if _is_remote(location):
        return location
    if isinstance(location, Path):
        return location
    text = os.fspath(location)
    if text.startswith("file://"):
        return Path(urlsplit(text).path)
    if not is_url(text):
        return Path(text)
    check_url(text)
    from upath import UPath

    return UPath(text)


def check_url(url: str) -> None:
    """Refuse a URL that carries a secret, or whose scheme has no installed filesystem."""
    parts = urlsplit(url)
    if parts.password is not None or parts.username is not None:
        raise StorageError(
            f"{public(url)}: the URL carries credentials; give them the standard way "
            "(environment, the cloud SDK's config, an instance role), never in the URL"
        )
    secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in SECRET_QUERY_KEYS]
    if secret:
        raise StorageError(
            f"{public(url)}: the URL carries a secret ({', '.join(sorted(secret))}); give credentials the "
            "standard way (environment, the cloud SDK's config, an instance role)"
        )
    filesystem_class(parts.scheme, url)


def filesystem_class(scheme: str, url: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        package = PACKAGES.get(scheme) or "the fsspec filesystem for it"
        raise StorageError(f"{public(url)}: no filesystem installed for {scheme}:// (install {package})") from e
    except ValueError as e:
        raise StorageError(f"{public(url)}: unknown URL scheme {scheme}:// (fsspec knows no such protocol)") from e


def public(url: str | os.PathLike) -> str:
    """A URL as it may be printed or recorded: no user, password or query."""
    text = str(url)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def text(p: AnyPath) -> str:
    """What a manifest records of a location: the absolute local path, or the URL (no secret in it)."""
    return str(Path(p).resolve()) if isinstance(p, Path) else public(str(p))


def fs_and_path(p: AnyPath) -> tuple[Any, str]:
    """The fsspec filesystem and its path for a ``UPath``."""
    return p.fs, p.path


def upload(local: Path, dest: AnyPath) -> None:
    """Copy the finished local file ``local`` to the URL ``dest`` as one object: one PUT, or a
    multipart upload that is completed (s3fs aborts it on an error); a kill mid-upload leaves an
    unfinished multipart upload, never an object, and :func:`abort_uploads` clears it."""
    fs, rpath = fs_and_path(dest)
    fs.put_file(str(local), rpath)


def abort_uploads(folder: AnyPath, name: str = "") -> list[str]:
    """Abort the unfinished multipart uploads a killed writer left under ``folder/name*`` (S3; other
    stores keep no visible partial objects). Only keys under that prefix are touched."""
    fs, rpath = fs_and_path(folder)
    if getattr(fs, "protocol", None) and "s3" not in tuple(fs.protocol):
        return []
    bucket, _, key = rpath.partition("/")
    prefix = f"{key.rstrip('/')}/{name}" if key else name
    aborted = []
    response = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    for upload_ in response.get("Uploads", []):
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload_["Key"], UploadId=upload_["UploadId"])
        aborted.append(f"{fs.protocol[0]}://{bucket}/{upload_['Key']}")
    return aborted


def probe(location: str | os.PathLike, option: str, must_exist: bool = False) -> None:
    """Check, in a few seconds and writing nothing, that a URL can be used: the bucket exists, the
    credentials are there and are accepted, the endpoint answers. Raises :class:`StorageError`
    naming ``option``, the URL and the cause. Local paths are left to the caller's own checks."""
    if not is_url(location):
        return
    url = os.fspath(location)
    p = path(url)
    fs, rpath = fs_and_path(p)
    quick = _quick_filesystem(fs)
    bucket, _, key = rpath.partition("/")
    try:
        if "s3" in tuple(quick.protocol):
            quick.call_s3("head_bucket", Bucket=bucket)
            if must_exist and not _s3_has(quick, bucket, key):
                raise StorageError(f"{option} {public(url)}: nothing there")
        elif must_exist and not quick.exists(rpath):
            raise StorageError(f"{option} {public(url)}: nothing there")
        else:
            quick.ls(bucket, detail=False)
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{option} {public(url)}: the bucket {bucket!r} does not exist") from e
    except Exception as e:  # noqa: BLE001 -- every cloud SDK error becomes one line naming the URL
        raise StorageError(f"{option} {public(url)}: {cause(e)}") from e


def _s3_has(fs, bucket: str, key: str) -> bool:
    """Whether ``key`` is an object or a folder (objects under ``key/``) of the bucket; a bare prefix
    match (``data`` for ``data-old/x``) is not one."""
    folder = key.rstrip("/")
    if not folder:
        return bool(fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1).get("KeyCount"))
    if fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=folder + "/", MaxKeys=1).get("KeyCount"):
        return True
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=folder)
    except FileNotFoundError:
        return False
    return True


def _quick_filesystem(fs):
    """A fresh instance of ``fs``'s class with the same options, giving up after a few seconds."""
    options = dict(getattr(fs, "storage_options", {}))
    if "s3" in tuple(fs.protocol):
        config = dict(options.get("config_kwargs") or {})
        config.update(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"})
        options.update(config_kwargs=config)
    quick = type(fs)(skip_instance_cache=True, **options)
    quick.retries = 1  # s3fs's own retry loop, over botocore's
    return quick


def cause(error: BaseException) -> str:
    """What went wrong, in words, without secrets: the SDK's error code and message."""
    name = type(error).__name__
    if name == "NoCredentialsError":
        return "no credentials found (environment, the cloud SDK's config files or an instance role)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"):
        return f"cannot reach the endpoint ({error})"
    if isinstance(error, PermissionError):
        return f"permission denied ({error})"
    if isinstance(error, FileNotFoundError):
        return f"not found ({error})"
    return f"{name}: {error}"


def is_file(location: str) -> bool:
    """Whether ``location`` (a path or URL string) is a file; local paths through ``os`` (fast)."""
    return path(location).is_file() if is_url(location) else os.path.isfile(location)


def size_of(location: str) -> int:
    """A file's size in bytes (``FileNotFoundError`` when there is none)."""
    return int(path(location).stat().st_size) if is_url(location) else os.stat(location).st_size


def open_input(location: str):
    """A binary file object to read ``location`` from: a local file as it is; an object fetched
    whole in one request (an image is read entirely anyway, and one round trip beats many ranged ones)."""
    if not is_url(location):
        return open(location, "rb")
    import io

    fs, rpath = remote(location)
    return io.BytesIO(fs.cat_file(rpath))


def remote(url: str) -> tuple[Any, str]:
    """The filesystem and path of a URL that a listing already checked (an image, a shard, a member's
    tar): fsspec's own instance for the scheme, one per process (fsspec caches it), without building
    a ``UPath`` per call (~2 ms each: it counts at one call per image)."""
    import fsspec

    scheme, _, rest = url.partition("://")
    return fsspec.filesystem(scheme), rest


def read_range(location: str, start: int, length: int) -> bytes:
    """``length`` bytes of the file ``location`` from byte ``start`` (one ranged request on a bucket):
    how a member of a source tar is read without the rest of the tar."""
    if not is_url(location):
        with open(location, "rb") as f:
            f.seek(start)
            data = f.read(length)
    else:
        fs, rpath = remote(location)
        data = fs.cat_file(rpath, start=start, end=start + length)
    if len(data) != length:
        raise OSError(f"{public(location)}: {length} bytes wanted at offset {start}, {len(data)} there")
    return data


def open_stream(location: str):
    """A binary stream to read ``location`` from start to end (a shard the trainer streams): a local
    file, or an object read through fsspec's read-ahead buffer (a few large ranged reads)."""
    if not is_url(location):
        return open(location, "rb")
    fs, rpath = remote(location)
    return fs.open(rpath, "rb", block_size=STREAM_BLOCK, cache_type="readahead")


STREAM_BLOCK = 8 * 2**20  # bytes per ranged read when streaming an object


def glob(pattern: str) -> list[str]:
    """The files matching ``pattern`` (a glob over a path or a URL), sorted; URLs stay URLs."""
    import glob as globbing

    if not is_url(pattern):
        matches = globbing.glob(os.path.expanduser(pattern))
        return sorted(str(Path(m).resolve()) for m in matches if os.path.isfile(m))
    p = path(pattern)
    fs, rpath = fs_and_path(p)
    scheme = urlsplit(pattern).scheme
    found = fs.glob(rpath, detail=True)
    return sorted(f"{scheme}://{name}" for name, info in found.items() if info.get("type") == "file")


@contextlib.contextmanager
def local_copy(folder: AnyPath):
    """``folder`` as a local folder for the block: itself when local, else a temporary download."""
    if not _is_remote(folder) and not is_url(str(folder)):
        yield Path(folder)
        return
    import tempfile

    fs, rpath = fs_and_path(path(folder))
    with tempfile.TemporaryDirectory(prefix="subject-ffhq-copy-") as tmp:
        fs.get(rpath.rstrip("/") + "/", tmp + "/", recursive=True)
        yield Path(tmp)


def arrow_filesystem(location: str) -> tuple[Any, str]:
    """``(pyarrow filesystem or None, path)`` for libraries that take pyarrow's (Ray Train's
    ``storage_path``/``storage_filesystem``): a URL through the same fsspec filesystem (endpoint,
    credentials) as everything else here; a local path as an absolute path and None."""
    if not is_url(location):
        return None, str(Path(location).resolve())
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, rpath = fs_and_path(path(location))
    return PyFileSystem(FSSpecHandler(fs)), rpath.rstrip("/")
