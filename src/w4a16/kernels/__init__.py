"""Triton kernels. Importing this package needs Triton; the rest of w4a16 does not."""
