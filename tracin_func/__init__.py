"""tracin_func: functional TracIn influence for PyTorch."""

from ._api import embeddings, influence, self_influence, top_k
from ._checkpoints import Checkpoint, load_checkpoints
from ._explain import Explanation, Route, explain
from ._loss import ExampleLoss
from ._plan import SlowPathWarning
from ._topk import TopK, top_k_embeddings

__all__ = [
    "Checkpoint",
    "ExampleLoss",
    "Explanation",
    "Route",
    "SlowPathWarning",
    "TopK",
    "embeddings",
    "explain",
    "influence",
    "load_checkpoints",
    "self_influence",
    "top_k",
    "top_k_embeddings",
]
__version__ = "0.1.0"
