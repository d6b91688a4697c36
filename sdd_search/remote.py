"""Data and teachers that live in an object store or behind a URL, copied once per node.

``data.root`` may be ``s3://bucket/prefix`` or ``gs://bucket/prefix``. Each node copies that
folder once into its own cache (``data.cache_dir``; default ``$SDD_SEARCH_CACHE/data`` or
``~/.cache/sdd-search/data``, read on the node) and trials read the copy (:func:`local_root`):

    <cache>/<scheme>-<bucket>-<last part>-<hash>/MANIFEST.json   relative path -> size, written
                                                                 once the copy is complete
    <cache>/<scheme>-<bucket>-<last part>-<hash>/data/...        the copy (what trials read)
    <cache>/<scheme>-<bucket>-<last part>-<hash>/.lock           one copier per node at a time

The copy resumes: each file is written under a temporary name and renamed, and a file whose size
matches the listing is kept, so a copy killed half-way continues where it stopped. A complete
copy (its manifest's files all there, at their sizes) is used without listing the bucket again:
a changed bucket needs a new prefix, or the copy's folder removed on every node.

``teacher.checkpoint`` may be ``s3://``, ``gs://`` or ``https://`` (``ARCHIVE.tar#MEMBER`` names
one file inside a tar): :func:`fetch_file` downloads it once per node into the cache
(``<teacher cache>/downloads/``), checked against ``teacher.sha256`` when the spec gives one.

S3-compatible servers (MinIO, moto, Ceph): ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(``http://host:port``) point every s3:// access here at them; credentials come from the usual
AWS chain (environment, ``~/.aws``, the instance profile). gs:// uses Google's default
credentials (the VM's service account). pyarrow's filesystems (installed with Ray and MLflow) do
the object-store work; this module imports neither torch nor Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")
URL_SCHEMES = ("http", "https")
MANIFEST = "MANIFEST.json"
COPY_THREADS = 16  # concurrent object reads: small files (ImageNet's) are latency-bound
_CHUNK = 1 << 20  # bytes per read


class RemoteError(ValueError):
    """An object store or URL that cannot be read as asked; ``str()`` is one line that names
    the spec field, the URI and what was wrong."""


def _scheme(path: str | None) -> str:
    return urlsplit(path).scheme.lower() if path and "://" in path else ""


def is_object_store(path: str | None) -> bool:
    """``path`` is an s3:// or gs:// URI (a folder or an object), not a local path."""
    return _scheme(path) in OBJECT_STORE_SCHEMES


def is_download(path: str | None) -> bool:
    """``path`` is fetched rather than opened: an object-store URI or an http(s) URL."""
    return _scheme(path) in OBJECT_STORE_SCHEMES + URL_SCHEMES


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------
# Object stores


