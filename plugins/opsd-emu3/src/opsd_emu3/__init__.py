"""opsd backend ``emu3``: Visual-OPSD on transformers' Emu3ForConditionalGeneration."""
