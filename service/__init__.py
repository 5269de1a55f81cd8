"""Kiln service: everything the web process needs. Never imports `workers`, torch or tensorrt at import time."""
