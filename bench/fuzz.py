"""Fuzz campaign: mutated `.rec`/`.idx`/`manifest.json` variants of a small packed set through `verify` and
every reader (issue O, "Nothing lost, nothing corrupt trained on").

    python bench/fuzz.py --variants 10000 --dali 300 [--seed 0] [--data DIR]

Each variant is one mutation of one file of a clean packed set (20 identities x 10 glint24 faces, a few
shards, one held-out image per identity): byte flips, zeroed runs, record-header fields, zeroed JPEGs,
truncation and duplication in a `.rec`; deleted, repeated, swapped and mangled lines in an `.idx`; JSON
and raw-text mutations of the manifest. The oracle, per variant:
- `verify` passes: PackedDataset reads exactly the clean set's records (same ids, identities and payload
  bytes, nothing skipped); the torch loader and the DALI reader yield the clean set's labels.
- `verify` fails: with VerifyError naming a file of the dataset; each reader either stops at its start with
  a typed error (ManifestError, RecordIOError) naming a file, or reads, skipping and counting bad records,
  and every record it returns has an identity in range.
Findings: `untyped` (any other exception), `unnamed` (an error naming no file), `harmful` (verify passed
but a reader lost, repeated, changed or skipped a record), `crash` (the DALI subprocess died: SIGSEGV).
The DALI reader runs in a subprocess over a batch of variants (fewer: a pipeline build each).
`tests/test_fuzz_campaign.py` runs a shorter seeded campaign in CI.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FACE_DATA", REPO.parent / "shared" / "data"))

FINDINGS = ("untyped", "unnamed", "harmful", "crash")


# ------------------------------------------------------------------------------------------ the clean set
def pack_small(out: Path, identities: int = 20, per_identity: int = 10, shard_mb: float = 0.26,
               holdout: int = 1, glint24: Path = SHARED_DATA / "glint24") -> Path:
    """`identities` x `per_identity` glint24 faces packed into a few shards (`holdout` per identity held out)."""
    out = Path(out)
    people = sorted(p for p in glint24.iterdir() if p.is_dir())[:identities]
    lst = out.parent / (out.name + ".tsv")
    out.parent.mkdir(parents=True, exist_ok=True)
    lst.write_text("".join(f"{f}\t{i}\n" for i, p in enumerate(people)
                           for f in sorted(p.glob("*.png"))[:per_identity]))
    cmd = [sys.executable, "-m", "pipeline", "pack", str(lst), "--out", str(out), "--keep-labels",
           "--shard-size", str(shard_mb), "--workers", "1", "--holdout", str(holdout), "--no-progress"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


@dataclass
class Baseline:
    """The clean set: every file's bytes, its records (for the oracle) and record offsets (for aim)."""

    data: Path
    files: dict[str, bytes]
    shards: list[dict]  # manifest shard entries, train then holdout
    offsets: dict[str, list[int]]  # rec name -> record offsets, ascending
    records: Counter  # (id, identity, sha1 of payload) of the train records
    labels: Counter  # identity -> count, train records

    @classmethod
    def load(cls, data: Path) -> "Baseline":
        from pipeline.dataset import PackedDataset
        from pipeline.manifest import load_manifest
        from pipeline.recordio import read_index

        m = load_manifest(data)
        shards = list(m["shards"]) + list(m.get("holdout", {}).get("shards", []))
        files = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
        offsets = {s["rec"]: sorted(read_index(data / s["idx"])[1]) for s in shards}
        records, _ = read_all(PackedDataset(data))
        labels = Counter(identity for _, identity, _ in records.elements())
        return cls(data, files, shards, offsets, records, labels)


def read_all(ds) -> tuple[Counter, int]:
    """(Counter of (id, identity, payload sha1), skipped) of every record PackedDataset `ds` reads."""
    from pipeline.record_check import BadRecord, check_label

    got: Counter = Counter()
    skipped = 0
    for i in range(len(ds)):
        try:
            header, image = ds.read_record(i)
        except BadRecord:
            skipped += 1
            continue
        identity = check_label(header.flag, header.label, ds.rules)
        got[(int(header.id), identity, hashlib.sha1(image).hexdigest())] += 1
    return got, skipped


