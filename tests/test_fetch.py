"""`kedro data fetch` against a local HTTP server (127.0.0.1, started here, with Range support):
a cut download resumes, a wrong checksum is refused with nothing extracted, a 404 names its URL.
No test reaches the internet."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clip_continual.data.fetch import Download, FetchError, fetch_dataset, fetch_file, how_to_get


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_once: set[str] = set()
    ranges: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        data = self.files.get(self.path)
        self.ranges.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.path in self.cut_once:  # the connection drops half-way
            self.cut_once.discard(self.path)
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    _Files.files, _Files.cut_once, _Files.ranges = {}, set(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (("toyset/a.txt", b"alpha" * 2000), ("toyset/sub/b.txt", b"beta")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return buffer.getvalue()


def _item(url: str, data: bytes, **changes) -> Download:
    fields = dict(dataset="toy", url=url, filename="toy.tar.gz", md5=hashlib.md5(data).hexdigest(), sha256="",
                  kind="archive", dest=".", inner="")
    return Download(**{**fields, **changes})


def test_a_cut_download_resumes_with_a_range_request_and_extracts(server, tmp_path):
    data = _archive()
    _Files.files["/toy.tar.gz"], _Files.cut_once = data, {"/toy.tar.gz"}
    assert fetch_file(_item(f"{server}/toy.tar.gz", data), tmp_path / "toy", progress=False)
    assert (tmp_path / "toy" / "toyset" / "a.txt").read_bytes() == b"alpha" * 2000
    assert _Files.ranges[0] == ("/toy.tar.gz", None)
    assert _Files.ranges[1][1] == f"bytes={len(data) // 2}-"
    assert not [p for p in (tmp_path / "toy").iterdir() if p.name.startswith(".extract") or p.suffix == ".part"]
    assert not fetch_file(_item(f"{server}/toy.tar.gz", data), tmp_path / "toy", progress=False)  # done before


def test_a_wrong_checksum_is_refused_and_nothing_is_extracted(server, tmp_path):
    data = _archive()
    _Files.files["/toy.tar.gz"] = data
    with pytest.raises(FetchError, match=f"md5 {hashlib.md5(data).hexdigest()}, not 0+ as published"):
        fetch_file(_item(f"{server}/toy.tar.gz", data, md5="0" * 32), tmp_path / "toy", progress=False)
    assert list((tmp_path / "toy").iterdir()) == []  # neither the file nor its contents


def test_a_missing_file_is_reported_with_its_url(server, tmp_path):
    with pytest.raises(FetchError, match=rf"HTTP 404 .* for {server}/gone.tar.gz"):
        fetch_file(_item(f"{server}/gone.tar.gz", b""), tmp_path / "toy", progress=False)


def test_gzip_files_are_unpacked_beside_each_other(server, tmp_path):
    data = gzip.compress(b"\0\0\x08\x01" + b"\0" * 8)
    _Files.files["/t10k-labels-idx1-ubyte.gz"] = data
    item = _item(f"{server}/t10k-labels-idx1-ubyte.gz", data, filename="t10k-labels-idx1-ubyte.gz", kind="gunzip",
                 dest="raw")
    fetch_file(item, tmp_path / "MNIST", progress=False)
    assert (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()[:4] == b"\0\0\x08\x01"


def test_what_cannot_be_downloaded_prints_where_to_get_it(tmp_path):
    line = fetch_dataset("stanford_cars", tmp_path / "stanford_cars")
    assert line.startswith("MANUAL stanford_cars") and "Kaggle" in line and "stanford_cars'" in line
    assert "image-net.org" in how_to_get("imagenet_tiered_test")
    assert how_to_get("cifar100") == "Run `kedro data fetch --dataset cifar100`."
