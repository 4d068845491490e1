"""alignloop.serving"""
