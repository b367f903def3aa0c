"""GLUE (Hu et al. 2021, Table 2) as a loralab experiment: importing this package registers it."""

from loralab.engine.experiment import register_experiment
from loralab.tasks.glue.experiment import EXPERIMENT

register_experiment(EXPERIMENT)
