"""`python -m stages.ingest`, dvc.yaml's command for stage `ingest`: its work is `cxrsynth.stages.ingest`."""
import sys

from cxrsynth.errors import run_guarded
from cxrsynth.stages.ingest import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, "ingest"))
