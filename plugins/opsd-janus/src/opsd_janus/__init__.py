"""opsd backend ``janus-pro``: Janus-Pro on transformers' ``JanusForConditionalGeneration``."""
