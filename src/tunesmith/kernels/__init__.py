"""Fused ops for training speed. Each op has a plain-PyTorch reference beside it (``*_reference``)
that the CPU tests in tests/kernels/ compare against; every op also runs on the CPU."""
