"""Public scoring functions: validate at the edge, prepare each checkpoint once, then fold the pure core."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from ._checkpoints import Checkpoint
from ._data import num_examples
from ._driver import embedding_rows, score_blocks, self_scores, test_representations
from ._model import ParamSelector, exclusive_use
from ._setup import make_setup
from ._topk import TopK, merge
from ._validate import positive_int, seed_value

if TYPE_CHECKING:
    from typing_extensions import Unpack


class Options(TypedDict, total=False):
    """Keyword options shared by every scorer (see :func:`influence` for their meaning)."""

    params: ParamSelector
    layers: Sequence[str] | None
    batch_size: int | None
    chunk_size: int | None
    device: str | torch.device | None
    dtype: torch.dtype | None
    strict: bool
    progress: bool
    compile: bool
    factored: bool | None
    method: str


NORMALIZE = {
    None: "TracIn, the default",
    "cosine": "sum_c lr_c cos(g_c(test), g_c(train))",
    "train": "sum_c lr_c <g_c(test), g_c(train)> / |g_c(train)|",
}


def _check_normalize(normalize: Any) -> str | None:
    if normalize is None or (isinstance(normalize, str) and normalize in NORMALIZE):
        return normalize
    allowed = "; ".join(f"{key!r} ({meaning})" for key, meaning in NORMALIZE.items())
    error = ValueError if isinstance(normalize, str) else TypeError
    raise error(f"`normalize`={normalize!r} is not allowed; pass one of {allowed}.")


def _check_options(options: dict[str, Any], function: str) -> None:
    unknown = sorted(set(options) - set(Options.__annotations__))
    if unknown:
        raise TypeError(f"`{function}` got unknown option(s) {unknown}; options are {sorted(Options.__annotations__)}.")


def influence(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    train: Any,
    test: Any,
    *,
    loss_fn: Any,
    test_loss_fn: Any = None,
    aggregate: bool = False,
    normalize: str | None = None,
    **options: Unpack[Options],
) -> torch.Tensor:
    """TracIn influence of every training example on every test example.

    ``S[i, j] = sum_c lr_c <grad test_loss(test_i; theta_c), grad loss(train_j; theta_c)>``.

    Raw TracIn favours training examples with large gradients (often mislabeled ones): they tend to be the top
    proponents and opponents of every test example. ``normalize`` renormalises each checkpoint's term:
    ``"cosine"`` gives ``sum_c lr_c cos(g_c(test_i), g_c(train_j))`` (each score within ``+-sum_c lr_c``), and
    ``"train"`` divides by the training gradient's norm only, ``sum_c lr_c <g_c(test_i), g_c(train_j)> /
    |g_c(train_j)|``, which keeps the test gradients' scale (with one checkpoint it ranks like the cosine).

    Args:
        model: an ``nn.Module`` (only its function shape is used; it is never modified) or a pure function
            ``f(params, *inputs)``.
        checkpoints: ``tc.Checkpoint`` list, from :func:`load_checkpoints` or kept by a training loop.
        train, test: a batch ``(x1, ..., xk, y)``, a ``Dataset``, a ``DataLoader`` or an iterable of batches. The
            model gets ``x1..xk``; the target comes last. Index ``j`` is the j-th example in iteration order.
        loss_fn: criterion ``loss_fn(outputs, targets)`` with any ``reduction`` (one example's loss is the sum over
            its elements for ``"none"`` / ``"sum"``, their mean for ``"mean"``), or ``tc.ExampleLoss(fn)``.
        test_loss_fn: the same for test examples; defaults to ``loss_fn``.
        aggregate: sum over test examples, returning ``[1, n_train]``. With ``normalize="cosine"`` it is the sum of
            the test examples' cosines (each test gradient normalised before summing), which costs as much as the
            full matrix; with ``"train"`` the test gradients are summed first as usual.
        normalize: ``None`` (TracIn), ``"cosine"`` or ``"train"`` (see above). Exact on every path: the norms
            come from the same representations as the inner products (also factored ones). A zero gradient norm
            gives a score of 0 (its cosine with anything is defined as 0), never NaN.
        **options: shared by every scorer:

            - ``params``: names of the parameters to differentiate, or a predicate ``name -> bool``. Default:
              every parameter of the model that requires grad. ``layers`` (module names) selects the parameters
              under those modules instead, like Captum's ``layers=``.
            - ``batch_size``: examples per batch when data is a single batch or a ``Dataset``. Default: as many
              as keep dense per-sample gradients of the differentiated parameters within 256 MB (16 to 4096).
            - ``chunk_size``: examples per ``vmap`` call inside a batch (bounds activation memory).
            - ``device`` / ``dtype``: where and in which floating dtype to compute (``torch.float64`` works end to
              end). Default: the model's device, the checkpoints' one floating dtype (mixed or half-precision
              checkpoints need an explicit ``dtype``). Checkpoints and floating inputs are converted to it for
              the call; integer inputs (token ids) stay integers.
            - ``strict`` (True): a checkpoint must hold every entry of the model's state dict; ``False`` takes
              missing ones from the model. Unexpected entries are always an error.
            - ``progress`` (False): tqdm bars over checkpoints and batches.
            - ``compile`` (False): run the per-checkpoint updates through ``torch.compile`` (same numbers).
            - ``factored`` (None): how Linear / Conv / Embedding layers are handled. ``None`` picks per layer by
              a cost model: exact factored inner products from layer inputs and output gradients (no per-sample
              gradient formed) when ``T^2 (d_in + d_out) < d_in d_out`` for ``T`` rows per example, else dense
              per-sample gradients (Embedding layers: test gradients kept as their non-zero rows, matched to
              training tokens by id; LayerNorm / eval-mode BatchNorm: materialised from their normalised inputs).
              ``True`` factors every eligible layer, ``False`` none (all through ``vmap(grad)``). Same numbers.
            - ``method`` ("exact"): ``"last_layer"`` restricts scores to the weight and bias of the last
              ``nn.Linear`` the forward pass calls: exact TracIn on those parameters, whatever follows the layer
              (activations, other losses), at the cost of about one forward pass per example.

    Returns:
        ``[n_test, n_train]`` float tensor (``[1, n_train]`` with ``aggregate=True``).

    Memory: the test gradients of every checkpoint are kept (``C * n_test * P`` floats); split very large test
    sets into several calls.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> S = tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=torch.nn.CrossEntropyLoss())
        >>> S.shape
        torch.Size([2, 10])
        >>> C = tc.influence(model, ckpts, (x, y), (x[:2], y[:2]), loss_fn=torch.nn.CrossEntropyLoss(),
        ...                  normalize="cosine")
        >>> bool((C.abs() <= 0.1 + 1e-6).all())  # one checkpoint, lr 0.1: |cosine| <= 1
        True
        >>> torch.allclose(C.diagonal(), torch.tensor([0.1, 0.1]))  # test_i is train_i: cosine 1
        True
    """
    _check_options(options, "influence")
    normalize = _check_normalize(normalize)
    setup = make_setup(model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, **options)
    with exclusive_use(model, setup.spec):
        queries = test_representations(setup, test, aggregate=aggregate, normalize=normalize)
        blocks = [block for _, block in score_blocks(setup, queries, train, "influence")]
    if not blocks:
        raise ValueError("`train` holds no examples.")
    return torch.cat(blocks, dim=1)


def top_k(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    train: Any,
    test: Any,
    *,
    k: int,
    loss_fn: Any,
    test_loss_fn: Any = None,
    proponents: bool = True,
    aggregate: bool = False,
    normalize: str | None = None,
    **options: Unpack[Options],
) -> TopK:
    """The ``k`` strongest proponents (highest scores) or opponents (lowest) of each test example.

    Streams over training batches keeping a running top-k, so memory does not grow with ``n_train``. Arguments
    and options as in :func:`influence`, plus ``k`` (``1 <= k <= n_train``) and ``proponents``. With
    ``normalize="cosine"`` (or ``"train"``) the ranking is by the renormalised scores, so training examples with
    large gradients (often mislabeled) no longer top every test example's list.

    Returns:
        ``TopK(indices, scores)``, each ``[n_test, k]`` (``[1, k]`` with ``aggregate=True``), sorted by score:
        descending for proponents, ascending for opponents.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> top = tc.top_k(model, ckpts, (x, y), (x[:2], y[:2]), k=3, loss_fn=torch.nn.CrossEntropyLoss())
        >>> top.indices.shape, bool((top.scores[:, :-1] >= top.scores[:, 1:]).all())
        (torch.Size([2, 3]), True)
        >>> cos = tc.top_k(model, ckpts, (x, y), (x[:2], y[:2]), k=3, loss_fn=torch.nn.CrossEntropyLoss(),
        ...               normalize="cosine")
        >>> bool((cos.scores <= 0.1 + 1e-6).all())  # sum_c lr_c cos(...) <= sum_c lr_c
        True
    """
    _check_options(options, "top_k")
    normalize = _check_normalize(normalize)
    k = positive_int(k, "k")
    n_train = num_examples(train)
    if n_train is not None and k > n_train:
        raise ValueError(f"`k`={k} exceeds the number of training examples ({n_train}); pass `k <= {n_train}`.")
    setup = make_setup(model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, **options)
    best, seen, desc = None, 0, "proponents" if proponents else "opponents"
    with exclusive_use(model, setup.spec):
        queries = test_representations(setup, test, aggregate=aggregate, normalize=normalize)
        for offset, block in score_blocks(setup, queries, train, desc):
            best, seen = merge(best, block, offset, k, largest=proponents), offset + block.shape[1]
    if best is None or seen < k:
        raise ValueError(f"`k`={k} exceeds the number of training examples ({seen}); pass `k <= {seen}`.")
    return best


def self_influence(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    data: Any,
    *,
    loss_fn: Any,
    normalize: None = None,
    **options: Unpack[Options],
) -> torch.Tensor:
    """Self-influence ``sum_c lr_c |grad loss(z; theta_c)|^2`` of every example of ``data``.

    ``data`` is the training data or any other. High values flag examples the model found surprising, often
    mislabeled ones. Arguments and options as in :func:`influence`. ``normalize`` must stay ``None``: a cosine
    self-influence is ``sum_c lr_c`` for every example (it ranks nothing), and ``"train"`` would give
    ``sum_c lr_c |g_c|``, a gradient norm rather than a renormalised score.

    Returns:
        ``[n]`` float tensor, equal to the diagonal of ``influence(data, data)``.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> tc.self_influence(model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss()).shape
        torch.Size([10])
    """
    _check_options(options, "self_influence")
    if _check_normalize(normalize) is not None:
        raise ValueError(
            f"`normalize`={normalize!r} has no use in `self_influence`: an example's cosine with itself is 1, so "
            f"the cosine self-influence is sum_c lr_c for every example (0 where its gradient is zero) and ranks "
            f"nothing; 'train' would give sum_c lr_c |g_c|, a plain gradient norm. Drop `normalize` (TracIn "
            f"self-influence, sum_c lr_c |g_c|^2, is what finds mislabeled examples); renormalised scores are for "
            f"test / train pairs: `tc.influence` and `tc.top_k`."
        )
    setup = make_setup(model, checkpoints, loss_fn=loss_fn, **options)
    with exclusive_use(model, setup.spec):
        return self_scores(setup, data)


def embeddings(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    data: Any,
    *,
    loss_fn: Any,
    projection_dim: int | None = None,
    seed: int = 0,
    **options: Unpack[Options],
) -> torch.Tensor:
    """Influence embeddings: per checkpoint ``sqrt(lr_c) * grad loss(z; theta_c)``, concatenated over checkpoints,
    so that ``embeddings(test) @ embeddings(train).T == influence(train, test)``.

    With ``projection_dim=k`` each checkpoint's gradient is projected to ``k`` dimensions by a seeded random
    matrix with ``E[P P^T] = I``, so dot products of embeddings are unbiased estimates of the exact scores. The
    matrix is never stored: it is generated block by block from ``seed``
    with integer hashing, identical on every device and for every call with the same seed, so embed test and
    training data separately with the same ``seed``. Matrix-shaped parameters (Linear, Conv, Embedding weights,
    whether factored or not) get Kronecker-factored projections ``P_rows ⊗ P_cols`` with ``k = k_rows * k_cols``
    (choose ``k`` with two close factors, e.g. a power of two); vector parameters a dense hashed one. The error
    shrinks like ``1 / sqrt(k)`` for vector parameters and more slowly for Kronecker-projected matrices (between
    ``k^(-1/4)`` and ``k^(-1/2)``: the factors have only ``sqrt(k)`` columns each).

    Embed test examples with the test loss (``loss_fn=test_loss_fn``). Search them with :func:`top_k_embeddings`.
    Arguments and options as in :func:`influence`.

    Returns:
        ``[n, C * P]`` float tensor (C checkpoints, P differentiated parameters), or ``[n, C * k]`` projected.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)] * 2
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> tc.embeddings(model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss()).shape
        torch.Size([10, 30])
    """
    _check_options(options, "embeddings")
    projection = None
    if projection_dim is not None:
        projection = (positive_int(projection_dim, "projection_dim"), seed_value(seed))
    setup = make_setup(model, checkpoints, loss_fn=loss_fn, projection=projection, **options)
    with exclusive_use(model, setup.spec):
        return embedding_rows(setup, data)
