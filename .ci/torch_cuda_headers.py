"""Extracts torch/include/ of the registry's CUDA torch wheel into DEST, reading only those members
(about 10 MB of a 527 MB wheel) with HTTP range requests; each file is checked against the
wheel's RECORD (sha256). Usage: python .ci/torch_cuda_headers.py VERSION DEST"""

import base64
import hashlib
import json
import sys
import urllib.request
import zipfile
from pathlib import Path

INDEX = "https://pypi.org/simple/torch/"


def wheel_url(version: str) -> tuple[str, int]:
    req = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    name = f"torch-{version}-{py}-{py}-manylinux_2_28_x86_64.whl"
    (f,) = [f for f in files if f["filename"] == name]
    return f["url"], f["size"]


class Ranges:
    """A read-only file over HTTP range requests, with one window of cached bytes."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos, self.window = url, size, 0, (0, b"")

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def fetch(self, start: int, end: int) -> None:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}"})
        self.window = (start, urllib.request.urlopen(req, timeout=300).read())

    def read(self, n=-1):
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        start, data = self.window
        if not (start <= self.pos and self.pos + n <= start + len(data)):
            self.fetch(self.pos, self.pos + max(n, 1 << 16))
            start, data = self.window
        out = data[self.pos - start : self.pos - start + n]
        self.pos += len(out)
        return out


def main(version: str, dest: str) -> None:
    url, size = wheel_url(version)
    f = Ranges(url, size)
    wheel = zipfile.ZipFile(f)
    record = next(i for i in wheel.namelist() if i.endswith(".dist-info/RECORD"))
    digests = {p: h for p, h, _ in (line.split(",") for line in wheel.read(record).decode().splitlines() if line)}
    members = sorted(
        (i for i in wheel.infolist() if i.filename.startswith("torch/include/") and not i.is_dir()),
        key=lambda i: i.header_offset,
    )
    f.fetch(members[0].header_offset, members[-1].header_offset + members[-1].compress_size + (1 << 16))  # one request
    out = Path(dest)
    for i in members:
        data = wheel.read(i)
        want = digests[i.filename].removeprefix("sha256=")
        got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if got != want:
            sys.exit(f"{i.filename}: sha256 differs from the wheel's RECORD")
        path = out / i.filename.removeprefix("torch/include/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if not (out / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        sys.exit(f"torch {version} from {INDEX} is not a CUDA build (no cuda_cmake_macros.h)")
    print(f"{len(members)} headers of {url.rsplit('/', 1)[1]} in {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
