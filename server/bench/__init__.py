"""`specserve bench`: a load generator and report for any OpenAI-compatible server (`cli.py`), its
workloads (`workload.py`, `prompts.py`), the streamed client (`client.py`) and summaries (`summary.py`).
It imports nothing of the engine: it measures servers from the outside, as their users do."""
