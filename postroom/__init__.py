"""Postroom: classify documents in bulk on vLLM, with a managed API as overflow."""
