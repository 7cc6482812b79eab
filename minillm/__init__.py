"""minillm: a trainable mini-LLM framework."""
