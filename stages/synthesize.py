"""`python -m stages.synthesize`, dvc.yaml's command for stage `synthesize`: its work is `cxrsynth.stages.synthesize`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.synthesize import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "synthesize"))