# ------------------------------------------------------------------------------------------ mutations
@dataclass
class Mutation:
    file: str
    data: bytes
    what: str


_SPECIAL_NUMBERS = ["0", "-1", "1", str(2 ** 63), str(2 ** 63 - 1), str(2 ** 64), "1" + "0" * 30, "abc", "",
                    "1e3", "0x10", "\xff", "4.0", " ", "+5", "٣"]


def _mutate_rec(rng: random.Random, base: Baseline) -> Mutation:
    shard = rng.choice(base.shards)
    name = shard["rec"]
    buf = bytearray(base.files[name])
    offs = base.offsets[name]
    r = rng.randrange(len(offs))
    o = offs[r]
    end = offs[r + 1] if r + 1 < len(offs) else len(buf)
    op = rng.choice(["bitflip", "zero_run", "zero_at_header", "header_field", "header_field", "zero_jpeg",
                     "truncate", "duplicate_range", "append", "byte_set"])
    if op == "bitflip":
        p = rng.randrange(len(buf))
        buf[p] ^= 1 << rng.randrange(8)
        what = f"flip a bit at {p}"
    elif op == "zero_run":
        p, n = rng.randrange(len(buf)), rng.randint(1, 200)
        buf[p:p + n] = bytes(len(buf[p:p + n]))
        what = f"zero {n} bytes at {p}"
    elif op == "zero_at_header":
        p = o + rng.randrange(0, 48)
        buf[p:p + 100] = bytes(len(buf[p:p + 100]))
        what = f"zero 100 bytes at {p} (record {r})"
    elif op == "byte_set":
        p = o + rng.randrange(0, min(64, end - o))
        buf[p] = rng.randrange(256)
        what = f"set byte {p} (record {r} header)"
    elif op == "header_field":
        fld, fmt, at = rng.choice([("magic", "<I", 0), ("lrec", "<I", 4), ("flag", "<I", 8), ("label", "<f", 12),
                                   ("id", "<Q", 16), ("id2", "<Q", 24)])
        (old,) = struct.unpack_from(fmt, buf, o + at)
        if fmt == "<f":
            new = rng.choice([999.0, -1.0, 20.0, 1e30, float("nan"), float("inf"), 0.5, old + 1, 19.0])
        elif fld == "lrec":
            new = rng.choice([old + 4, old - 4, old + 1, (1 << 29) - 1, old | (1 << 29), old | (3 << 29), 0])
        else:
            new = rng.choice([0, 100, 1, 2, 3, rng.getrandbits(32), old + 1, 0xCED7230A])
        struct.pack_into(fmt, buf, o + at, new & ((1 << (8 * struct.calcsize(fmt))) - 1) if fmt != "<f" else new)
        what = f"record {r} {fld} {old!r} -> {new!r}"
    elif op == "zero_jpeg":
        n = struct.unpack_from("<I", buf, o + 4)[0] & ((1 << 29) - 1)
        buf[o + 8 + 24:o + 8 + n] = bytes(n - 24)
        what = f"zero the image of record {r}"
    elif op == "truncate":
        p = rng.choice([rng.randrange(len(buf)), o, end - 1, len(buf) - 1])
        del buf[p:]
        what = f"truncate at {p}"
    elif op == "duplicate_range":
        buf[end:end] = buf[o:end]
        what = f"repeat record {r}"
    else:
        extra = bytes(base.files[name][o:end]) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 64))
        buf += extra
        what = f"append {len(extra)} bytes"
    return Mutation(name, bytes(buf), f"{name}: {what}")


