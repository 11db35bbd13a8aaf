"""`python -m stages.generator`, dvc.yaml's command for stage `generator`: its work is `cxrsynth.stages.generator`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.generator import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "generator"))
