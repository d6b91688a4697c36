"""Data and teachers from an object store or a URL (sdd_search.remote), on real servers here:
moto's S3 server and Python's HTTP server, both on 127.0.0.1.

What a user sees: the copy on disk, its MANIFEST.json, how often the server was asked for each
object (its own access log), and the one-line errors of ``sdd-search --check``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from object_store import s3_server
from PIL import Image

from sdd_search.cli import main
from sdd_search.config import DataConfig, TeacherConfig, TrialConfig
from sdd_search.data import build_datasets_and_loaders, dataset_info
from sdd_search.remote import (
    MANIFEST,
    RemoteError,
    copy_folder,
    fetch_file,
    list_tree,
    local_root,
    manifest_problem,
    sync_folder,
)
from sdd_search.teacher import TeacherError, ensure_teacher
from sdd_search.trial import require_gpu

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_SPEC = ROOT / "search_spaces" / "imagenet.yaml"
COLOURS = {"ant": (200, 30, 30), "bee": (30, 200, 30)}


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def make_image_folder(root: Path, *, test: bool = False) -> Path:
    """Two classes of real 20x16 JPEGs: 3 per class in train/, 2 in val/ (and test/)."""
    for split, count in (("train", 3), ("val", 2)) + ((("test", 2),) if test else ()):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 16), colour).save(folder / f"{name}_{i}.jpg", "JPEG")
    return root


def files_below(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# A folder copied once per node


def test_a_folder_is_copied_once_and_trials_read_the_copy(s3, tmp_path):
    source = make_image_folder(tmp_path / "images")
    uri = s3.upload_folder(source, s3.bucket("copy-once"), "imagenet")
    data = DataConfig(dataset="imagefolder", root=uri, cache_dir=str(tmp_path / "cache"))
    lines: list[str] = []

    root = local_root(data, log=lines.append)
    assert files_below(Path(root)) == files_below(source)
    manifest = json.loads((copy_folder(uri, data.cache_dir) / MANIFEST).read_text())
    assert manifest["source"] == uri
    assert manifest["files"] == {k: len(v) for k, v in files_below(source).items()}
    expected = Counter({f"imagenet/{name}": 1 for name in files_below(source)})
    assert s3.log.downloads("copy-once") == expected
    assert lines == [f"data.root: copying 10 of 10 files (0.0 MB) of {uri} to {root}"]

    # The next trial on this node: the copy as it is, no listing, nothing downloaded again.
    requests = len(s3.log.lines)
    assert local_root(data, log=lines.append) == root
    assert len(s3.log.lines) == requests and len(lines) == 1

    info, train, _ = build_datasets_and_loaders(
        "imagefolder", root=root, batch_size=2, device="cpu", image_size=16, num_workers=0
    )
    assert info.num_classes == 2 and info.num_train + info.num_selection == 6
    images, labels = next(iter(train))
    assert images.shape == (2, 3, 16, 16) and set(labels.tolist()) <= {0, 1}


def test_a_partial_copy_resumes(s3, tmp_path):
    """As a copy killed half-way leaves it: some files whole, one cut short, a temporary file,
    no manifest. The next copy keeps the whole ones and fetches the rest."""
    source = make_image_folder(tmp_path / "images")
    uri = s3.upload_folder(source, s3.bucket("resume"), "data")
    cache = str(tmp_path / "cache")
    data = copy_folder(uri, cache) / "data"
    names = sorted(files_below(source))
    whole, cut = names[:4], names[4]
    for name in whole:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes((source / name).read_bytes())
    (data / cut).write_bytes((source / cut).read_bytes()[:100])
    (data / cut).with_name(f".{Path(cut).name}.part").write_bytes(b"half")

    assert sync_folder(uri, cache) == data
    assert files_below(source).items() <= files_below(data).items()
    downloads = s3.log.downloads("resume")
    assert set(downloads) == {f"data/{name}" for name in names[4:]}  # not the whole ones
    assert set(downloads.values()) == {1}
    assert json.loads((data.parent / MANIFEST).read_text())["copied"] == len(names) - 4
    assert manifest_problem(data.parent, uri) is None


def test_the_manifest_finds_a_damaged_copy(s3, tmp_path):
    source = make_image_folder(tmp_path / "images")
    uri = s3.upload_folder(source, s3.bucket("damaged"), "data")
    cache = str(tmp_path / "cache")
    data = sync_folder(uri, cache)
    folder = data.parent
    truncated, deleted = "train/ant/ant_1.jpg", "val/bee/bee_0.jpg"
    (data / truncated).write_bytes(b"x")
    (data / deleted).unlink()
    size = (source / truncated).stat().st_size
    assert manifest_problem(folder, uri) == f"{truncated} is not {size} bytes"
    assert manifest_problem(folder, uri.replace("data", "other")) == f"the manifest is of {uri!r}"

    sync_folder(uri, cache)  # lists again, fetches only what the manifest check found wrong
    assert manifest_problem(folder, uri) is None
    assert files_below(data) == files_below(source)
    downloads = s3.log.downloads("damaged")
    assert downloads[f"data/{truncated}"] == downloads[f"data/{deleted}"] == 2
    assert sum(downloads.values()) == len(files_below(source)) + 2


def test_two_trials_on_one_node_copy_once(s3, tmp_path):
    """Two copiers at once (as two trials starting on one node): the lock lets one copy; the
    other waits and takes the finished copy."""
    source = make_image_folder(tmp_path / "images")
    uri = s3.upload_folder(source, s3.bucket("two-at-once"), "data")
    cache = str(tmp_path / "cache")
    start, results, lines = threading.Barrier(2), [], []

    def copier():
        start.wait()
        results.append(sync_folder(uri, cache, log=lines.append))

    threads = [threading.Thread(target=copier) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1]
    assert set(s3.log.downloads("two-at-once").values()) == {1}
    assert len(s3.log.downloads("two-at-once")) == len(files_below(source))
    assert sum(line.startswith("data.root: copying 10 of 10") for line in lines) == 1, lines
    assert set(lines) <= {
        f"data.root: another process on this node is copying {uri}; waiting",
        *(line for line in lines if line.startswith("data.root: copying")),
    }


def test_an_empty_prefix_is_one_line(s3, tmp_path):
    uri = f"s3://{s3.bucket('empty')}/nothing"
    with pytest.raises(RemoteError) as error:
        sync_folder(uri, str(tmp_path))
    assert str(error.value) == f"data.root: {uri} holds no files (expected the dataset below it)"
    assert sync_folder(uri, str(tmp_path), allow_empty=True).is_dir()  # CIFAR + data.download


def test_the_s3_endpoint_comes_from_the_environment(s3, tmp_path, monkeypatch):
    source = make_image_folder(tmp_path / "images")
    uri = s3.upload_folder(source, s3.bucket("endpoint"), "data")
    # AWS_ENDPOINT_URL_S3 (the S3-only setting) wins over AWS_ENDPOINT_URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    assert len(list_tree(uri)) == 10
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    with pytest.raises(RemoteError) as error:
        list_tree(uri)
    assert str(error.value).startswith(f"cannot list {uri} (") and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# What the driver reads without downloading, and the spec check


@pytest.mark.parametrize("with_test", [False, True])
def test_dataset_info_of_an_s3_root_equals_the_local_folders(s3, tmp_path, with_test):
    source = make_image_folder(tmp_path / "images", test=with_test)
    bucket = s3.bucket(f"info-{int(with_test)}")
    uri = s3.upload_folder(source, bucket, "images")
    (source / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored by both
    s3.client.put_object(Bucket=bucket, Key="images/train/ant/notes.txt", Body=b"not an image")
    for stage in ("search", "final"):
        remote = dataset_info("imagefolder", uri, 16, stage=stage)
        assert remote == dataset_info("imagefolder", str(source), 16, stage=stage)
    assert not s3.log.downloads(bucket), "the driver lists the bucket, it downloads nothing"


def test_check_lists_the_bucket_for_an_s3_root(s3, tmp_path, capsys):
    """`sdd-search search_spaces/imagenet.yaml --check --set data.root=s3://...` on a machine with
    no ImageNet: the object store is listed, nothing is downloaded."""
    bucket = s3.bucket("imagenet-check")
    uri = s3.upload_folder(make_image_folder(tmp_path / "images"), bucket, "imagenet")
    assert main([str(IMAGENET_SPEC), "--check", "--set", f"data.root={uri}"]) == 0
    out = capsys.readouterr().out
    assert "spec OK" in out and f"imagefolder at {uri}" in out
    assert not s3.log.downloads(bucket)

    without_train = s3.upload_folder(tmp_path / "images" / "val", bucket, "only-val/val")
    without_train = without_train.removesuffix("/val")
    assert main([str(IMAGENET_SPEC), "--check", "--set", f"data.root={without_train}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"sdd-search: error: {IMAGENET_SPEC}: data.root: no folder {without_train}/train/ in the "
        f"object store (expected {without_train}/train/<class>/*.jpg and val/<class>/*.jpg)\n"
    )
    missing_bucket = "s3://no-such-bucket-here/imagenet"
    assert main([str(IMAGENET_SPEC), "--check", "--set", f"data.root={missing_bucket}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root: " in err, err


def test_check_finds_cifar_batches_and_teachers_in_the_bucket(s3, tmp_path, write_spec):
    from sdd_search.spec import SpecError, load_spec

    bucket = s3.bucket("cifar-check")
    for name in ("train", "test"):
        s3.client.put_object(Bucket=bucket, Key=f"cifar/cifar-100-python/{name}", Body=b"x")
    s3.client.put_object(Bucket=bucket, Key="teachers/t.pth", Body=b"x")
    spec = write_spec(
        {
            "data": {"dataset": "cifar100", "root": f"s3://{bucket}/cifar"},
            "teacher": {"model": "resnet8", "source": "checkpoint"},
        }
    )
    good = f"teacher.checkpoint=s3://{bucket}/teachers/t.pth"
    assert load_spec(spec, [good]).data.root == f"s3://{bucket}/cifar"
    with pytest.raises(SpecError) as error:
        load_spec(spec, [good, f"data.root=s3://{bucket}/nothing"])
    assert str(error.value) == (
        f"{spec}: data.root: no s3://{bucket}/nothing/cifar-100-python/train in the object store "
        "(expected the CIFAR-100 batches below it; or set data.download: true)"
    )
    with pytest.raises(SpecError) as error:
        load_spec(spec, [f"teacher.checkpoint=s3://{bucket}/teachers/missing.pth"])
    assert str(error.value) == (
        f"{spec}: teacher.checkpoint: no object at s3://{bucket}/teachers/missing.pth"
    )
    with pytest.raises(SpecError) as error:
        load_spec(spec, [good, "teacher.sha256=abc"])
    assert "teacher.sha256: String should match pattern" in str(error.value)


# --------------------------------------------------------------------------------------------
# A teacher downloaded once per node


def _checkpoint_bytes() -> bytes:
    from sdd_search.models import create_model

    buffer = io.BytesIO()
    torch.save({"model": create_model("resnet8", num_classes=2).state_dict()}, buffer)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_an_s3_teacher_downloads_once_and_a_wrong_checksum_is_one_line(s3, tmp_path):
    payload = _checkpoint_bytes()
    bucket = s3.bucket("teachers")
    s3.client.put_object(Bucket=bucket, Key="resnet8/ckpt.pth", Body=payload)
    url = f"s3://{bucket}/resnet8/ckpt.pth"
    teacher = TeacherConfig(
        model="resnet8",
        source="checkpoint",
        checkpoint=url,
        sha256=_sha256(payload),
        cache_dir=str(tmp_path / "cache"),
    )
    config = TrialConfig(teacher=teacher)
    path = ensure_teacher(config, log=lambda *_: None)
    assert path.read_bytes() == payload and path.is_relative_to(tmp_path / "cache" / "downloads")
    assert ensure_teacher(config, log=lambda *_: None) == path
    assert s3.log.downloads(bucket) == Counter({"resnet8/ckpt.pth": 1})

    wrong = "0" * 64
    other = TrialConfig(teacher=teacher.model_copy(update={"sha256": wrong}))
    with pytest.raises(TeacherError) as error:
        ensure_teacher(other, log=lambda *_: None)
    message = str(error.value)
    assert message.startswith(
        f"teacher.sha256: {url} has sha256 {_sha256(payload)}, expected {wrong}; removed it"
    )
    assert "\n" not in message and not path.exists()


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_request(self, code="-", size="-"):  # the access log, kept instead of printed
        self.requests.append(f"{self.requestline} {int(code)}")

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def http_server(folder: Path):
    """Python's own HTTP server for ``folder`` on 127.0.0.1: (its base URL, its request lines)."""
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        thread.join()


