"""The cpu backend: PyTorch ops, with the build's compiled C kernels where this machine can run them."""
