"""Attention kernels of nsa-lab, installed as ``nsa_lab.kernels``.

Kernels work on already-projected tensors (layout ``[B, T, heads, dim]``) so that
an implementation (PyTorch today, Triton later) can be swapped without touching
the ``nn.Module`` layers in ``nsa_lab.attention``.
"""
