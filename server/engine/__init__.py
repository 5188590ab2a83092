"""The engine: target model, drafter, the speculative step and the scheduler that serves many requests.

Where things are: `engine.py` (the `Engine`: start / step / release), `step.py` (prefill and the
speculative step: propose -> verify -> accept -> compact -> emit), `target.py` (the target model
adapters), `sequence.py` (one request's state), `scheduler.py` (one worker thread interleaving many
sequences), `drafters.py` (the `--draft` names -> a proposer from `drafting/`), `loading.py`,
`calibration.py` (tree budget from measured verify cost), `config.py`, `args.py` (its CLI options),
`prompts.py`, `detokenizer.py`, `outputs.py`, `metrics.py`, `profiling.py`, `events.py`, `errors.py`.
"""

from ...drafting.budget import TreeBudget, TreeMode
from .config import EngineConfig, SamplingParams
from .engine import Engine
from .loading import ModelLoadError, load_draft_model

__all__ = ["Engine", "EngineConfig", "ModelLoadError", "SamplingParams", "TreeBudget", "TreeMode",
           "load_draft_model"]
