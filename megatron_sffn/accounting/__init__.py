"""Parameter and FLOP accounting: what a model costs, and which structure sizes meet a parameter budget."""
