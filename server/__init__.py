"""Everything above drafting: `engine/` (the speculative step, the target, the scheduler), and on
top of it `http/` (the OpenAI-compatible API), `training/` and `cli.py`; `store/` brings model files."""
