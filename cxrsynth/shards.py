"""Shards: one stage run split over machines by index ranges of its work list, and merged back.

A sharded stage has a fixed, ordered work list of n items (ingest: the candidate images after `collect`; synthesize:
the (prompt, sample) list). Shard I of N does items [floor(I n / N), floor((I + 1) n / N)) and writes a folder with
its partial outputs and `shard.json`: stage, I, N, the range, n, and hashes of the params section and of the whole
work list. A merge takes the folders of shards 0..N-1 of one run, in any order, checks them (`check_shards`), and the
stage rebuilds exactly the outputs of an unsharded run.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrsynth.errors import UserError
from cxrsynth.io import write_json

SHARD_FILE = "shard.json"


class ShardError(UserError):
    """A bad --shard value, or shard folders that cannot be merged; one line naming the problem."""


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", str(text).strip())
    if m is None:
        raise ShardError(f"--shard {text!r}: expected I/N (shard I of N, counted from 0), e.g. 0/4")
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        raise ShardError(f"--shard {text!r}: expected 0 <= I < N, with N >= 1")
    return index, count


def stage_arguments(prog: str, description: str, outputs: str, metrics: str,
                    argv: list[str] | None = None) -> tuple[argparse.Namespace, tuple[int, int] | None]:
    """The command line of a sharded stage: `--shard I/N --out DIR` | `--merge DIR...`, optional `--out` and
    `--metrics`; returns the arguments and the parsed shard (None unless --shard). A bad --shard raises ShardError."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shard", metavar="I/N", help="process only shard I of N (needs --out)")
    mode.add_argument("--merge", nargs="+", metavar="DIR", help="merge the folders of shards 0..N-1")
    ap.add_argument("--out", help=f"output folder (default {outputs}; the shard folder with --shard)")
    ap.add_argument("--metrics", help=f"metrics file (default {metrics})")
    args = ap.parse_args(argv)
    if args.shard is None:
        return args, None
    shard = parse_shard(args.shard)
    if not args.out:
        raise ShardError("--shard needs --out DIR (the shard folder)")
    return args, shard


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """The items [start, stop) of shard `index` of `count` over n items (empty when count > n)."""
    if n < 0 or count < 1 or not 0 <= index < count:
        raise ShardError(f"no shard {index}/{count} of {n} items")
    return index * n // count, (index + 1) * n // count


def digest(obj: object) -> str:
    """sha256 of the canonical JSON of `obj` (a dataclass counts as its fields)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    """A shard folder and what its shard.json says."""

    path: Path
    stage: str
    index: int
    count: int
    start: int
    stop: int
    n: int
    params_sha256: str
    work_sha256: str
    extra: dict

    @property
    def name(self) -> str:
        return f"shard {self.index}/{self.count} ({self.path})"


def write_shard(folder: str | Path, stage: str, index: int, count: int, n: int, *, params_sha256: str,
                work_sha256: str, **extra) -> dict:
    """Write `folder/shard.json` for shard index/count of a work list of n items; returns its content."""
    start, stop = shard_range(n, index, count)
    info = {"stage": stage, "index": index, "count": count, "start": start, "stop": stop, "n": n,
            "params_sha256": params_sha256, "work_sha256": work_sha256, **extra}
    write_json(Path(folder) / SHARD_FILE, info)
    return info


def read_shard(folder: str | Path) -> Shard:
    path = Path(folder)
    try:
        info = json.loads((path / SHARD_FILE).read_text(encoding="utf-8"))
        keys = ("stage", "index", "count", "start", "stop", "n", "params_sha256", "work_sha256")
        return Shard(path, *(info.pop(k) for k in keys), extra=info)
    except FileNotFoundError:
        raise ShardError(f"{path}: no {SHARD_FILE} (not a shard folder)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{path / SHARD_FILE}: unreadable ({e})") from None


def check_shards(folders: Sequence[str | Path], stage: str, params_sha256: str,
                 out: str | Path | None = None) -> list[Shard]:
    """The shards in the folders, in index order, if they are exactly shards 0..N-1 of one run of `stage` with
    these params (same N, params and work list; ranges cover 0..n with no gap or overlap) and the merge's output
    folder `out` is none of them; else ShardError."""
    if not folders:
        raise ShardError("no shard folders to merge")
    shards = [read_shard(f) for f in folders]
    if out is not None and any(s.path.resolve() == Path(out).resolve() for s in shards):
        raise ShardError(f"{out}: the merge cannot write into a shard folder")
    first = shards[0]
    for s in shards:
        if s.stage != stage:
            raise ShardError(f"{s.path}: a shard of stage {s.stage!r}, not {stage!r}")
        if s.params_sha256 != params_sha256:
            raise ShardError(f"{s.name} was made with other {stage} params than the current params.yaml "
                             f"(params hash {s.params_sha256[:12]} != {params_sha256[:12]})")
        if s.count != first.count:
            raise ShardError(f"shards of different splits: {s.name} vs {first.name}")
        if s.work_sha256 != first.work_sha256 or s.n != first.n:
            raise ShardError(f"{s.name} and {first.name} come from different runs (their {stage} work lists differ)")
    by_index: dict[int, Shard] = {}
    for s in shards:
        if s.index in by_index:
            raise ShardError(f"shard {s.index}/{s.count} given twice: {by_index[s.index].path} and {s.path}")
        by_index[s.index] = s
    missing = [i for i in range(first.count) if i not in by_index]
    if missing:
        raise ShardError(f"shard {', '.join(f'{i}/{first.count}' for i in missing)} missing "
                         f"(a merge needs all of 0..{first.count - 1})")
    out = [by_index[i] for i in range(first.count)]
    expect = 0
    for s in out:
        if (s.start, s.stop) != shard_range(s.n, s.index, s.count) or s.start != expect:
            raise ShardError(f"{s.name}: range [{s.start}, {s.stop}) is not its share of {s.n} items")
        expect = s.stop
    if expect != first.n:
        raise ShardError(f"shards cover {expect} of {first.n} items")
    return out