def _s3_options() -> dict[str, Any]:
    """S3FileSystem options for an S3-compatible server named by AWS_ENDPOINT_URL(_S3)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return {
        "endpoint_override": parsed.netloc + parsed.path.rstrip("/"),
        "scheme": parsed.scheme,
        "region": region,
    }


@lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str, s3_options: tuple):
    from pyarrow import fs as pafs

    if scheme == "s3" and s3_options:
        return pafs.S3FileSystem(**dict(s3_options))
    # from_uri finds an AWS bucket's own region (s3:GetBucketLocation) and Google's credentials.
    scheme = "gs" if scheme == "gcs" else scheme
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def filesystem(uri: str):
    """(the pyarrow FileSystem of ``uri``'s bucket, ``uri``'s path in it: ``bucket/prefix``)."""
    parsed = urlsplit(uri)
    scheme = parsed.scheme.lower()
    options = tuple(sorted(_s3_options().items())) if scheme == "s3" else ()
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return _filesystem(scheme, parsed.netloc, options), path


def list_tree(uri: str) -> dict[str, int]:
    """Every object below the folder ``uri``: relative path -> size in bytes, sorted.

    Listed one folder level at a time, the folders of a level in parallel (ImageNet's 1,000
    class folders take seconds, not the minutes of one flat listing). Empty when nothing is
    there. Raises RemoteError (one line) when the store cannot be listed.
    """
    from pyarrow import fs as pafs

    store, base = filesystem(uri)

    def list_one(folder: str):
        return store.get_file_info(pafs.FileSelector(folder, allow_not_found=True))

    files: dict[str, int] = {}
    pending = [base]
    try:
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            while pending:
                level, pending = list(pool.map(list_one, pending)), []
                for infos in level:
                    for info in infos:
                        if info.type == pafs.FileType.Directory:
                            pending.append(info.path)
                        elif info.type == pafs.FileType.File:
                            files[info.path[len(base) + 1 :]] = info.size
    except OSError as error:
        raise RemoteError(f"cannot list {uri} ({_first_line(error)})") from None
    return dict(sorted(files.items()))


def _kinds(uri: str, relative: list[str]) -> list[str]:
    """The kind of each path below ``uri``: "file", "folder" or "missing"."""
    from pyarrow import fs as pafs

    store, base = filesystem(uri)
    try:
        infos = store.get_file_info([f"{base}/{path}".rstrip("/") for path in relative])
    except OSError as error:
        raise RemoteError(f"cannot list {uri} ({_first_line(error)})") from None
    names = {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}
    return [names.get(info.type, "missing") for info in infos]


# ----------------------------------------------------------------------------------------------
# A folder copied once per node


def data_cache_dir(cache_dir: str | None = None) -> Path:
    """Where this node keeps copies of remote data: ``cache_dir``, else $SDD_SEARCH_CACHE/data,
    else ~/.cache/sdd-search/data."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SDD_SEARCH_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "sdd-search") / "data"


def _slug(uri: str) -> str:
    """A folder name for ``uri``: readable, and distinct for distinct URIs."""
    parsed = urlsplit(uri.rstrip("/"))
    tail = parsed.path.strip("/").rsplit("/", 1)[-1] or "root"
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:10]
    return f"{parsed.scheme}-{parsed.netloc}-{tail}-{digest}"


def copy_folder(uri: str, cache_dir: str | None = None) -> Path:
    """The folder that holds this node's copy of ``uri`` (its data/, MANIFEST.json and lock)."""
    return data_cache_dir(cache_dir) / _slug(uri)


@contextlib.contextmanager
def _locked(path: Path, waiting: str, log: Callable[[str], None] | None) -> Iterator[None]:
    """An exclusive lock on ``path`` across this node's processes (released when the holder
    exits, even killed); logs ``waiting`` once when it has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def manifest_problem(folder: Path, uri: str) -> str | None:
    """Why ``folder`` is not a complete copy of ``uri`` (None when it is): no manifest, one for
    another URI, or a listed file missing or of another size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (the copy never completed)"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({_first_line(error)})"
    if manifest.get("source") != uri.rstrip("/"):
        return f"the manifest is of {manifest.get('source')!r}"
    data = folder / "data"
    for relative, size in manifest.get("files", {}).items():
        try:
            if (data / relative).stat().st_size != size:
                return f"{relative} is not {size} bytes"
        except FileNotFoundError:
            return f"{relative} is missing"
    return None


