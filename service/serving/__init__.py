"""Serving: deployments held in memory, dynamic batching, the Open Inference Protocol."""
