"""Public scoring functions: validate at the edge, prepare each checkpoint once, then fold the pure core."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import torch

from ._checkpoints import Checkpoint
from ._context import in_own_context
from ._data import as_dict, known_examples, num_examples, replayable
from ._distributed import (
    Ranks,
    agree,
    check_whole,
    checked_on_every_rank,
    gather_objects,
    join,
    laid_out,
    on_every_rank,
    set_up_on_every_rank,
    share,
    stack_top_k,
    summed,
)
from ._driver import (
    ReadAlike,
    collect_rows,
    counting_reads,
    embedding_blocks,
    query_chunks,
    score_blocks,
    self_blocks,
)
from ._index import Index
from ._model import ParamSelector
from ._projection import projection_of
from ._search import index_influence, index_setup, index_top_k, rerank_candidates
from ._setup import Setup, in_use, make_setup
from ._topk import TopK, merge
from ._validate import boolean, positive_int
from ._warn import warn

T = TypeVar("T")

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
    distributed: Any
    test_memory_bytes: int


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
    tested = function in ("influence", "top_k")  # (the functions with a test side)
    known = sorted(n for n in Options.__annotations__ if tested or n != "test_memory_bytes")
    unknown = sorted(set(options) - set(Options.__annotations__))
    if unknown:
        raise TypeError(f"`{function}` got unknown option(s) {unknown}; options are {known}.")
    if "test_memory_bytes" in options and not tested:
        raise TypeError(
            f"`{function}` has no test side: `test_memory_bytes` bounds the test gradients of `influence` / `top_k`."
        )


@in_own_context
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
    per_layer: bool = False,
    **options: Unpack[Options],
) -> torch.Tensor | dict[str, torch.Tensor]:
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
        checkpoints: ``tc.Checkpoint`` list, from :func:`load_checkpoints` or kept by a training loop. Checkpoints
            carrying an Adam / AdamW ``optimizer_state`` give Adam-aware TracIn: each training gradient is replaced
            by the update Adam would take for that example alone, ``S[i, j] = sum_c lr_c <g_c(test_i),
            u_c(train_j)>`` (README "Adam-aware TracIn"); ``self_influence`` is then ``sum_c lr_c <g_c, u_c>``.
        train, test: a batch ``(x1, ..., xk, y)``, a ``Dataset``, a ``DataLoader`` or an iterable of batches. The
            model gets ``x1..xk``; the target comes last. Index ``j`` is the j-th example in iteration order.
        loss_fn: criterion ``loss_fn(outputs, targets)`` with ``reduction`` ``"none"``, ``"sum"`` or ``"mean"`` (one
            example's loss is the sum over its elements for ``"none"`` / ``"sum"``, their mean for ``"mean"``;
            ``KLDivLoss``'s ``"batchmean"`` is its ``"sum"`` on one example: pass that), or ``tc.ExampleLoss(fn)``.
        test_loss_fn: the same for test examples; defaults to ``loss_fn``.
        aggregate: sum over test examples, returning ``[1, n_train]``. With ``normalize="cosine"`` it is the sum of
            the test examples' cosines (each test gradient normalised before summing), which costs as much as the
            full matrix; with ``"train"`` the test gradients are summed first as usual.
        normalize: ``None`` (TracIn), ``"cosine"`` or ``"train"`` (see above). Exact on every path: the norms
            come from the same representations as the inner products (also factored ones). A zero gradient norm
            gives a score of 0 (its cosine with anything is defined as 0), never NaN.
        per_layer: return the scores split by layer, ``{layer: [n_test, n_train]}``, summing exactly to the total
            (the README's "Per-layer scores"). A parameter's layer is the module that owns it, its name without
            the last component (``"encoder.0.fc1.weight"`` -> ``"encoder.0.fc1"``; parameters of the root module,
            e.g. a bare ``nn.Linear``'s, -> ``""``); a pure function's dotted keys group the same way and a key
            without a dot is a layer of its own. Layers come in the order of their first parameter. Every route
            (factored, materialised, vmap, loop, Embedding token rows) splits its own parts, at about the cost of
            the total. With ``normalize``, each layer's share is its inner product divided by the norms of the
            whole gradients, so the shares still sum to the renormalised score (it is not the layer's own cosine).
            Works with ``aggregate``.
        **options: shared by every scorer:

            - ``params``: names of the parameters to differentiate, or a predicate ``name -> bool``. Default:
              every parameter of the model that requires grad. ``layers`` (module names) selects the parameters
              under those modules that require grad instead (Captum's ``layers=`` takes their frozen ones too:
              name those with ``params``).
            - ``batch_size``: examples per batch when data is a single batch or a ``Dataset``. Default: as many
              as keep the gradients within 256 MB (16 to 4096, fewer where 16 would not fit; on CPU 64 MB, 128 to
              512 examples, or more when 4 MB holds more, and fewer where the forward's largest tensor would pass
              16 MB, which keeps a batch's tensors cache-friendly), sized by what the call's plan holds per example
              until scored (factors of layers kept or formed when scored, per-sample gradients of the rest), in
              batches of even size.
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
              gradient formed) when ``T^2 (d_in + d_out) < d_in d_out`` for ``T`` rows per example (a Linear's
              rows with output gradient: a classifier reading one token leaves the rest zero), else dense
              per-sample gradients (Embedding layers: test gradients kept as their non-zero rows, matched to
              training tokens by id; LayerNorm / eval-mode BatchNorm: materialised from their normalised inputs).
              ``True`` factors every eligible layer, ``False`` none (all through ``vmap(grad)``). Same numbers.
            - ``method`` ("exact"): ``"last_layer"`` restricts scores to the weight and bias of the last
              ``nn.Linear`` the forward pass calls: exact TracIn on those parameters, whatever follows the layer
              (activations, other losses), at the cost of about one forward pass per example.
            - ``distributed`` (False): ``True`` (the default process group) or a ``torch.distributed``
              ``ProcessGroup``: each rank computes its share of the training data (a batch or ``Dataset`` by row
              range, other iterables by batch number, an index by shard) and every rank returns the full result.
            - ``test_memory_bytes`` (1 GiB): test representations held at once; a larger test set is scored in
              chunks, each against the whole training data (same results).

        ``train`` may also be a :class:`Index` (from :func:`build_index`): the test examples are embedded with its
        projection and its shards streamed; the call's checkpoints, parameters, loss and dtype must match it.

    Returns:
        ``[n_test, n_train]`` float tensor (``[1, n_train]`` with ``aggregate=True``); with ``per_layer=True`` a dict
        ``{layer: tensor}`` of that shape.

    Memory: test gradients of every checkpoint up to ``test_memory_bytes``, plus one training batch's and its
    block of scores (16 MB under the automatic batch size, held about four times over by its layers' products while
    summed), and the result, written into place (twice the result
    for training data of a size not known before it is read: an iterable of batches other than a list, or a
    DataLoader with a sampler or ``collate_fn`` of its own).

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

        Per-layer scores of a two-layer model sum to the total:

        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> ckpts = [tc.Checkpoint(params=dict(mlp.state_dict()), lr=0.1)]
        >>> parts = tc.influence(mlp, ckpts, (x, y), (x[:2], y[:2]), loss_fn=torch.nn.CrossEntropyLoss(),
        ...                      per_layer=True)
        >>> list(parts), parts["2"].shape
        (['0', '2'], torch.Size([2, 10]))
        >>> total = tc.influence(mlp, ckpts, (x, y), (x[:2], y[:2]), loss_fn=torch.nn.CrossEntropyLoss())
        >>> torch.allclose(parts["0"] + parts["2"], total, atol=1e-6)
        True
    """

    def checked() -> tuple[str | None, Any, Any, int | None]:  # (the data read here: it may fail on one rank)
        _check_options(options, "influence")
        normalized = _check_normalize(normalize)
        boolean(per_layer, "per_layer")
        boolean(aggregate, "aggregate")
        if isinstance(train, Index):
            _check_index_call(normalized, per_layer)
        tested = as_dict(test)
        check_whole(tested, "`test`", options.get("distributed"))
        return normalized, as_dict(train), tested, known_examples(tested)

    normalize, train, test, n_test = checked_on_every_rank(options.get("distributed"), checked)
    n_train = None if isinstance(train, Index) else known_examples(train)  # (known: each chunk's scores written into
    # place, the chunks into one result)
    if isinstance(train, Index):
        setup = index_setup(
            train, model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, options=options,
            agreed={"the number of test examples": n_test, "the options": aggregate},
        )
        return index_influence(train, setup, test, aggregate=aggregate)
    setup = set_up_on_every_rank(
        options.get("distributed"),
        lambda: make_setup(model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, **options),
        **{"the number of test examples": n_test, "the options": (normalize, aggregate, per_layer),
           # (a list on one rank, a stream on another: their results were combined by other collectives, aborting)
           "the training examples' number where known before reading (a list or Dataset; a stream: None)": n_train},
    )
    data, start, by_batch = share(replayable(train), setup.ranks)  # (a one-pass iterator's head: for planning)
    like = torch.empty(0, device=setup.device, dtype=setup.dtype)
    whole = n_train and n_test and not aggregate
    counted = "train" if setup.ranks is None else None  # (one process writes every column)

    def local() -> list[Any]:  # per chunk of test examples, this rank's scores (or score blocks); or all in one
        with in_use(setup):
            chunks = query_chunks(
                setup, test, aggregate=aggregate, normalize=normalize, budget=setup.test_budget, train=data,
                train_start=start,
            )
            scored, reads, out, row = [], ReadAlike(), None, 0  # (the training data, read alike by each chunk)
            for q in chunks:
                b = score_blocks(setup, q, data, "influence", start=start, ranks=by_batch, per_layer=per_layer,
                                 reads=reads)  # fmt: skip
                if whole:
                    out = laid_out(b, n_test, n_train, like, into=out, at=row, where=counted)
                    row += q.rows
                else:
                    rows = 1 if q.sum_rows else q.rows
                    scored.append(laid_out(b, rows, n_train, like, where=counted) if n_train else list(b))
                q = b = None  # let go before the next chunk is represented (it was held beside it: 2x the bound)
            return [out] if whole else scored

    parts = _read_alike_on_every_rank(setup.ranks, by_batch, local)
    rows = [summed(p, setup.ranks) if n_train else join(p, 1, setup.ranks, like) for p in parts]
    if rows[0] is None:
        raise ValueError("`train` holds no examples.")
    if per_layer:
        return _warned_if_lost({layer: _stack([r[layer] for r in rows], aggregate) for layer in rows[0]})
    return _warned_if_lost(_stack(rows, aggregate))


