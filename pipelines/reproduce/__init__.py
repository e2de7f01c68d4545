"""The paper's reproduction (scripts/reproduce.py): `configs` (the rows of training_configs/paper/), `plan`
(the stages and their commands), `runner` (running and resuming them) and `tables` (paper_tables.md)."""
