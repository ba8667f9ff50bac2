"""The shard stream's own tar reader against Python's tarfile, on archives of every format tarfile writes."""

import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from visrep.data.tar_reader import BLOCK, TarFormatError, open_tar


class _Stream:
    """A non-seekable stream (what a URL gives): read() only."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def read(self, n=-1):
        return self._f.read(n)


def _archive(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A tar with short and long (> 100 and > 255 characters) names, an empty file, a folder, a symlink, a
    non-ASCII name and a float mtime; returns it and its regular files in order."""
    files = [("a/x000.jpg", b"\xff\xd8 jpeg bytes" * 50), ("a/x000.cls", b"3"), ("a/x000.json", b'{"k": 1}'),
             ("b/" + "d" * 120 + "/y.jpg", bytes(range(256)) * 3), ("empty.cls", b""),
             ("/".join(["long"] * 70) + ".png", b"png" * 700), ("caf\u00e9/z.cls", b"7")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for i, (name, data) in enumerate(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5 if i % 2 else 0
            tf.addfile(info, io.BytesIO(data))
            if i == 1:
                link = tarfile.TarInfo("a/link.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, "x000.jpg"
                tf.addfile(link)
    return buf.getvalue(), files


def _read_all(members) -> list[tuple[str, bytes]]:
    out = []
    while (m := members.next()) is not None:
        name, size, is_file = m
        if is_file:
            data = members.read()
            assert len(data) == size
            out.append((name, data))
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("seekable", [True, False])
def test_reads_what_tarfile_writes(fmt, seekable):
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the 350-character name or a float mtime
        raw, files = _archive(tarfile.PAX_FORMAT)
        files = [f for f in files if len(f[0]) < 250]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
    else:
        raw, files = _archive(fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:  # the reference
        expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    assert expected == files
    f = io.BytesIO(raw) if seekable else _Stream(raw)
    assert _read_all(open_tar(f, seekable=seekable)) == files


def test_skipped_members_and_compressed_archives():
    raw, files = _archive(tarfile.PAX_FORMAT)
    for packed in (raw, gzip.compress(raw), bz2.compress(raw), lzma.compress(raw)):
        for seekable in (True, False):
            m = open_tar(io.BytesIO(packed) if seekable else _Stream(packed), seekable=seekable)
            names = []
            while (h := m.next()) is not None:  # headers only: the data is skipped unread
                names.append(h[0])
            assert [n for n in names if n in dict(files)] == [n for n, _ in files]
            assert "a" in names and "a/link.jpg" in names


def test_base256_size_and_signed_checksum():
    """A size in GNU base-256 (0x80 marker, big-endian), and a header summed as signed bytes (old writers)."""
    header = bytearray(BLOCK)
    header[0:5] = b"f.cls"
    header[100:108] = b"0000644\0"
    header[124:136] = b"\x80" + (5).to_bytes(11, "big")
    header[156:157] = b"0"
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)  # 0x80 counts as -128
    assert signed != sum(header)
    header[148:156] = b"%06o\0 " % signed
    raw = bytes(header) + b"hello" + bytes(BLOCK - 5) + bytes(2 * BLOCK)
    m = open_tar(io.BytesIO(raw), seekable=True)
    assert m.next() == ("f.cls", 5, True) and m.read() == b"hello" and m.next() is None


def test_damage_is_an_error_after_the_good_members():
    raw, files = _archive(tarfile.PAX_FORMAT)
    cut = raw[: len(raw) // 2]
    m = open_tar(io.BytesIO(cut), seekable=False)
    got = []
    with pytest.raises(TarFormatError, match="ends"):
        while (h := m.next()) is not None:
            if h[2]:
                got.append((h[0], m.read()))
    assert got and got == files[: len(got)]

    bad = bytearray(raw)
    bad[0] ^= 0xFF  # the first header's name byte, so its checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum"):
        open_tar(io.BytesIO(bytes(bad)), seekable=True).next()
    assert open_tar(io.BytesIO(b""), seekable=True).next() is None  # an empty file is an empty archive
