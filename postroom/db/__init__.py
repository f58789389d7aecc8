"""Database layer: models and session factories."""
