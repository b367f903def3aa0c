"""Tests of loralab.analysis against independent float64 computations."""