def _mutate_idx(rng: random.Random, base: Baseline) -> Mutation:
    name = rng.choice(base.shards)["idx"]
    lines = base.files[name].decode().splitlines(keepends=True)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.choice(["delete", "duplicate", "swap_lines", "swap_keys", "swap_offsets", "offset_shift", "number",
                     "number", "extra_field", "truncate", "junk", "empty", "separator"])
    split = [ln.rstrip("\n").split("\t") for ln in lines]
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(j, lines[i])
    elif op == "swap_lines":
        lines[i], lines[j] = lines[j], lines[i]
    elif op in ("swap_keys", "swap_offsets"):
        c = 0 if op == "swap_keys" else 1
        split[i][c], split[j][c] = split[j][c], split[i][c]
        lines = ["\t".join(s) + "\n" for s in split]
    elif op == "offset_shift":
        split[i][1] = str(int(split[i][1]) + rng.choice([-4, -1, 1, 4, 8, 1 << 20]))
        lines = ["\t".join(s) + "\n" for s in split]
    elif op == "number":
        split[i][rng.randrange(2)] = rng.choice(_SPECIAL_NUMBERS)
        lines = ["\t".join(s) + "\n" for s in split]
    elif op == "extra_field":
        lines[i] = lines[i].rstrip("\n") + "\t7\n"
    elif op == "truncate":
        text = "".join(lines)
        return Mutation(name, text[:rng.randrange(len(text))].encode(), f"{name}: truncate")
    elif op == "junk":
        return Mutation(name, "".join(lines).encode() + rng.randbytes(rng.randint(1, 20)), f"{name}: junk appended")
    elif op == "empty":
        lines = []
    else:
        lines[i] = lines[i].replace("\t", rng.choice([" ", ",", "\t\t", ""]))
    return Mutation(name, "".join(lines).encode("utf-8", "surrogateescape"), f"{name}: {op} line {i} ({j})")


def _json_paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for k, v in enumerate(obj):
            yield from _json_paths(v, path + (k,))


def _flip_string(rng: random.Random, s: str) -> str:
    if not s:
        return "x"
    i = rng.randrange(len(s))
    return s[:i] + chr(ord(s[i]) ^ (1 << rng.randrange(7))) + s[i + 1:]


_TARGETED = [
    ("label_fields", []), ("label_fields", ["identity_hi", "identity_lo"]), ("label_fields", ["identity", "x"]),
    ("label_fields", ["identity", "identity_hi", "identity_lo"]), ("label_fields", "identity"),
    ("label_fields", ["x", "identity"]), ("label_fields", ["identity", "identity"]),
    ("num_classes", 0), ("num_classes", 19), ("num_classes", 21), ("num_classes", -1), ("num_classes", 2 ** 25),
    ("num_classes", 20.0), ("num_classes", "20"), ("num_images", 0), ("image_size", [112, 113]),
    ("image_size", [112]), ("version", 2), ("version", "1"), ("version", True), ("shards", []), ("shards", {}),
]


