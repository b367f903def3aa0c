"""E2E NLG (Hu et al. 2021, Table 3) as a loralab experiment: importing this package registers it."""

from loralab.engine.experiment import register_experiment
from loralab.tasks.e2e.experiment import EXPERIMENT

register_experiment(EXPERIMENT)
