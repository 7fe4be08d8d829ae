"""The Ops seam's implementations: cpu (PyTorch ops and compiled C kernels) and triton (rendered kernels)."""
