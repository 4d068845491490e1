"""alignloop.kernels"""
