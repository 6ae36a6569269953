"""The embedded default: backend ``tiny-umm`` and task ``frozen-lake``, with a shipped
pretrained checkpoint, so the whole method runs on a CPU in minutes."""
