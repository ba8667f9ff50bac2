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


_COMPRESS = {"plain": lambda b: b, "gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress,
             "lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)}


@pytest.mark.parametrize("how", list(_COMPRESS))
def test_skipped_members_and_compressed_archives(how):
    raw, files = _archive(tarfile.PAX_FORMAT)
    packed = _COMPRESS[how](raw)
    for seekable in (True, False):
        m = open_tar(io.BytesIO(packed) if seekable else _Stream(packed), seekable=seekable)
        names = []
        while (h := m.next()) is not None:  # headers only: the data is skipped unread
            names.append(h[0])
        assert [n for n in names if n in dict(files)] == [n for n, _ in files]
        assert "a" in names and "a/link.jpg" in names
        assert m.next() is None  # stays at the end
        assert _read_all(open_tar(io.BytesIO(packed) if seekable else _Stream(packed), seekable)) == files


class _Trickle(_Stream):
    """A raw stream that returns at most 100 bytes a read (a pipe or socket may)."""

    def read(self, n=-1):
        return self._f.read(n if n is not None and 0 <= n < 100 else 100)


def test_short_reads_and_a_plain_tar_whose_first_name_looks_compressed():
    raw, files = _archive(tarfile.PAX_FORMAT)
    assert _read_all(open_tar(_Trickle(raw), seekable=False)) == files
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("BZh91AY&SY.jpg", "\x1f\x8b\x08.cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    got = _read_all(open_tar(io.BytesIO(buf.getvalue()), seekable=True))
    assert got == [("BZh91AY&SY.jpg", b"abc"), ("\x1f\x8b\x08.cls", b"abc")]


def test_pax_size_and_path_override_the_header_and_global_records_are_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        info = tarfile.TarInfo("short.jpg")
        info.size, info.pax_headers = 5, {"path": "the/real/name.jpg", "size": "5"}
        tf.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("l")
        link.type, link.linkname = tarfile.SYMTYPE, "x" * 150  # a GNU-style long link name goes in pax here
        tf.addfile(link)
    raw = bytearray(buf.getvalue())
    # the member's own ustar header (after the global header and the pax header, 2 blocks each) says size 0:
    # only the pax record gives the right size
    h = 4 * BLOCK
    assert raw[h + 156:h + 157] == b"0"
    raw[h + 124:h + 136] = b"00000000000\0"
    raw[h + 148:h + 156] = b" " * 8
    raw[h + 148:h + 156] = b"%06o\0 " % sum(raw[h:h + BLOCK])
    m = open_tar(io.BytesIO(bytes(raw)), seekable=True)
    assert m.next() == ("the/real/name.jpg", 5, True) and m.read() == b"hello"
    assert m.next() == ("l", 0, False) and m.next() is None


def test_gnu_long_link_and_hard_link_with_a_size():
    """A hard link's header may carry its target's size with no data after it (old Solaris tar): nothing is
    skipped after it, as in tarfile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        link = tarfile.TarInfo("s")
        link.type, link.linkname = tarfile.SYMTYPE, "y" * 150  # a GNU 'K' header
        tf.addfile(link)
        hard = tarfile.TarInfo("h")
        hard.type, hard.linkname, hard.size = tarfile.LNKTYPE, "s", 4000
        tf.addfile(hard)
        info = tarfile.TarInfo("after.cls")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"42"))
    m = open_tar(io.BytesIO(buf.getvalue()), seekable=True)
    assert m.next()[::2] == ("s", False) and m.next() == ("h", 4000, False)
    assert m.next() == ("after.cls", 2, True) and m.read() == b"42"


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

    m = open_tar(io.BytesIO(cut), seekable=True)  # seekable: a seek past the end must not look like the end
    with pytest.raises(TarFormatError, match="ends"):
        while m.next() is not None:
            pass

    second = BLOCK * 2 + -(-len(files[0][1]) // BLOCK) * BLOCK  # the folder's header, the first file's
    bad = bytearray(raw)
    assert bad[second:second + 1] != b"\0"
    bad[second] ^= 0xFF  # a name byte of a later header, so its checksum no longer matches
    m = open_tar(io.BytesIO(bytes(bad)), seekable=True)
    with pytest.raises(TarFormatError, match="checksum"):
        while m.next() is not None:
            pass
    assert open_tar(io.BytesIO(b""), seekable=True).next() is None  # an empty file is an empty archive
    m = open_tar(io.BytesIO(raw[:300]), seekable=True)  # cut inside the first header: a truncation like any other
    with pytest.raises(TarFormatError, match="ends inside a header"):
        m.next()
    with pytest.raises(TarFormatError, match="not a tar archive"):
        open_tar(io.BytesIO(b"this is not a tar file at all" * 40), seekable=True)


@pytest.mark.parametrize("how", ["gzip", "xz", "bzip2"])
def test_corrupt_compressed_data_is_a_format_error(how):
    raw, files = _archive(tarfile.PAX_FORMAT)
    packed = bytearray(_COMPRESS[how](raw))
    for i in range(len(packed) // 2, len(packed) // 2 + 64):
        packed[i] ^= 0x5A
    m = open_tar(io.BytesIO(bytes(packed)), seekable=True)
    with pytest.raises(TarFormatError):
        while (h := m.next()) is not None:
            if h[2]:
                m.read()
