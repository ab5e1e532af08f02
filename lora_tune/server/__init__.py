"""`lora-tune serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

`protocol.py` holds the request/response shapes, `decode.py` the per-sequence sampling and text
bookkeeping, `adapters.py` which adapters exist and which are in memory, `inference.py` the engine that
batches every running sequence into one forward pass, and `app.py` the FastAPI routes, auth and errors.
"""
