"""tracin_func: functional TracIn influence for PyTorch."""

from ._api import embeddings, influence, self_influence, top_k
from ._build import build_index
from ._checkpoints import Checkpoint, load_checkpoints
from ._explain import Explanation, Route, explain
from ._index import Index, open_index
from ._loss import (
    BatchLoss,
    ExampleLoss,
    causal_lm_loss,
    seq2seq_lm_loss,
    sequence_classification_loss,
    token_classification_loss,
)
from ._plan import SlowPathWarning
from ._topk import TopK, top_k_embeddings
from ._tracer import Tracer, TracerState, tracer, tracer_init, tracer_update

__all__ = [
    "BatchLoss",
    "Checkpoint",
    "ExampleLoss",
    "Explanation",
    "Index",
    "Route",
    "SlowPathWarning",
    "TopK",
    "Tracer",
    "TracerState",
    "build_index",
    "causal_lm_loss",
    "embeddings",
    "explain",
    "influence",
    "load_checkpoints",
    "open_index",
    "self_influence",
    "seq2seq_lm_loss",
    "sequence_classification_loss",
    "token_classification_loss",
    "top_k",
    "top_k_embeddings",
    "tracer",
    "tracer_init",
    "tracer_update",
]
__version__ = "0.1.0"
