"""What every model family shares: the config, concept spans, the paper's math, the masks' form, errors.

Nothing here imports diffusers or any family: families import core, never each other.
"""