def _read_alike_on_every_rank(ranks: Ranks | None, by_batch: Ranks | None, local: Callable[[], T]) -> T:
    """``on_every_rank(ranks, local)``, and where iterable data is split by batch number (``by_batch``), the ranks
    agreeing on how many examples each pass read: ranks given lists of different lengths returned a matrix of the
    shorter's width, a batch numbered for a rank that lacked it lost, silently."""
    with counting_reads() as counted:
        result = on_every_rank(ranks, local)
    if by_batch is not None:
        agree(ranks, **{"the number of examples (iterable data, read whole by every rank)": max(counted, default=0)})
    return result


def _warned_if_lost(scores: Any) -> Any:
    """``scores``, after a warning where every one is exactly 0 (no example's loss has a gradient in the parameters
    scored, or they underflowed) or where the largest lies among the dtype's subnormal numbers, which keep fewer
    digits, down to none. Each example is scored on its own loss, alone, where a loss comparing a batch's examples
    (in-batch contrastive, InfoNCE) has nothing to compare: every score 0, silently."""
    parts = list(scores.values()) if isinstance(scores, dict) else [scores]
    parts = [p for p in parts if p.numel()]
    if not parts:
        return scores
    largest = max(float(bound.abs()) for p in parts for bound in torch.aminmax(p))  # (no copy of the matrix)
    if largest == 0:
        wider = "pass `dtype=torch.float64`, or scale the loss" if parts[0].dtype != torch.float64 else "scale the loss"
        warn(
            "Every score is 0: no example's loss has a gradient in the parameters scored (the loss does not reach "
            "them, is constant on one example, has no label left to score (all ignored: -100), or is computed under "
            f"`torch.inference_mode()`), or the gradients are so small that their products underflow the dtype "
            f"({wider}). TracIn "
            "scores each example on its own loss, alone: a loss comparing the examples of a batch (in-batch "
            "contrastive, InfoNCE) has nothing to compare there; give each example what it is compared with "
            "(`tc.ExampleLoss` with fixed negatives).",
            UserWarning,
        )
    else:
        _warned_if_subnormal(largest, parts[0].dtype)
    return scores


