"""The pipeline's stages, one module each: `cxrsynth.stages.<name>` reads params.yaml, calls the library (`data`,
`text`, `models`, `eval`) and writes the stage's outputs and metrics. `python -m stages.<name>` (dvc.yaml's command)
only calls its `main`. Library code never imports from here."""
