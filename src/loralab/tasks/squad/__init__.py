"""SQuAD v1.1 question answering: data (:mod:`.data`), encoder span features and best-span search
(:mod:`.span`), the seed's generative format (:mod:`.generative`); metrics in :mod:`loralab.metrics.squad`.
The experiment (:mod:`.experiment`, presets in :mod:`.presets`) registers itself when this package is imported."""

from loralab.engine.experiment import register_experiment
from loralab.tasks.squad.experiment import EXPERIMENT

register_experiment(EXPERIMENT)
