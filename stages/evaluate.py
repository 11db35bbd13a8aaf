"""`python -m stages.evaluate`, dvc.yaml's command for stage `evaluate`: its work is `cxrsynth.stages.evaluate`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.evaluate import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "evaluate"))
