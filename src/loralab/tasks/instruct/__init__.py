"""Instruction tuning with LoRA/QLoRA (Dettmers et al. 2023) as a loralab experiment; importing
this package registers it. The quickstart (``loralab quickstart``) is its ``quickstart`` preset."""

from loralab.engine.experiment import register_experiment
from loralab.tasks.instruct.experiment import EXPERIMENT

register_experiment(EXPERIMENT)
