"""`python -m stages.fixture`, dvc.yaml's command for stage `fixture`: its work is `cxrsynth.stages.fixture`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.fixture import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "fixture"))
