"""`python -m stages.classifier`, dvc.yaml's command for stage `classifier`: its work is `cxrsynth.stages.classifier`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.classifier import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "classifier"))
