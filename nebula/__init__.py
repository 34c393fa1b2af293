"""Nebula: one OpenAI-compatible endpoint in front of many models on many machines."""

__version__ = "0.1.0"
