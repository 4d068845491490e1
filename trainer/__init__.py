"""alignloop.trainer"""
