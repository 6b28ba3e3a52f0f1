"""Compiling for accelerators this machine does not have: the devices of a TPU or GPU topology
(``targets``) and what the compiler says about a program for them (``report``)."""
