"""The built-in context builders and the noise control that modifies their teacher contexts.

``paper`` (:mod:`.paper`) is the paper's layout; :func:`.noise.with_noise_visual_thought`
replaces a teacher context's visual thought by N(0, 1) pixels; :mod:`.params` holds the
torch-free params of the ``[context]`` section. Nothing is imported here, so that validating
a config (which reads the params) imports no torch.
"""