def _mutate_manifest(rng: random.Random, base: Baseline) -> Mutation:
    name = "manifest.json"
    text = base.files[name]
    op = rng.choice(["value", "value", "value", "delete", "targeted", "kind", "list", "raw", "raw"])
    if op == "raw":
        buf = bytearray(text)
        how = rng.choice(["flip", "truncate", "non-utf8", "nan", "deep"])
        if how == "flip":
            p = rng.randrange(len(buf))
            buf[p] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            del buf[rng.randrange(len(buf)):]
        elif how == "non-utf8":
            p = rng.randrange(len(buf))
            buf[p:p] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])
        elif how == "nan":
            buf = bytearray(text.replace(b'"num_classes": 20', b'"num_classes": NaN'))
        else:
            buf = bytearray(b"[" * 100000 + b"]" * 100000)
        return Mutation(name, bytes(buf), f"manifest raw {how}")
    obj = json.loads(text)
    if op == "targeted":
        key, value = rng.choice(_TARGETED)
        obj[key] = value
        what = f"{key} = {value!r}"
    elif op == "kind":
        where = obj["shards"] if rng.random() < 0.7 or "holdout" not in obj else obj["holdout"]["shards"]
        s = rng.choice(where)
        s["kind"] = rng.choice([_flip_string(rng, s["kind"]), "masked", "train", "holdout", None, 1, ""])
        what = f"a shard's kind = {s['kind']!r}"
    elif op == "list":
        lst = rng.choice([obj["shards"], obj["label_fields"]] + ([obj["holdout"]["shards"]] if "holdout" in obj else []))
        i, j = rng.randrange(len(lst)), rng.randrange(len(lst))
        how = rng.choice(["drop", "dup", "swap"])
        if how == "drop":
            del lst[i]
        elif how == "dup":
            lst.insert(j, json.loads(json.dumps(lst[i])))
        else:
            lst[i], lst[j] = lst[j], lst[i]
        what = f"list {how}"
    else:
        paths = [p for p in _json_paths(obj) if p]
        path = rng.choice(paths)
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        if op == "delete":
            del parent[path[-1]]
            what = f"delete {'.'.join(map(str, path))}"
        else:
            if isinstance(old, bool) or old is None:
                new = rng.choice([0, "x", not old])
            elif isinstance(old, int):
                new = rng.choice([old + 1, old - 1, -old, 0, str(old), float(old), None, 2 ** 63, [old]])
            elif isinstance(old, float):
                new = rng.choice([old + 1, int(old), None, "x"])
            elif isinstance(old, str):
                new = rng.choice([_flip_string(rng, old), "", 7, None, old + "/", "../" + old, [old]])
            else:
                new = rng.choice([None, 0, "x", [] if isinstance(old, dict) else {}])
            parent[path[-1]] = new
            what = f"{'.'.join(map(str, path))}: {old!r:.40} -> {new!r:.40}"
    return Mutation(name, json.dumps(obj, indent=1).encode(), f"manifest {what}")


def mutate(rng: random.Random, base: Baseline) -> Mutation:
    kind = rng.choices(["rec", "idx", "manifest"], weights=[45, 25, 30])[0]
    return {"rec": _mutate_rec, "idx": _mutate_idx, "manifest": _mutate_manifest}[kind](rng, base)


def variant(seed: int, i: int, base: Baseline) -> Mutation:
    return mutate(random.Random(seed * 1_000_003 + i), base)


def _replace(path: Path, data: bytes) -> None:
    """A new file under the old name: a reader that still maps the old one keeps it (rewriting a mapped
    file in place is a SIGBUS for the mapper, the harness's doing, not a finding). No fsync: scratch files."""
    tmp = path.with_name(f".{path.name}.fuzz")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def apply(data: Path, m: Mutation) -> None:
    _replace(data / m.file, m.data)


def restore(data: Path, base: Baseline, m: Mutation) -> None:
    _replace(data / m.file, base.files[m.file])


# ------------------------------------------------------------------------------------------ the oracle
@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, example: str = "") -> None:
        self.counts[key] += 1
        if key in FINDINGS and example:
            self.examples.setdefault(key, [])
            if len(self.examples[key]) < 5:
                self.examples[key].append(example)

    @property
    def findings(self) -> int:
        return sum(self.counts[k] for k in FINDINGS)


def names_a_file(message: str, base: Baseline) -> bool:
    return any(name in message for name in base.files)


def check_cli(base: Baseline, m: Mutation, passed: bool, tally: Tally) -> None:
    """`python -m pipeline verify` in-process: exit 0 or 1 as verify, one line on stderr, no traceback."""
    import contextlib
    import io

    from pipeline.__main__ import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(["verify", str(base.data), "--no-progress"])
    except BaseException as e:  # noqa: BLE001 - a traceback is what this looks for
        tally.add("untyped", f"{m.what} -> CLI raised {type(e).__name__}: {e}")
        return
    lines = err.getvalue().strip().splitlines()
    tally.add("cli_checked")
    if rc != (0 if passed else 1) or len(lines) != (0 if passed else 1):
        tally.add("untyped", f"{m.what} -> CLI exit {rc}, stderr {err.getvalue()[-300:]!r}")


