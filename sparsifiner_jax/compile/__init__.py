"""Compiling for accelerators this machine does not have: the devices of a TPU or GPU topology
(``targets``), what the compiler counts for a program (``cost``: memory, FLOPs, bytes), its estimated time
on a TPU (``clock``), and each GPU kernel's registers and shared memory (``gpu_kernels``)."""
