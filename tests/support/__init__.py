"""Helpers shared by the tests: a live uvicorn server, a tiny bundle built without torch, dict edits."""
