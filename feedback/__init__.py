"""alignloop.feedback"""