def _copy_object(store, source: str, target: Path, size: int) -> None:
    """One object to ``target``: written beside it under a temporary name, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    # compression=None: a .gz object is copied as it is, never decompressed on the way.
    with (
        store.open_input_stream(source, compression=None) as reader,
        open(partial, "wb") as writer,
    ):
        shutil.copyfileobj(reader, writer, _CHUNK)
    if partial.stat().st_size != size:
        raise RemoteError(f"{source}: read {partial.stat().st_size} bytes, listed as {size}")
    os.replace(partial, target)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def sync_folder(
    uri: str,
    cache_dir: str | None = None,
    *,
    allow_empty: bool = False,
    field: str = "data.root",
    log: Callable[[str], None] | None = None,
) -> Path:
    """This node's complete copy of the folder ``uri``; copies what is missing first.

    Returns the copy's data/ folder. Once per node: a complete copy is used as it is (checked
    against its manifest, no listing); otherwise the bucket is listed, files already there at
    their listed size are kept, the others copied (``COPY_THREADS`` at once), and the manifest
    written last. ``allow_empty``: a prefix with no objects is an empty copy, not an error
    (CIFAR with data.download: the loader downloads into it). RemoteError names ``field``.
    """
    folder = copy_folder(uri, cache_dir)
    data = folder / "data"
    waiting = f"{field}: another process on this node is copying {uri}; waiting"
    with _locked(folder / ".lock", waiting, log):
        if manifest_problem(folder, uri) is None:
            return data
        (folder / MANIFEST).unlink(missing_ok=True)
        try:
            listing = list_tree(uri)
        except RemoteError as error:
            raise RemoteError(f"{field}: {error}") from None
        if not listing and not allow_empty:
            raise RemoteError(f"{field}: {uri} holds no files (expected the dataset below it)")
        todo = [rel for rel, size in listing.items() if not _has_size(data / rel, size)]
        if log and todo:
            megabytes = sum(listing[rel] for rel in todo) / 1e6
            log(
                f"{field}: copying {len(todo)} of {len(listing)} files ({megabytes:,.1f} MB) "
                f"of {uri} to {data}"
            )
        store, base = filesystem(uri)
        started = time.time()
        try:
            with ThreadPoolExecutor(COPY_THREADS) as pool:
                for _ in pool.map(
                    lambda rel: _copy_object(store, f"{base}/{rel}", data / rel, listing[rel]), todo
                ):
                    pass
        except OSError as error:
            raise RemoteError(f"{field}: cannot copy {uri} ({_first_line(error)})") from None
        data.mkdir(parents=True, exist_ok=True)
        manifest = {
            "source": uri.rstrip("/"),
            "files": listing,
            "copied": len(todo),
            "seconds": round(time.time() - started, 3),
        }
        partial = folder / f".{MANIFEST}.part"
        partial.write_text(json.dumps(manifest, indent=1))
        os.replace(partial, folder / MANIFEST)
    return data


def local_root(data, log: Callable[[str], None] | None = print) -> str | None:
    """The folder trials read ``data`` (a DataConfig) from on this node: ``data.root`` itself
    when it is local, else this node's copy of it (:func:`sync_folder`, into
    ``data.cache_dir``)."""
    if not is_object_store(data.root):
        return data.root
    return str(sync_folder(data.root, data.cache_dir, allow_empty=data.download, log=log))


# ----------------------------------------------------------------------------------------------
# A file downloaded once per node


def _download(location: str, target: Path, field: str) -> None:
    """``location`` (s3://, gs://, http(s)://) to ``target``, through a temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    try:
        if is_object_store(location):
            store, path = filesystem(location)
            reader = store.open_input_stream(path, compression=None)
        else:
            reader = urllib.request.urlopen(location, timeout=60)  # noqa: S310 (http(s) only)
        with reader, open(partial, "wb") as writer:
            shutil.copyfileobj(reader, writer, _CHUNK)
    except urllib.error.HTTPError as error:
        raise RemoteError(
            f"{field}: cannot download {location} (HTTP {error.code} {error.reason})"
        ) from None
    except (OSError, urllib.error.URLError) as error:
        reason = getattr(error, "reason", None) or _first_line(error)
        raise RemoteError(f"{field}: cannot download {location} ({reason})") from None
    os.replace(partial, target)


def _extract_member(archive: Path, member: str, target: Path, field: str, url: str) -> None:
    """The one regular file ``member`` of the tar ``archive`` to ``target`` (nothing else is
    extracted, so no path in the archive can write outside the cache)."""
    partial = target.with_name(f".{target.name}.part")
    try:
        with tarfile.open(archive) as tar:
            info = tar.getmember(member)
            if not info.isfile():
                raise RemoteError(f"{field}: {member} in {url} is not a regular file")
            with tar.extractfile(info) as reader, open(partial, "wb") as writer:
                shutil.copyfileobj(reader, writer, _CHUNK)
    except KeyError:
        raise RemoteError(f"{field}: {url.partition('#')[0]} holds no {member}") from None
    except tarfile.TarError as error:
        raise RemoteError(f"{field}: {archive} is not a tar archive ({error})") from None
    os.replace(partial, target)


def check_sha256(path: Path, expected: str, what: str | None = None) -> None:
    """RemoteError naming teacher.sha256 unless the file ``path`` has that sha256 (hex)."""
    with open(path, "rb") as handle:
        actual = hashlib.file_digest(handle, "sha256").hexdigest()
    if actual != expected.lower():
        raise RemoteError(
            f"teacher.sha256: {what or path} has sha256 {actual}, expected {expected.lower()}"
        )


def _cache_name(url: str) -> str:
    """A file name for ``url`` in the cache: its last part (MEMBER's, for ARCHIVE.tar#MEMBER),
    after a digest of the whole URL."""
    location, _, member = url.partition("#")
    name = (member or urlsplit(location).path).rstrip("/").rsplit("/", 1)[-1] or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def fetch_file(
    url: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    field: str = "teacher.checkpoint",
    log: Callable[[str], None] | None = None,
) -> Path:
    """This node's copy of the file ``url`` (s3://, gs://, http(s)://; ``ARCHIVE.tar#MEMBER``:
    one file of a tar archive), downloaded once into ``cache_dir/downloads``.

    ``sha256`` (hex) is checked on every call; a file that does not match is removed from the
    cache (the next call downloads it again) and is a RemoteError naming ``teacher.sha256``.
    """
    location, _, member = url.partition("#")
    folder = cache_dir / "downloads"
    target = folder / _cache_name(url)
    waiting = f"{field}: another process on this node is downloading {url}; waiting"
    with _locked(folder / f".{target.name}.lock", waiting, log):
        if not target.is_file():
            if log:
                log(f"{field}: downloading {url} to {target}")
            if member:
                archive = folder / _cache_name(location)
                if not archive.is_file():
                    _download(location, archive, field)
                _extract_member(archive, member, target, field, url)
            else:
                _download(location, target, field)
        if sha256 is not None:
            try:
                check_sha256(target, sha256, url)
            except RemoteError as error:
                target.unlink()  # the next run downloads it again
                raise RemoteError(f"{error}; removed it from {folder}") from None
    return target


# ----------------------------------------------------------------------------------------------
# What the spec check and the driver read from the store, without downloading


def file_problem(url: str) -> str | None:
    """Why the object ``url`` cannot be a teacher checkpoint (None when it can): an object-store
    URI must name an object (and, for ``ARCHIVE.tar#MEMBER``, the archive); an http(s) URL is
    checked when it is downloaded, as the search starts."""
    location, _, member = url.partition("#")
    if member and not urlsplit(location).path.endswith(".tar"):
        return f"{url}: '#MEMBER' names a file inside a .tar archive; {location} is not one"
    if not is_object_store(location):
        return None if urlsplit(location).netloc else f"{url}: expected https://HOST/PATH"
    (kind,) = _kinds(location, [""])
    return None if kind == "file" else f"no object at {location}"


def root_problem(dataset: str, uri: str, download: bool) -> str | None:
    """Why the remote folder ``uri`` cannot be ``dataset``'s data.root (None when it can), read
    from the object store's listing: an image folder's train/ and val/ (and train/'s class
    folders), or the CIFAR batch files (not needed with data.download). One line, no file read."""
    if dataset == "imagefolder":
        expected = f"expected {uri.rstrip('/')}/train/<class>/*.jpg and val/<class>/*.jpg"
        for role, kind in zip(("train", "val"), _kinds(uri, ["train", "val"]), strict=True):
            if kind != "folder":
                return f"no folder {uri.rstrip('/')}/{role}/ in the object store ({expected})"
        from pyarrow import fs as pafs

        store, base = filesystem(uri)
        try:
            entries = store.get_file_info(pafs.FileSelector(f"{base}/train"))
        except OSError as error:
            return f"cannot list {uri} ({_first_line(error)})"
        if not any(entry.type == pafs.FileType.Directory for entry in entries):
            return f"{uri.rstrip('/')}/train/ has no class folders ({expected})"
        return None
    if dataset in ("cifar10", "cifar100") and not download:
        from sdd_search.data.sources import _CIFAR_LAYOUT  # the batch files each role reads

        layout = _CIFAR_LAYOUT[dataset]
        files = [f"{layout.folder}/{name}" for name in (*layout.train_files, layout.test_file)]
        for name, kind in zip(files, _kinds(uri, files), strict=True):
            if kind != "file":
                return (
                    f"no {uri.rstrip('/')}/{name} in the object store (expected the "
                    f"{layout.pretty} batches below it; or set data.download: true)"
                )
    return None


@lru_cache(maxsize=8)
def _listed_image_folder(uri: str) -> tuple[tuple[str, ...], dict[str, dict[str, int]]]:
    """(train/'s class names sorted, role folder -> class -> image count) from the listing."""
    from sdd_search.data.sources import _IMAGE_SUFFIXES  # the files the local reader takes

    counts: dict[str, dict[str, int]] = {}
    for relative in list_tree(uri):
        parts = relative.split("/")
        if parts[0] not in ("train", "val", "test") or len(parts) < 2:
            continue
        classes = counts.setdefault(parts[0], {})
        if len(parts) == 3:
            images = classes.setdefault(parts[1], 0)
            classes[parts[1]] = images + parts[2].lower().endswith(_IMAGE_SUFFIXES)
    return tuple(sorted(counts.get("train", {}))), counts


def listed_source(source, uri: str):
    """``source`` (a DatasetSource) as :func:`~sdd_search.data.dataset_info` reads it at the
    remote ``uri``, from the object store's listing: the driver learns the classes and the roles'
    sizes without downloading an image. Only an image folder reads its root for that; another
    source is returned as it is (CIFAR's counts are the standard split's, no file opened)."""
    if source.name != "imagefolder":
        return source
    import numpy as np

    from sdd_search.data.base import DatasetError

    where = uri.rstrip("/")
    classes, counts = _listed_image_folder(uri)
    for role in ("train", "val"):
        if role not in counts:
            raise DatasetError(f"imagefolder: no folder {where}/{role}/ in the object store")
    if not classes:
        raise DatasetError(f"imagefolder: {where}/train/ has no class folders")
    index = {name: i for i, name in enumerate(classes)}
    folders = {"train": "train", "selection": "val", "test": "test"}
    if "test" not in counts:
        folders = {"train": "train", "selection": None, "test": "val"}

    def labels(role: str, options) -> np.ndarray | None:
        folder = folders[role]
        if folder is None:
            return None
        present = counts[folder]
        for name in present:
            if name not in index:
                raise DatasetError(
                    f"imagefolder: {where}/{folder}/{name} has no matching class "
                    f"folder in {where}/train/"
                )
            if role == "train" and present[name] == 0:
                raise DatasetError(f"imagefolder: {where}/train/{name} holds no images")
        result = np.concatenate(
            [np.full(present[name], index[name], dtype=np.int64) for name in sorted(present)]
            or [np.zeros(0, dtype=np.int64)]
        )
        if len(result) == 0:
            raise DatasetError(f"imagefolder: {where}/{folder}/ holds no images")
        return result

    def read(role: str, options):
        raise DatasetError(
            f"imagefolder: {where} is remote; read it through sdd_search.remote."
            "local_root (each node's copy)"
        )

    return dataclasses.replace(
        source, num_classes=lambda options: len(classes), labels=labels, read=read
    )


def read_text(uri: str) -> str | None:
    """The text of the file at ``uri`` (a local path or an object-store URI); None if absent."""
    if not is_object_store(uri):
        path = Path(uri)
        return path.read_text() if path.is_file() else None
    from pyarrow import fs

    store, path = filesystem(uri)
    if store.get_file_info(path).type == fs.FileType.NotFound:
        return None
    with store.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` whole (local: via a temporary file and a rename)."""
    if not is_object_store(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(text)
        partial.replace(path)
        return
    store, path = filesystem(uri)
    with store.open_output_stream(path) as stream:
        stream.write(text.encode())
