"""The pipeline's stages, one module each: `cxrsynth.stages.<name>` reads params.yaml, calls the library (`data`,
`text`, `models`, `eval`) and writes the stage's outputs and metrics. `python -m stages.<name>` (dvc.yaml's command)
only calls its `main`. Library code never imports from here."""

from pathlib import Path

from cxrsynth.config import Params
from cxrsynth.io import check_output_dir

# the params `paths` keys (and model folders) each stage writes, as dvc.yaml's outs name them
OUTPUTS: dict[str, tuple[str, ...]] = {
    "fixture": ("phantom_raw", "phantom_raw_jpg", "phantom"),
    "ingest": ("interim",),
    "classifier": ("models/classifier", "models/classifier_checkpoints"),
    "prompts": ("prompts",),
    "codebook": ("models/vqgan", "models/vqgan_checkpoints"),
    "tokens": ("tokens",),
    "align": ("models/align", "models/align_checkpoints"),
    "generator": ("models/generator", "models/generator_checkpoints"),
    "synthesize": ("synthetic",),
    "evaluate": ("evaluation",),
}


def check_outputs(params: Params, stage: str, override: str | Path | None = None) -> None:
    """Before any work: every output folder of `stage` (and the metrics folder) is a folder or can be made one; a
    file in the way or a folder without write permission raises an OSError naming it (`check_output_dir`).
    `override`: the stage's --out, instead of its first paths key."""
    keys = OUTPUTS[stage]
    for i, key in enumerate(keys):
        base, _, sub = key.partition("/")
        folder = Path(getattr(params.paths, base)) / sub if sub else Path(getattr(params.paths, base))
        check_output_dir(override if (override is not None and i == 0) else folder)
    check_output_dir(params.paths.metrics)
