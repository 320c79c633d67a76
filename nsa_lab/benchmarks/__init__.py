"""Speed measurements on a GPU: ``nsa-lab bench kernels`` and ``nsa-lab bench train``."""
