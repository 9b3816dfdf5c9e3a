"""Composition: the dataset, its builders, dataset config files and the encoder cache.

This floor puts the bucketing core, the sampler and the transforms together; it may import
all three, and nothing below it imports it.
"""
