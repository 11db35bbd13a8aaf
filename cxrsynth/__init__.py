"""cxrsynth: reproducible text-to-chest-X-ray synthesis (anatomy-pathology prompting + fine-grained alignment)."""
import os

# Nothing in the project may reach a model hub at run time; set before transformers is ever imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
