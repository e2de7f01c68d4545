"""The two pipelines that chain the project's commands: the offline quickstart (`pipelines.quickstart`,
run by scripts/quickstart.py) and the paper's reproduction (`pipelines.reproduce`, run by
scripts/reproduce.py). What they share (stage failures, interruption, the offline environment,
settings fingerprints, durations) is in `pipelines.stages`; starting a command, optionally forked
from a server that imported torch once, is `pipelines.launcher`."""
