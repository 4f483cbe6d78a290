"""cdist: circuit distillation on TransformerLens models.

The folders follow the data flow: ``tasks/`` makes prompts, ``models`` loads Llama checkpoints as
HookedTransformers, ``zoo`` holds the project's own small model organisms.
"""

__version__ = "0.1.0"