def check_variant(base: Baseline, m: Mutation, tally: Tally, torch_loader: bool = False, cli: bool = False) -> bool:
    """Run verify and the in-process readers on the mutated set; tally; return whether verify passed."""
    from pipeline.dataset import PackedDataset, TorchTrainLoader
    from pipeline.manifest import ManifestError
    from pipeline.recordio import RecordIOError
    from pipeline.verify import VerifyError, verify

    data = base.data
    try:
        verify(data, progress=False)
        passed = True
        tally.add("verify_passed")
    except VerifyError as e:
        passed = False
        tally.add("verify_rejected")
        if not names_a_file(str(e), base):
            tally.add("unnamed", f"{m.what} -> verify: {e}")
    except Exception as e:  # noqa: BLE001 - the campaign counts exactly these
        passed = False
        tally.add("untyped", f"{m.what} -> verify: {type(e).__name__}: {e}")
    if cli:
        check_cli(base, m, passed, tally)
    typed = (ManifestError, RecordIOError)
    try:
        got, skipped = read_all(PackedDataset(data))
        tally.add("reader_skipped" if skipped else "reader_read")
        if passed and (skipped or got != base.records):
            tally.add("harmful", f"{m.what} -> verify passed, PackedDataset read {sum(got.values())} "
                                 f"records ({sum((got - base.records).values())} not in the clean set), skipped {skipped}")
    except typed as e:
        tally.add("reader_typed")
        if not names_a_file(str(e), base):
            tally.add("unnamed", f"{m.what} -> PackedDataset: {e}")
        if passed:
            tally.add("harmful", f"{m.what} -> verify passed, PackedDataset: {e}")
    except Exception as e:  # noqa: BLE001
        tally.add("untyped", f"{m.what} -> PackedDataset: {type(e).__name__}: {e}")
    if torch_loader:
        try:
            loader = TorchTrainLoader(data, 64, drop_last=False, shuffle=False, num_workers=0)
            labels = Counter(y for _, ys in loader for y in ys.tolist())
            tally.add("torch_skipped" if loader.skipped_records else "torch_read")
            if passed and (loader.skipped_records or labels != base.labels):
                tally.add("harmful", f"{m.what} -> verify passed, torch loader skipped {loader.skipped_records}")
        except typed as e:
            tally.add("torch_typed")
            if passed:
                tally.add("harmful", f"{m.what} -> verify passed, torch loader: {e}")
        except Exception as e:  # noqa: BLE001
            tally.add("untyped", f"{m.what} -> torch loader: {type(e).__name__}: {e}")
    return passed


def run_campaign(data: Path, variants: int, seed: int = 0, torch_every: int = 20, cli_every: int = 10,
                 progress: bool = False) -> tuple[Tally, list[int]]:
    """In-process part over a private copy of `data`; returns the tally and the variants verify passed."""
    from tqdm import tqdm

    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        shutil.copytree(data, work / "d")
        base = Baseline.load(work / "d")
        tally, passed = Tally(), []
        for i in tqdm(range(variants), desc="fuzz", disable=not progress):
            m = variant(seed, i, base)
            apply(base.data, m)
            try:
                if check_variant(base, m, tally, torch_loader=i % torch_every == 0, cli=i % cli_every == 0):
                    passed.append(i)
            finally:
                restore(base.data, base, m)
        return tally, passed
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ DALI
def _dali_worker(data: Path, seed: int, indices: list[int]) -> None:
    """Subprocess: for each variant, one DALI (CPU) epoch; a JSON line before and after each."""
    import gc

    from pipeline.dali_reader import DaliTrainLoader
    from pipeline.manifest import ManifestError
    from pipeline.recordio import RecordIOError

    os.environ["FACETRAIN_CACHE"] = "off"  # rewrites within one mtime tick must be checked again
    base = Baseline.load(data)
    for i in indices:
        loader = None
        m = variant(seed, i, base)
        print(json.dumps({"start": i}), flush=True)
        apply(data, m)
        try:
            loader = DaliTrainLoader(data, batch_size=32, drop_last=False, shuffle=False, num_threads=1,
                                     augment={"flip": False}, initial_fill=32)
            labels = Counter(y for _, ys in loader for y in ys.tolist())
            out = {"i": i, "status": "read", "skipped": loader.skipped_records,
                   "same": labels == base.labels, "n": sum(labels.values())}
        except (ManifestError, RecordIOError) as e:
            out = {"i": i, "status": "typed", "error": str(e)[:200]}
        except Exception as e:  # noqa: BLE001
            out = {"i": i, "status": "untyped", "error": f"{type(e).__name__}: {str(e)[:200]}"}
        finally:
            del loader  # its prefetching threads stop before the files change back
            gc.collect()
            restore(data, base, m)
        print(json.dumps(out), flush=True)