def test_a_teacher_inside_a_tar_release_over_http(tmp_path):
    """mdistiller's teachers ship as one cifar_teachers.tar: ``URL#MEMBER`` downloads the
    archive once and takes that one file out of it."""
    payload = _checkpoint_bytes()
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "cifar_teachers.tar", "w") as tar:
        for name, data in (
            ("cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth", payload),
            ("cifar_teachers/other/ckpt_epoch_240.pth", b"other"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cache = tmp_path / "cache"
    with http_server(served) as (base, requests):
        url = f"{base}/cifar_teachers.tar#cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"
        path = fetch_file(url, cache, sha256=_sha256(payload))
        assert path.read_bytes() == payload
        assert fetch_file(url, cache) == path
        with pytest.raises(RemoteError) as error:
            fetch_file(f"{base}/cifar_teachers.tar#cifar_teachers/nope.pth", cache)
        assert str(error.value) == (
            f"teacher.checkpoint: {base}/cifar_teachers.tar holds no cifar_teachers/nope.pth"
        )
        with pytest.raises(RemoteError) as error:
            fetch_file(f"{base}/missing.pth", cache)
        assert str(error.value) == (
            f"teacher.checkpoint: cannot download {base}/missing.pth (HTTP 404 File not found)"
        )
    assert requests == ["GET /cifar_teachers.tar HTTP/1.1 200", "GET /missing.pth HTTP/1.1 404"]
    # The cache: the archive (kept for its other members) and the one member taken out of it.
    kept = [p.name for p in (cache / "downloads").iterdir() if not p.name.startswith(".")]
    assert sorted(name.split("-", 1)[1] for name in kept) == [
        "cifar_teachers.tar",
        "ckpt_epoch_240.pth",
    ]


# --------------------------------------------------------------------------------------------
# A trial that asked for a GPU


def test_a_trial_that_asks_for_a_gpu_and_finds_none_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: require_gpu returns")
    with pytest.raises(RuntimeError) as error:
        require_gpu(0.5)
    message = str(error.value)
    assert message.startswith(f"resources.gpus_per_worker is 0.5 but torch {torch.__version__}")
    assert "\n" not in message and message.endswith("or set train.device: cpu")
