"""opsd backend ``thinkmorph``: ThinkMorph / BAGEL-7B-MoT re-implemented on torch."""