def _warned_if_subnormal(largest: float, dtype: torch.dtype) -> None:
    """A warning where the largest score, ``largest`` (nonzero), lies below ``dtype``'s least normal number."""
    name, tiny = str(dtype).replace("torch.", ""), torch.finfo(dtype).tiny
    if not 0 < largest < tiny:
        return
    fix = "Pass `dtype=torch.float64`" if dtype != torch.float64 else "Multiply the loss by a constant"
    warn(
        f"The largest score is {largest:.2e}, below {name}'s least normal number ({tiny:.2e}): scores this small "
        f"keep fewer digits, down to none, and their order is rounding's. {fix} (scores scale with the loss's square "
        f"and with the learning rates).",
        UserWarning,
    )


def _stack(rows: list[torch.Tensor], aggregate: bool) -> torch.Tensor:
    """The scores of consecutive test chunks: their rows, or with ``aggregate`` (a sum of cosines) their sum."""
    if len(rows) == 1:
        return rows[0]
    return torch.stack(rows).sum(0) if aggregate else torch.cat(rows)


@in_own_context
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
    rerank: Any = None,
    candidates: int | None = None,
    **options: Unpack[Options],
) -> TopK:
    """The ``k`` strongest proponents (highest scores) or opponents (lowest) of each test example.

    Streams over training batches keeping a running top-k, so memory does not grow with ``n_train``. Arguments
    and options as in :func:`influence`, plus ``k`` (``1 <= k <= n_train``) and ``proponents``. With
    ``normalize="cosine"`` (or ``"train"``) the ranking is by the renormalised scores, so training examples with
    large gradients (often mislabeled) no longer top every test example's list.

    With an :class:`Index` as ``train``, ``rerank`` (the training data the index was built from, a batch or a
    ``Dataset`` in the same order) recomputes exact scores for the ``candidates`` (default ``10 k``) best rows
    of the index's (projected) search and returns the exact top-k among them.

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

    def checked() -> tuple[str | None, int, Any, Any, int | None]:  # (the data read here: it may fail on one rank)
        _check_options(options, "top_k")
        normalized, checked_k = _check_normalize(normalize), positive_int(k, "k")
        boolean(proponents, "proponents")
        boolean(aggregate, "aggregate")
        if isinstance(train, Index):
            _check_index_call(normalized)
        elif rerank is not None or candidates is not None:
            raise ValueError(
                "`rerank` / `candidates` re-rank the candidates an index proposes: pass a `tc.Index` as `train` (from "
                "`tc.build_index` or `tc.open_index`) and the training data as `rerank=`."
            )
        tested = as_dict(test)
        check_whole(tested, "`test`", options.get("distributed"))
        return normalized, checked_k, as_dict(train), tested, num_examples(tested)

    normalize, k, train, test, n_test = checked_on_every_rank(options.get("distributed"), checked)
    if isinstance(train, Index):
        return _index_top_k(
            train, model, checkpoints, test, k=k, loss_fn=loss_fn, test_loss_fn=test_loss_fn, proponents=proponents,
            aggregate=aggregate, rerank=as_dict(rerank), candidates=candidates, options=options, n_test=n_test,
        )
    def set_up() -> Setup:
        n_train = num_examples(train)
        if n_train == 0:
            raise ValueError("`train` holds no examples.")
        if n_train is not None and k > n_train:
            raise ValueError(f"`k`={k} exceeds the number of training examples ({n_train}); pass `k <= {n_train}`.")
        return make_setup(model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, **options)

    setup = set_up_on_every_rank(
        options.get("distributed"),
        set_up,
        **{"the number of test examples": n_test, "the options": (k, proponents, aggregate, normalize)},
    )
    data, start, by_batch = share(replayable(train), setup.ranks)  # (a one-pass iterator's head: for planning)
    desc = "proponents" if proponents else "opponents"

    def local() -> tuple[list[tuple[TopK | None, int]], int]:  # per test chunk (this rank's top-k, rows), seen
        lists, seen = [], 0
        with in_use(setup):
            budget = None if aggregate else setup.test_budget  # lists of summed scores cannot be merged by chunk
            chunks = query_chunks(
                setup, test, aggregate=aggregate, normalize=normalize, budget=budget, train=data, train_start=start
            )
            reads = ReadAlike() if budget is not None else None  # (the training data, read alike by each chunk's pass)
            for q in chunks:
                best, seen = None, 0
                for offset, block in score_blocks(setup, q, data, desc, start=start, ranks=by_batch, reads=reads):
                    best, seen = merge(best, block, offset, k, largest=proponents), seen + block.shape[1]
                lists.append((best, 1 if q.sum_rows else q.rows))
                q = block = None  # let go before the next chunk is represented (it was held beside it: 2x the bound)
        return lists, seen

    lists, seen = _read_alike_on_every_rank(setup.ranks, by_batch, local)
    if setup.ranks is not None:
        seen = int(sum(gather_objects(seen, setup.ranks)))
    if seen < k:
        if seen == 0:
            raise ValueError("`train` holds no examples.")
        raise ValueError(f"`k`={k} exceeds the number of training examples ({seen}); pass `k <= {seen}`.")
    top = stack_top_k(lists, k, proponents, setup.ranks, torch.empty(0, device=setup.device, dtype=setup.dtype))
    _warned_if_subnormal(float(top.scores.abs().max()) if top.scores.numel() else 0.0, top.scores.dtype)
    return top


def _check_index_call(normalize: str | None, per_layer: bool = False) -> None:
    if normalize is not None or per_layer:
        option = f"`normalize`={normalize!r}" if normalize is not None else "`per_layer=True`"
        raise ValueError(
            f"{option} is not available with an index as `train`: an index stores each example's embedding over all "
            f"checkpoints and layers. Pass the training data itself as `train`."
        )


def _index_top_k(
    index: Index,
    model: Any,
    checkpoints: Iterable[Checkpoint],
    test: Any,
    *,
    k: int,
    loss_fn: Any,
    test_loss_fn: Any,
    proponents: bool,
    aggregate: bool,
    rerank: Any,
    candidates: int | None,
    options: dict[str, Any],
    n_test: int | None,
) -> TopK:
    """``top_k`` with an index as ``train``: streamed over its shards, then optionally re-ranked exactly."""

    def checked() -> tuple[int | None, Any]:  # the number of candidates to re-rank, with `rerank`; the checkpoints
        # (a generator read here, on every rank: read twice with `rerank`, its second read was empty)
        listed = list(checkpoints) if isinstance(checkpoints, Iterator) else checkpoints
        if k > len(index):
            rows = len(index)
            raise ValueError(f"`k`={k} exceeds the number of rows of the index ({rows}); pass `k <= {rows}`.")
        if rerank is None:
            if candidates is not None:
                raise ValueError("`candidates` is how many candidates to re-rank: pass the training data as `rerank=`.")
            return None, listed
        m = min(len(index), 10 * k) if candidates is None else positive_int(candidates, "candidates")
        if not k <= m <= len(index):
            raise ValueError(f"`candidates`={m} must lie in [k, rows of the index] = [{k}, {len(index)}].")
        return m, listed

    m, checkpoints = checked_on_every_rank(options.get("distributed"), checked)
    agreed = {"the number of test examples": n_test, "the options": (k, proponents, aggregate, candidates)}
    setup = index_setup(
        index, model, checkpoints, loss_fn=loss_fn, test_loss_fn=test_loss_fn, options=options, agreed=agreed
    )
    if m is None:
        return index_top_k(index, setup, test, k=k, proponents=proponents, aggregate=aggregate)
    from ._build import unmatched_rows  # (here: _build imports this module)

    def rerank_sized() -> None:  # (on every rank: the exact scores' calls are collective)
        n = num_examples(rerank)
        if n != len(index):
            got = n if n is not None else "data of unknown size"
            loader = "; a DataLoader: pass its `dataset`" if isinstance(rerank, torch.utils.data.DataLoader) else ""
            raise ValueError(
                f"`rerank` must be the training data the index was built from, in the same order (a batch or a "
                f"Dataset of {len(index)} examples); got {got}{loader}."
            )

    def rerank_matched() -> None:  # (the shards holding candidates: the rows re-scored; not all of the data)
        unmatched = unmatched_rows(index, setup, rerank, torch.unique(proposed.indices.cpu()))
        if unmatched is not None:
            raise ValueError(
                f"`rerank` must be the training data the index was built from, in the same order: its rows "
                f"[{unmatched[0]}, {unmatched[1]}) differ from those the index holds (by their digest). Pass that data."
            )

    on_every_rank(setup.ranks, rerank_sized)
    proposed = index_top_k(index, setup, test, k=m, proponents=proponents, aggregate=aggregate)
    on_every_rank(setup.ranks, rerank_matched)

    def exact(subset: Any) -> torch.Tensor:
        return influence(
            model, checkpoints, subset, test, loss_fn=loss_fn, test_loss_fn=test_loss_fn, aggregate=aggregate,
            **options,
        )

    return rerank_candidates(proposed, k, proponents, rerank, exact)


@in_own_context
def self_influence(
    model: Any,
    checkpoints: Iterable[Checkpoint],
    data: Any,
    *,
    loss_fn: Any,
    normalize: None = None,
    per_layer: bool = False,
    **options: Unpack[Options],
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Self-influence ``sum_c lr_c |grad loss(z; theta_c)|^2`` of every example of ``data``.

    ``data`` is the training data or any other. High values flag examples the model found surprising, often
    mislabeled ones. Arguments and options as in :func:`influence`. ``normalize`` must stay ``None``: a cosine
    self-influence is ``sum_c lr_c`` for every example (it ranks nothing), and ``"train"`` would give
    ``sum_c lr_c |g_c|``, a gradient norm rather than a renormalised score.

    ``per_layer=True`` splits it by layer (layers as in :func:`influence`): ``{layer: [n]}``, each entry
    ``sum_c lr_c |g_c restricted to the layer|^2``, summing exactly to the total.

    Returns:
        ``[n]`` float tensor, equal to the diagonal of ``influence(data, data)``; with ``per_layer=True`` a dict
        ``{layer: [n]}``.

    Example:
        >>> import torch, tracin_func as tc
        >>> model = torch.nn.Linear(4, 3)
        >>> ckpts = [tc.Checkpoint(params=dict(model.state_dict()), lr=0.1)]
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> tc.self_influence(model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss()).shape
        torch.Size([10])
        >>> parts = tc.self_influence(model, ckpts, (x, y), loss_fn=torch.nn.CrossEntropyLoss(), per_layer=True)
        >>> list(parts), parts[""].shape  # a bare nn.Linear: its parameters belong to the root module ""
        ([''], torch.Size([10]))
    """

    def checked() -> Any:  # the data (read here: it may fail on one rank)
        _check_options(options, "self_influence")
        if isinstance(data, Index):
            raise TypeError(
                "`data` is an index, which holds every row's self-influence: call `index.self_influence()`."
            )
        boolean(per_layer, "per_layer")
        if _check_normalize(normalize) is not None:
            raise ValueError(
                f"`normalize`={normalize!r} has no use in `self_influence`: an example's cosine with itself is 1, so "
                f"the cosine self-influence is sum_c lr_c for every example (0 where its gradient is zero) and ranks "
                f"nothing; 'train' would give sum_c lr_c |g_c|, a plain gradient norm. Drop `normalize` (TracIn "
                f"self-influence, sum_c lr_c |g_c|^2, is what finds mislabeled examples); renormalised scores are for "
                f"test / train pairs: `tc.influence` and `tc.top_k`."
            )
        return as_dict(data)

    data = checked_on_every_rank(options.get("distributed"), checked)
    setup = set_up_on_every_rank(
        options.get("distributed"),
        lambda: make_setup(model, checkpoints, loss_fn=loss_fn, **options),
        **{"the options": per_layer},
    )
    mine, start, by_batch = share(data, setup.ranks)

    def local() -> list[tuple[int, Any]]:
        with in_use(setup):
            return list(self_blocks(setup, mine, start=start, ranks=by_batch, per_layer=per_layer))

    like = torch.empty(0, dtype=setup.dtype, device=setup.device)
    scores = join(_read_alike_on_every_rank(setup.ranks, by_batch, local), 0, setup.ranks, like)
    if scores is None:
        raise ValueError("`data` holds no examples.")
    return _warned_if_lost(scores)


