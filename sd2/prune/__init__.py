"""Compression: one-shot pruning (sparsegpt, wanda, magnitude), N:M masks, layer pruning."""
