"""Decoder LM and its sublayers (Flax NNX)."""
