"""What a stage holds at its memory high-water mark, by the project line that allocated it (a memray capture).

    pip install --target /tmp/memray-pkgs memray      # not a project dependency
    cd <a kept bench.scale scratch, e.g. /tmp/cxrsynth-scale/mid>
    PYTHONPATH=/tmp/memray-pkgs:. python -m memray run -q -o /tmp/classifier.bin -m stages.classifier
    PYTHONPATH=/tmp/memray-pkgs:<repo> python -m bench.memray_peak /tmp/classifier.bin [--top 15]

Groups the allocations live at the high-water mark by their innermost frame in the project's code (`cxrsynth/`,
`stages/`), with its caller and the library line that allocated, and prints MiB per group. A structure that grows
with the dataset shows as a group whose size tracks N between two sizes; a per-batch buffer or a capped distance
block does not. memray counts virtual reservations too (pyarrow's allocator reserves ~1 GiB at import, reported at
the line that first read a parquet file), so read the groups, not the total, against `bench/scale.md`'s RSS.
"""
from __future__ import annotations

import argparse
import collections


def short(path: str) -> str:
    for mark in ("site-packages/", "/cxrsynth/", "/stages/"):
        if mark in path:
            return (mark.strip("/") + "/" if mark != "site-packages/" else "") + path.split(mark, 1)[1]
    return path


def groups(capture: str) -> tuple[float, collections.Counter]:
    from memray import FileReader

    reader = FileReader(capture)
    agg: collections.Counter = collections.Counter()
    for rec in reader.get_high_watermark_allocation_records(merge_threads=True):
        stack = rec.stack_trace()
        own = [f for f in stack if "/cxrsynth/" in f[1] or "/stages/" in f[1]]
        if not own:
            key = "(outside the project) " + (f"{short(stack[0][1])}:{stack[0][2]}" if stack else "?")
        else:
            fn, path, line = own[0][:3]
            key = f"{short(path)}:{line} {fn}"
            if len(own) > 1:
                key += f" <- {own[1][0]}:{own[1][2]}"
            if stack and stack[0] is not own[0]:
                key += f"  [{short(stack[0][1])}:{stack[0][2]}]"
        agg[key] += rec.size
    return reader.metadata.peak_memory / 2**20, agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("capture", help="a `memray run` output file")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    peak, agg = groups(args.capture)
    print(f"high-water mark {peak:,.0f} MiB (memray; virtual reservations included)")
    for key, size in agg.most_common(args.top):
        print(f"{size / 2**20:9.1f} MiB  {key}")


if __name__ == "__main__":
    main()
