"""`python -m stages.codebook`, dvc.yaml's command for stage `codebook`: its work is `cxrsynth.stages.codebook`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.codebook import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "codebook"))
