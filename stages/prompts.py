"""`python -m stages.prompts`, dvc.yaml's command for stage `prompts`: its work is `cxrsynth.stages.prompts`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.prompts import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "prompts"))
