"""sd2: self-distilled sparse drafters for speculative decoding."""
__version__ = "0.1.0"
