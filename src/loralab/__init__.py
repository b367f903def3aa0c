"""loralab: LoRA and QLoRA fine-tuning you can trust.

The core (``loralab.core``) depends on torch and safetensors only.
"""

__version__ = "0.1.0"
