"""An example opsd plugin: the total-variation divergence."""