def run_dali(data: Path, indices: list[int], passed: set[int], seed: int, tally: Tally,
             timeout: float = 600) -> None:
    """The DALI reader over `indices` in subprocess batches; a crash is tallied and the batch goes on after it."""
    work = Path(tempfile.mkdtemp(prefix="fuzz-dali-"))
    try:
        shutil.copytree(data, work / "d")
        todo = list(indices)
        while todo:
            proc = subprocess.run([sys.executable, __file__, "--dali-worker", str(work / "d"), "--seed", str(seed),
                                   "--indices", ",".join(map(str, todo))], cwd=REPO, capture_output=True,
                                  text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
            started, done = None, set()
            for line in proc.stdout.splitlines():
                if not line.startswith("{"):
                    continue
                rec = json.loads(line)
                if "start" in rec:
                    started = rec["start"]
                    continue
                done.add(rec["i"])
                i, ok = rec["i"], rec["i"] in passed
                tally.add(f"dali_{rec['status']}")
                if rec.get("skipped"):
                    tally.add("dali_skipped")
                if rec["status"] == "untyped":
                    tally.add("untyped", f"variant {i} -> DALI: {rec['error']}")
                elif ok and (rec["status"] != "read" or rec["skipped"] or not rec["same"]):
                    tally.add("harmful", f"variant {i} -> verify passed, DALI: {rec}")
            if proc.returncode != 0:
                if started is None or started in done:
                    raise RuntimeError(f"DALI worker failed outside a variant: {proc.stderr[-2000:]}")
                tally.add("crash", f"variant {started} -> DALI worker exit {proc.returncode}")
                done.add(started)
                base = Baseline.load(data)  # the crashed worker left its variant applied
                name = variant(seed, started, base).file
                _replace(work / "d" / name, base.files[name])
            todo = [i for i in todo if i not in done]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=int, default=10_000)
    p.add_argument("--dali", type=int, default=300, help="variants also read by the DALI reader (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, help="a clean packed set (default: pack one from glint24)")
    p.add_argument("--dali-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--indices", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dali_worker:
        _dali_worker(args.dali_worker, args.seed, [int(i) for i in args.indices.split(",")])
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-data-"))
    os.environ.setdefault("FACETRAIN_CACHE", "off")
    try:
        data = args.data or pack_small(tmp / "d200")
        t0 = time.time()
        tally, passed = run_campaign(data, args.variants, args.seed, progress=True)
        t1 = time.time()
        if args.dali:
            step = max(1, args.variants // args.dali)
            run_dali(data, list(range(0, args.variants, step))[:args.dali], set(passed), args.seed, tally)
        t2 = time.time()
        print(json.dumps({"variants": args.variants, "dali_variants": args.dali, "seed": args.seed,
                          "counts": dict(sorted(tally.counts.items())), "examples": tally.examples,
                          "seconds": {"in_process": round(t1 - t0, 1), "dali": round(t2 - t1, 1)}}, indent=1))
        return 1 if tally.findings else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
