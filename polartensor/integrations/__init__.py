"""Integrations of polartensor with other libraries.

They live under ``polartensor.integrations`` (never as top-level modules) so that installing
polartensor cannot shadow another distribution's package. Each integration is imported
explicitly, e.g. ``from polartensor.integrations.transformers import PolarQuantCache``; nothing
here imports transformers.
"""
