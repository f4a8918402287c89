"""The Gluon decode kernel (M <= 64): configs, the kernel and its stream-K variant, their shared
pipeline, the host side and the bound eager launch."""
