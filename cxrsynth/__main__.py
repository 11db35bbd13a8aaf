"""Command line for people: `python -m cxrsynth <command> ...`.

Commands register themselves with `@command(name, help)` on a function `(subparsers entry) -> runner`; a new module
adds one by defining such a function here or importing its registration (see `COMMANDS`).

    python -m cxrsynth generate "Moderate right pleural effusion." -n 4 --seed 0 --out DIR
    python -m cxrsynth lineage data/synthetic/images/syn-s000000-0.png [--verify] [--json]
    python -m cxrsynth checksums /data/physionet.org/files/mimic-cxr-jpg/2.0.0 [--tables-only]
    python -m cxrsynth export-png data/synthetic --out DIR   (PNGs of a tar / no-PNG layout)
    python -m cxrsynth compare main exp-a exp-b [--out compare.md]   (headline numbers with paired intervals)

uses the trained models under `models/` (generator with its key-patch bank, VQ-GAN) and writes DIR/images/*.png,
DIR/images.npy, DIR/manifest.parquet and DIR/contact_sheet.png, like the synthesize stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cxrsynth.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Runner = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def command(name: str, help: str):
    """Register `fn(parser) -> runner`: fn adds its arguments to the subcommand's parser and returns what runs it."""
    def register(fn: Callable[[argparse.ArgumentParser], Runner]):
        COMMANDS[name] = (help, fn)
        return fn
    return register


class OneLineParser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr (exit status 2) instead of the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _defaults() -> dict:
    """Sampling defaults and the models folder from ./params.yaml when there is one (else built-in defaults)."""
    from cxrsynth.config import ConfigError, SynthesizeParams, load_params

    try:
        params = load_params("params.yaml") if Path("params.yaml").is_file() else None
    except ConfigError:
        params = None
    s = params.synthesize if params else SynthesizeParams()
    max_images = next(f.metadata["hi"] for f in dataclasses.fields(SynthesizeParams)
                      if f.name == "samples_per_prompt")
    return {"models": params.paths.models if params else "models", "temperature": s.temperature, "top_k": s.top_k,
            "top_p": s.top_p, "guidance": s.guidance_scale,
            "key_patch_placement": s.key_patch_placement, "batch_size": s.batch_size, "max_images": max_images}


