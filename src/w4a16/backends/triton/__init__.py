"""Triton kernels and their host side. ``layout`` is plain torch; the other modules need Triton."""
