"""`python -m stages.tokens`, dvc.yaml's command for stage `tokens`: its work is `cxrsynth.stages.tokens`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.tokens import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "tokens"))
