"""Pallas kernels for accelerators (TPU via Mosaic, GPU via Triton) and the bit-packed mask they share."""
