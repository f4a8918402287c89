"""The Gluon mixture-of-experts decode kernel (one token's expert layer in two launches, reading
the experts in the Triton kernels' layout): the kernel and its host side."""
