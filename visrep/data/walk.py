"""List the files of an image-folder tree: every real directory once, named by the path the user laid out.

    files, skipped = list_tree(root, keep_file=is_image, keep_dir=not_hidden)
    # files: [("train", "cat", "001.png"), ...]; skipped: ["train/cat/up -> .."]

Directory symlinks are followed, since a class folder may live elsewhere (`train/bird -> /data/birds`),
but no real directory is listed twice, so a link can neither loop nor relabel images:
  * the tree is first listed without following any link, so a directory reachable that way is listed
    through that path only (a link into the tree, e.g. `test/cat -> ../train/cat`, is skipped);
  * links are then followed in sorted order, and a folder behind several links is listed once, through
    the first;
  * a link whose target holds the link itself or the whole tree (`cat/up -> ..`, `cat/all -> /`) is a
    cycle and is skipped.
Skipped links come back as "link -> its target as written" for the caller to report.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Callable

__all__ = ["list_tree"]

Parts = tuple[str, ...]


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _contains(outer: str, inner: str) -> bool:
    """Whether real path `outer` is `inner` or one of its ancestors."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _scan(path: str, rel: Parts, keep_file, keep_dir, seen: set, files: list, links: list, skipped: list) -> None:
    """Depth-first listing of `path` (shown as `rel`) that does not follow directory links: files go
    to `files`, directory links to `links` (followed later), repeated real directories to `skipped`."""
    try:
        ident = _identity(path)
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return  # an unreadable folder is left out, as os.walk does
    if ident in seen:  # the same directory mounted or linked twice
        skipped.append(f"{'/'.join(rel)} -> {os.path.realpath(path)}")
        return
    seen.add(ident)
    for e in entries:
        try:
            is_dir = e.is_dir()  # follows links; a broken link is not a directory
        except OSError:
            continue
        if is_dir:
            if not keep_dir(e.name):
                continue
            if e.is_symlink():
                links.append((rel + (e.name,), e.path))
            else:
                _scan(e.path, rel + (e.name,), keep_file, keep_dir, seen, files, links, skipped)
        elif keep_file(e.name):
            files.append(rel + (e.name,))


def _describe(rel: Parts, link: str) -> str:
    try:
        return f"{'/'.join(rel)} -> {os.readlink(link)}"
    except OSError:
        return "/".join(rel)


def list_tree(root: str | os.PathLike, keep_file: Callable[[str], bool],
              keep_dir: Callable[[str], bool]) -> tuple[list[Parts], list[str]]:
    """(sorted file paths relative to `root` as parts, skipped directory links) of the tree at `root`.

    keep_file(name) / keep_dir(name): which file / directory names to list (e.g. images, not hidden)."""
    root = os.fspath(root)
    root_real = os.path.realpath(root)
    seen: set = set()
    files: list[Parts] = []
    skipped: list[str] = []
    links: deque = deque()
    _scan(root, (), keep_file, keep_dir, seen, files, links, skipped)
    while links:  # in the order found (sorted), links found inside a followed folder last
        rel, link = links.popleft()
        target = os.path.realpath(link)
        where = os.path.realpath(os.path.dirname(link))
        try:
            repeated = _identity(target) in seen
        except OSError:
            continue
        if repeated or _contains(target, where) or _contains(target, root_real):
            skipped.append(_describe(rel, link))
            continue
        _scan(target, rel, keep_file, keep_dir, seen, files, links, skipped)
    files.sort()
    return files, skipped
