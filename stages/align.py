"""`python -m stages.align`, dvc.yaml's command for stage `align`: its work is `cxrsynth.stages.align`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.align import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "align"))
