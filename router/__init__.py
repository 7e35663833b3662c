"""The front door: API, tokenization, residency index, placement."""
