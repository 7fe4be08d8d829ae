"""The cuda and interpret backends: a build's rendered Triton kernels."""