def checked(section: str, key: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse `type` that converts the text and checks it by the rules of params key `section.key` (type,
    bounds, finiteness: `cxrsynth.config.check_field`), so an option and its params key accept the same values."""
    def parse(text: str) -> object:
        from typing import get_type_hints

        from cxrsynth.config import ConfigError, Params, check_field

        cls = get_type_hints(Params)[section]
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {convert.__name__}, got {text!r}") from None
        try:
            return check_field(cls, key, value, key=f"{section}.{key} rules")
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = convert.__name__
    return parse


def view_option(text: str) -> str:
    """A view the generator has a token for (case-insensitive), upper-cased."""
    from cxrsynth.models.generator import VIEWS

    if text.upper() not in VIEWS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(VIEWS)} (any case), got {text!r}")
    return text.upper()


def output_folder(text: str) -> Path:
    """An output folder that is a folder or does not exist yet, with no file on its way and writable."""
    from cxrsynth.io import check_output_dir

    try:
        return check_output_dir(text)
    except OSError as err:
        from cxrsynth.errors import os_error_line

        raise argparse.ArgumentTypeError(os_error_line(err)) from None


@command("generate", "synthesize chest X-rays from a text prompt with the trained models")
def _generate_parser(ap: argparse.ArgumentParser) -> Runner:
    d = _defaults()
    ap.add_argument("text", help="the prompt, e.g. 'Moderate right pleural effusion.'")
    ap.add_argument("-n", "--num", type=checked("synthesize", "samples_per_prompt", int), default=1,
                    help=f"images to draw, 1..{d['max_images']} (default 1)")
    ap.add_argument("--seed", type=checked("base", "seed", int), default=0, help="0 .. 2^31-1 (default 0)")
    ap.add_argument("--out", required=True, type=output_folder,
                    help="output folder: a folder or a path that does not exist yet (not a file)")
    ap.add_argument("--view", default="PA", type=view_option, help="PA | AP | LATERAL | LL, any case (default PA)")
    ap.add_argument("--models", default=d["models"], help=f"trained models folder (default {d['models']})")
    ap.add_argument("--temperature", type=checked("synthesize", "temperature", float), default=d["temperature"],
                    help="finite, 0 (greedy) .. 10")
    ap.add_argument("--top-k", type=checked("synthesize", "top_k", int), default=d["top_k"], help="0 = off")
    ap.add_argument("--top-p", type=checked("synthesize", "top_p", float), default=d["top_p"],
                    help="0.01 .. 1 (1 = off)")
    ap.add_argument("--guidance", type=checked("synthesize", "guidance_scale", float), default=d["guidance"],
                    help="classifier-free guidance scale, 1 (off) .. 50")
    ap.add_argument("--key-patches", type=checked("synthesize", "key_patch_placement", str),
                    default=d["key_patch_placement"],
                    help="prompt (they condition the model) | force (their codes are also written at their cells)")
    ap.add_argument("--batch-size", type=checked("synthesize", "batch_size", int), default=d["batch_size"])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dicom", action="store_true", help="also write DICOM copies marked synthetic")
    return _generate


def _generate(args: argparse.Namespace) -> int:
    from cxrsynth.keypatches import terms_of_text
    from cxrsynth.pipeline import PromptRecord, load_models, synthesize
    from cxrsynth.data.synthetic_writer import write_outputs
    from cxrsynth.models.token_sampler import Sampling
    from cxrsynth.train import pick_device

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        guidance_scale=args.guidance, key_patch_placement=args.key_patches,
                        batch_size=args.batch_size)
    gen, vqgan, hashes = load_models(args.models, device=pick_device(args.device))
    prompt = PromptRecord(prompt_id="cli", text=args.text, view=args.view, kind="cli", terms=terms_of_text(args.text))
    syn = synthesize(gen, vqgan, [prompt], sampling, base_seed=args.seed, samples_per_prompt=args.num,
                     hashes=hashes, progress=True)
    df = write_outputs(args.out, syn, write_dicom=args.dicom, sheet_images=min(args.num, 24), dicom_seed=args.seed,
                       title=f"cxrsynth generate (seed {args.seed})")
    kps = int(df["n_key_patches"].iloc[0])
    print(f"wrote {len(df)} image(s) to {Path(args.out) / 'images'} ({kps} key patches; contact sheet "
          f"{Path(args.out) / 'contact_sheet.png'})")
    return 0


@command("lineage", "how a synthetic image was made: prompt, seed, models, stages, params, data, git commit")
def _lineage_parser(ap: argparse.ArgumentParser) -> Runner:
    ap.add_argument("target", help="a synthetic PNG or DICOM, or a synthetic_id / prompt_id of the manifest")
    ap.add_argument("--repo", default=".", help="the project repository (default: the current folder)")
    ap.add_argument("--verify", action="store_true",
                    help="recompute hashes of everything on disk and report any mismatch (exit status 1)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return _lineage


def _lineage(args: argparse.Namespace) -> int:
    import json

    from cxrsynth.lineage import format_report, lineage, verify

    report = lineage(args.repo, args.target)
    problems = verify(args.repo, report) if args.verify else None
    if args.json:
        print(json.dumps({**report, **({"verify": problems} if problems is not None else {})}, indent=1,
                         default=str))
    else:
        print(format_report(report, problems))
    return 1 if problems else 0


@command("preset", "print the `dvc exp run -S ...` overrides of a named preset (e.g. real: MIMIC-CXR, paper settings)")
def _preset_parser(ap: argparse.ArgumentParser) -> Runner:
    from cxrsynth.presets import PRESETS

    ap.add_argument("name", choices=sorted(PRESETS))
    ap.add_argument("--yaml", action="store_true", help="print the overrides as YAML instead of -S flags")
    ap.add_argument("--params", default="params.yaml", help="params file the preset is validated against")
    return _preset


def _preset(args: argparse.Namespace) -> int:
    import shlex

    import yaml

    from cxrsynth.presets import PRESETS, check, set_flags

    check(args.name, yaml.safe_load(Path(args.params).read_text(encoding="utf-8")))
    if args.yaml:
        print(yaml.safe_dump(PRESETS[args.name], sort_keys=False).rstrip())
    else:
        print(" ".join(shlex.quote(f) for f in set_flags(args.name)))
    return 0


@command("export-png", "write a synthetic folder's images as loose PNGs (from tar shards or images.npy)")
def _export_parser(ap: argparse.ArgumentParser) -> Runner:
    ap.add_argument("folder", help="a synthetic folder (manifest.parquet + images.npy), e.g. data/synthetic")
    ap.add_argument("--out", required=True, help="folder for <synthetic_id>.png (must not be inside `folder`)")
    return _export_png


def _export_png(args: argparse.Namespace) -> int:
    import pandas as pd

    from cxrsynth.data.arrays import NpyRows
    from cxrsynth.png_archive import png_bytes, read_png
    from cxrsynth.data.synthetic import png_text

    folder, out = Path(args.folder), Path(args.out)
    if not (folder / "manifest.parquet").is_file():
        raise UserError(f"{folder / 'manifest.parquet'}: no synthetic manifest")
    if out.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--out {out}: must be outside {folder} (a DVC output)")
    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(folder / "manifest.parquet")
    images = NpyRows(folder / "images.npy")
    for i, row in enumerate(df.to_dict(orient="records")):
        row = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        data = read_png(folder, row) or png_bytes(images[i], png_text(row))  # the same bytes the stage would write
        (out / f"{row['synthetic_id']}.png").write_bytes(data)
    print(f"export-png: {len(df)} PNGs -> {out}")
    return 0


@command("checksums", "write ROOT/SHA256SUMS.txt (PhysioNet format) for a MIMIC-CXR(-JPG) copy that lacks one")
def _checksums_parser(ap: argparse.ArgumentParser) -> Runner:
    ap.add_argument("root", help="the release folder (paths.raw or paths.raw_jpg)")
    ap.add_argument("--tables-only", action="store_true",
                    help="list only the top-level files (tables, reports zip): seconds instead of hours, but an image "
                         "changed later is then never noticed")
    ap.add_argument("--workers", type=int, default=4, help="files hashed in parallel (default 4)")
    ap.add_argument("--force", action="store_true", help="replace an existing SHA256SUMS.txt (e.g. PhysioNet's own)")
    return _checksums


def _checksums(args: argparse.Namespace) -> int:
    from cxrsynth.data.layout import CHECKSUMS, read_checksums, write_checksums

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    if (root / CHECKSUMS).is_file() and not args.force:
        raise UserError(f"{root / CHECKSUMS} exists (the release's own?); --force replaces it")
    path = write_checksums(root, tables_only=args.tables_only, workers=max(1, args.workers))
    print(f"wrote {path} ({len(read_checksums(path))} files)")
    return 0


@command("compare", "headline numbers of runs (git revisions, branches, dvc exp names, 'workspace') with bootstrap "
                    "95% intervals and paired differences to the first run")
def _compare_parser(ap: argparse.ArgumentParser) -> Runner:
    ap.add_argument("runs", nargs="+", help="two or more runs; 'workspace' = the files on disk")
    ap.add_argument("--items", default=None, help="per-item table path in the repo (default: paths.evaluation/"
                                                  "items.parquet from params.yaml)")
    ap.add_argument("--repo", default=None, help="the DVC repository (default: the current one)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    return _compare


def _compare(args: argparse.Namespace) -> int:
    from cxrsynth.compare import default_items_path, run_compare

    if len(args.runs) < 2:
        raise UserError("compare needs at least two runs")
    if args.n_boot < 0:
        raise UserError(f"--n-boot must be >= 0, got {args.n_boot}")
    text = run_compare(args.runs, path=args.items or default_items_path(), repo=args.repo, n_boot=args.n_boot,
                       seed=args.seed)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command: a usage error or a `UserError` / `OSError` is one line and exit status 2, an
    unexpected error one line naming the file that holds its traceback, exit status 1 (`cxrsynth.errors`)."""
    from cxrsynth.errors import run_guarded

    ap = OneLineParser(prog="python -m cxrsynth", description="cxrsynth: text-to-chest-X-ray synthesis")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (help_text, build) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_run=build(sp))
    args = ap.parse_args(argv)
    return run_guarded(args._run, "", args)


if __name__ == "__main__":
    raise SystemExit(main())