@in_own_context
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
    Checkpoints carrying an Adam ``optimizer_state`` embed the training side, ``sqrt(lr_c) * u_c`` (each example's
    Adam update): embed test examples with the same checkpoints without it (``tc.Checkpoint(c.params, c.lr)``), so
    that ``E_test @ E_train.T`` is Adam-aware TracIn (projected: the LESS recipe).
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

    def checked() -> tuple[tuple[int, int] | None, Any]:  # the projection and the data (read here: it may fail)
        _check_options(options, "embeddings")
        if isinstance(data, Index):
            raise TypeError("`data` is an index, which holds the embeddings: call `index.embeddings(rows)`.")
        projection = projection_of(projection_dim, seed)
        return projection, as_dict(data)

    projection, data = checked_on_every_rank(options.get("distributed"), checked)
    setup = set_up_on_every_rank(
        options.get("distributed"),
        lambda: make_setup(model, checkpoints, loss_fn=loss_fn, projection=projection, **options),
        **{"the projection (`projection_dim`, `seed`)": projection},
    )
    mine, start, by_batch = share(data, setup.ranks)

    def local() -> torch.Tensor | list[tuple[int, torch.Tensor]]:
        with in_use(setup):
            blocks = embedding_blocks(setup, mine, start=start, ranks=by_batch)
            return list(blocks) if setup.ranks is not None else collect_rows(blocks, known_examples(mine))

    rows = _read_alike_on_every_rank(setup.ranks, by_batch, local)
    if setup.ranks is not None:
        rows = join(rows, 0, setup.ranks, torch.empty(0, dtype=setup.dtype, device=setup.device))
    if rows is None:
        raise ValueError("`data` holds no examples.")
    return rows
