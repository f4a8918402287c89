"""The Gluon prefill kernel (M > 64): configs, the kernel, the host side."""
