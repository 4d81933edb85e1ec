"""Distributed face-recognition trainer: backbones, model-parallel Partial FC, margin losses."""
