"""Per-image binary attributes (AAFace's soft biometrics) for `pipeline pack --attributes FILE`.

Two formats, told apart by the first line:
- TSV with a header: `path<TAB>name...`, then one row per image with 0/1 values; empty, -1 or nan = unknown.
- CelebA's `list_attr_celeba.txt` as distributed: the image count on line 1, the attribute names on line 2
  (space separated), then `file v1 v2 ...` (any whitespace) with 1 = yes and -1 = no (-1 is a label here).

They are stored in the label vector as 1.0 / 0.0, unknown as -1.0; images the file does not list get -1.0
everywhere. Paths are matched as given (absolute), relative to the attribute file's folder, or relative to
a source's root (a folder, or the folder of a list file). CelebA's rows name bare files ("000001.jpg"):
those also match an image by its file name alone, and two images of one name are then an error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

RESERVED = ("identity", "identity_hi", "identity_lo", "masked")
UNKNOWN = -1.0


class AttributeFileError(ValueError):
    """An attribute file that cannot be read as either format, or that names images ambiguously."""


def _check_names(path: Path, names: list[str]) -> None:
    if not names or set(names) & set(RESERVED) or len(set(names)) != len(names):
        raise AttributeFileError(f"{path}: attribute names must be unique and not one of {sorted(RESERVED)}")


def _read_tsv(path: Path, lines: list[str]) -> tuple[list[str], dict[str, tuple]]:
    if not lines or not lines[0].startswith("path\t"):
        raise AttributeFileError(f"{path}: the first line must be a header 'path<TAB>attribute...' "
                                 "(or CelebA's image count)")
    names = lines[0].split("\t")[1:]
    _check_names(path, names)
    table: dict[str, tuple] = {}
    for lineno, line in enumerate(lines[1:], 2):
        cols = line.split("\t")
        if len(cols) != len(names) + 1:
            raise AttributeFileError(f"{path}:{lineno}: expected {len(names) + 1} columns")
        values = []
        for v in cols[1:]:
            v = v.strip().lower()
            if v in ("", "-1", "nan"):
                values.append(UNKNOWN)
            elif v in ("0", "1"):
                values.append(float(v))
            else:
                raise AttributeFileError(f"{path}:{lineno}: attribute values are 0, 1, or empty/-1 for "
                                         f"unknown, not {v!r}")
        table[cols[0]] = tuple(values)
    return names, table


def _read_celeba(path: Path, lines: list[str]) -> tuple[list[str], dict[str, tuple]]:
    count = int(lines[0].strip())
    if len(lines) < 2:
        raise AttributeFileError(f"{path}: CelebA format: line 2 must name the attributes")
    names = lines[1].split()
    _check_names(path, names)
    values_of = {"1": 1.0, "-1": 0.0, "0": 0.0}
    table: dict[str, tuple] = {}
    for lineno, line in enumerate(lines[2:], 3):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != len(names) + 1:
            raise AttributeFileError(f"{path}:{lineno}: expected a file name and {len(names)} values")
        try:
            table[cols[0]] = tuple(values_of[v] for v in cols[1:])
        except KeyError as e:
            raise AttributeFileError(f"{path}:{lineno}: CelebA attribute values are 1 or -1, "
                                     f"not {e.args[0]!r}") from None
    if len(table) != count:
        raise AttributeFileError(f"{path}: line 1 says {count} images, the file lists {len(table)} "
                                 "(truncated?)")
    return names, table


def read_attribute_file(path: str | os.PathLike) -> tuple[list[str], dict[str, tuple]]:
    """(attribute names, {path as written: values}) of a TSV or CelebA attribute file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise AttributeFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise AttributeFileError(f"cannot read {path}: {e.strerror or e}") from None
    if lines and lines[0].strip().isdigit():
        return _read_celeba(path, lines)
    return _read_tsv(path, lines)


def load_attributes(path: str | os.PathLike, listings: Iterable) -> tuple[list[str], Callable]:
    """(attribute names, lookup(path, offset=-1) -> values) for the images of the pack's source `listings`
    (`pipeline.sources.SourceListing`); a record of a .rec source (offset >= 0), which has no file of its
    own, gets unknowns."""
    names, table = read_attribute_file(path)
    base = Path(path).parent
    roots = [Path(lst.root) if Path(lst.root).is_dir() else Path(lst.root).parent for lst in listings]
    by_name = all("/" not in k and os.sep not in k for k in table)  # CelebA: bare file names
    matched_by_name: dict[str, str] = {}
    unknown = tuple([UNKNOWN] * len(names))

    def lookup(image: str | os.PathLike, offset: int = -1) -> tuple:
        if offset >= 0:
            return unknown
        p = Path(image)
        candidates = [str(p), os.path.relpath(p, base)] + [os.path.relpath(p, r) for r in roots]
        for c in candidates:
            if c in table:
                return table[c]
        if by_name and p.name in table:
            other = matched_by_name.setdefault(p.name, str(p))
            if other != str(p):
                raise AttributeFileError(f"{path}: row {p.name!r} matches both {other} and {p} by file name; "
                                         "give paths relative to a source root")
            return table[p.name]
        return unknown

    return names, lookup
