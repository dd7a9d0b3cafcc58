"""Workflow tools (no ComfyUI needed): graph definitions that generate the shipped UI and API JSON
(``build``), a checker of API workflows against node schemas (``check``), and a stdlib-only headless
client (``run_headless.py``)."""
