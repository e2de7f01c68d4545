"""The offline quickstart (scripts/quickstart.py): `pipeline` (stages, presets, corpus), `distill` (the
student arms, ablation and alignment stages both families share), `mlm` and `clm` (each family's
scripts and settings), `arms` (the objectives), `stats`, `report`, `report_text` and `plots`."""
