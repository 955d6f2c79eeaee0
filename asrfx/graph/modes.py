"""Train and eval mode in captured graphs.

torch.fx and torch.export read ``self.training`` once, while capturing: a call such as
``F.batch_norm(..., self.training, ...)``, torchvision's ``stochastic_depth(x, p, mode,
self.training)`` or export's ``aten.dropout(x, p, True)`` keeps the mode it was captured in, and
export's graph counts BatchNorm batches (``num_batches_tracked.add_(1)``) in train mode only. Both
capture routes therefore capture the model twice, every module in train mode and every module in
eval mode (:func:`uniform_mode`), and merge the two graphs (:func:`training_graph`). The fx route
captures once when no module's flag is read while tracing (:func:`flag_reads`): the other mode
would run the same code on the same values.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import operator
import threading
from collections.abc import Callable, Iterator

from torch import fx, nn
from torch.fx.node import map_aggregate


from .ops import is_shape_query, module_path_of, op_of

__all__ = ["uniform_mode", "flag_reads", "training_graph", "training_graph_or_divergence", "merge_training_graphs",
           "is_counter", "dedupe_sizes"]


@contextlib.contextmanager
def uniform_mode(model: nn.Module, training: bool):
    """Every module of ``model`` in train (or eval) mode for the block, each flag restored after.
    Flags are set directly: a ``train()`` override (keeping norms frozen) would not make them uniform."""
    flags = {m: m.training for m in model.modules()}
    try:
        for m in flags:
            m.training = training
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


class _Flag:
    """``training`` of every module while installed on nn.Module: a data descriptor, so it sees each
    read before the instance's ``__dict__`` does; values stay in that ``__dict__`` (reads and writes
    behave as without it). torch.fx patches nn.Module the same way while tracing (``__call__``,
    ``__getattr__``)."""

    def __init__(self):
        self.watches: tuple[_Watch, ...] = ()

    def __get__(self, module, owner=None):
        if module is None:
            raise AttributeError("training")
        for watch in self.watches:
            watch.read = True
        try:
            return module.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None

    def __set__(self, module, value):
        module.__dict__["training"] = value

    def __delete__(self, module):
        del module.__dict__["training"]


class _Watch:
    def __init__(self, read: bool):
        self.read = read


_READS = _Flag()
_flag_lock = threading.Lock()


@contextlib.contextmanager
def flag_reads(model: nn.Module) -> Iterator[Callable[[], bool]]:
    """In the block, every read of a module's ``training`` attribute is seen; yields a function telling
    whether one happened (any module's, in any thread: a read elsewhere costs a second trace, nothing
    more). Always True when a module class of ``model`` defines ``training`` itself (the descriptor
    would not see its reads)."""
    watch = _Watch(any(_defines_training(cls) for cls in {type(m) for m in model.modules()}))
    with _flag_lock:
        if not _READS.watches:
            nn.Module.training = _READS
        _READS.watches += (watch,)
    try:
        yield lambda: watch.read
    finally:
        with _flag_lock:
            _READS.watches = tuple(w for w in _READS.watches if w is not watch)
            if not _READS.watches:
                del nn.Module.training


def _defines_training(cls: type) -> bool:
    """A class before nn.Module in ``cls``'s MRO (a subclass, a mixin) with its own ``training``."""
    return any("training" in vars(c) for c in itertools.takewhile(lambda c: c is not nn.Module, cls.__mro__))


def training_graph(graphs: dict[bool, fx.Graph | None], training: bool, name: str) -> tuple[fx.Graph, str]:
    """One graph that follows ``.train()``/``.eval()``, from the graphs captured with every module in
    train mode (``graphs[True]``) and in eval mode (``graphs[False]``); when they cannot be merged,
    the graph of the model's own mode ``training``, and a note saying so."""
    graph, note, _ = training_graph_or_divergence(graphs, training, name)
    return graph, note


def training_graph_or_divergence(graphs: dict[bool, fx.Graph | None], training: bool,
                                 name: str) -> tuple[fx.Graph, str, str]:
    """:func:`training_graph`, and, when the graphs differ in structure, the path of the innermost
    module where they first differ ("" if unknown or the top level): kept as a single call, that
    module runs its own forward and so follows its own ``.train()``/``.eval()`` (timm's DropPath)."""
    mode = "train" if training else "eval"
    if graphs[True] is None or graphs[False] is None:
        return graphs[training], (f"{name} could not be captured in {'eval' if training else 'train'} mode; "
                                  f"the graph follows the mode it was captured in ({mode})"), ""
    why, node = merge_training_graphs(graphs[True], graphs[False])
    if why:
        return (graphs[training], f"{name} {why}; the graph follows the mode it was captured in ({mode})",
                (module_path_of(node) or "") if node is not None else "")
    return graphs[True], "", ""


_FLAG = object()  # marks where a training flag goes


def _align_key(node: fx.Node) -> tuple:
    target = node.target if node.op == "call_function" else str(node.target)
    return node.op, target, module_path_of(node) if node.op != "get_attr" else None


def is_counter(node: fx.Node) -> bool:
    """``buffer.add_(c)`` with no reader, c a constant or (once merged) a training flag times a
    constant: a count kept in train mode only (BatchNorm's ``num_batches_tracked``)."""
    if node.op not in ("call_function", "call_method") or node.users or node.kwargs or len(node.args) != 2:
        return False
    target = node.target
    name = target if node.op == "call_method" else getattr(target, "_opname", getattr(target, "__name__", ""))
    buffer, step = node.args
    if isinstance(step, fx.Node) and step.target is operator.mul:
        step = next((a for a in step.args if isinstance(a, fx.Node)), None)
    is_flag = isinstance(step, fx.Node) and step.op == "get_attr" and str(step.target).rpartition(".")[2] == "training"
    return (name == "add_" and isinstance(buffer, fx.Node) and buffer.op == "get_attr"
            and (is_flag or isinstance(step, (int, float)) and not isinstance(step, bool)))


def merge_training_graphs(train: fx.Graph, eval_: fx.Graph) -> tuple[str, fx.Node | None]:
    """Make ``train`` follow the training flags; returns why it cannot (``train`` then unchanged) and
    the node where the graphs first differ (None when they align).

    Both graphs come from the same model, every module in train mode for ``train`` and in
    eval mode for ``eval_``. torch.fx and torch.export read ``self.training`` once, while
    capturing, so a call such as ``F.batch_norm(..., self.training, ...)``, torchvision's
    ``stochastic_depth(x, p, mode, self.training)`` or export's ``aten.dropout(x, p, True)``
    keeps the mode it was captured in. Where the graphs differ only in a bool that is True
    in train mode and False in eval mode, the bool becomes a read of the ``training`` flag of
    the module that made the call (``layer1.0.bn.training``; the GraphModule's own for the
    top level), so ``.train()``/``.eval()`` on the GraphModule act on it as on the model. Other
    constants that differ (BatchNorm's momentum, unused in eval mode) keep their train-mode
    value; train-only counters (:func:`is_counter`) add the flag instead of 1.
    """
    # size queries and arithmetic on sizes (export's sym_size, (h - 1) // 2 + 1) sit wherever a mode
    # first needs them: they are matched by what they compute, after the rest is aligned
    sizes_a, sizes_b = _size_nodes(train), _size_nodes(eval_)
    a = [n for n in train.nodes if n not in sizes_a]
    b = [n for n in eval_.nodes if n not in sizes_b]
    index: dict[fx.Node, fx.Node] = {}  # eval node -> train node
    extra: list[fx.Node] = []  # train-only nodes
    opcodes = difflib.SequenceMatcher(None, [_align_key(n) for n in a], [_align_key(n) for n in b],
                                      autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            index.update(zip(b[j1:j2], a[i1:i2]))
        elif tag == "delete":
            extra.extend(a[i1:i2])
        else:
            node = a[i1] if i1 < i2 else b[j1]
            return f"takes different paths in train and eval mode (at '{node.name}')", node
    computed = {_computes(n, {}): n for n in sizes_a}
    for query in sizes_b:  # graph order: the sizes it reads are matched before it
        twin = computed.get(_computes(query, index))
        if twin is None:
            return f"takes different paths in train and eval mode ('{query.name}' is computed in eval mode only)", query
        index[query] = twin
    counters = [n for n in extra if is_counter(n)]
    for n in extra:
        if n not in counters and not (n.op == "get_attr" and n.users and all(u in counters for u in n.users)):
            return f"takes different paths in train and eval mode ('{n.name}' runs in train mode only)", n
    edits = []
    for y, x in index.items():
        merged_args, diff_a = _merge(x.args, y.args, index)
        merged_kwargs, diff_k = _merge(x.kwargs, y.kwargs, index)
        if merged_args is None or merged_kwargs is None:
            return f"'{x.name}' differs between train and eval mode in a way asrfx cannot express", x
        if diff_a or diff_k:
            edits.append((x, merged_args, merged_kwargs))
    flags: dict[str, fx.Node] = {}

    def flag(node: fx.Node) -> fx.Node:
        path = module_path_of(node) or ""
        target = f"{path}.training" if path else "training"
        if target not in flags:
            first = next(n for n in train.nodes if n.op != "placeholder")
            with train.inserting_before(first):  # create_node: get_attr() warns about non-tensor attributes
                flags[target] = train.create_node("get_attr", target)
        return flags[target]

    for x, args, kwargs in edits:
        place = lambda v, f=flag(x): f if v is _FLAG else v  # noqa: E731
        x.args = map_aggregate(args, place)
        x.kwargs = map_aggregate(kwargs, place)
    for node in counters:
        step = node.args[1]
        with train.inserting_before(node):
            amount = flag(node) if step == 1 else train.call_function(operator.mul, (flag(node), step))
        node.update_arg(1, amount)
    return "", None


def _computes(node: fx.Node, index: dict[fx.Node, fx.Node]) -> tuple:
    """What a size node computes, as a hashable key, its inputs mapped through ``index``."""
    def key(v):
        if isinstance(v, fx.Node):
            return index.get(v, v)
        if isinstance(v, slice):  # x.shape[2:] (slices are not hashable before Python 3.12)
            return ("slice", key(v.start), key(v.stop), key(v.step))
        if isinstance(v, (list, tuple)):
            return tuple(key(i) for i in v)
        if isinstance(v, dict):
            return tuple((k, key(i)) for k, i in v.items())
        return v
    return node.target, key(node.args), key(dict(node.kwargs))


def dedupe_sizes(graph: fx.Graph) -> None:
    """What :func:`merge_training_graphs` does to a graph besides the flags: each size query (and
    arithmetic on sizes) computed once."""
    _size_nodes(graph)


def _size_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Size queries and the Python arithmetic on them (``operator.add(-1, sym_size)``), in graph order,
    each computed once: a repeat (export asks ``h * w`` again for a second view) is replaced by the first."""
    sizes: dict[tuple, fx.Node] = {}
    for n in list(graph.nodes):
        arithmetic = n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "math") \
            and n.all_input_nodes and all(i in sizes.values() for i in n.all_input_nodes)
        if is_shape_query(n, op_of(n, {})) or arithmetic:
            first = sizes.setdefault(_computes(n, {}), n)
            if first is not n:  # pure: the same value
                n.replace_all_uses_with(first)
                graph.erase_node(n)
    return list(sizes.values())


def _merge(ta, ea, index):
    """Merge train-mode and eval-mode args: (merged, differs). merged None: cannot merge.

    A bool True (train) / False (eval) becomes the flag; any other constant that differs
    takes its train-mode value (e.g. BatchNorm's momentum, unused in eval mode).
    """
    if isinstance(ta, fx.Node) or isinstance(ea, fx.Node):
        same = isinstance(ta, fx.Node) and isinstance(ea, fx.Node) and index.get(ea) is ta
        return (ta, False) if same else (None, True)
    if isinstance(ta, (tuple, list)) and isinstance(ea, (tuple, list)) and len(ta) == len(ea):
        items, differs = [], False
        for t, e in zip(ta, ea):
            m, d = _merge(t, e, index)
            if m is None and d:
                return None, True
            items.append(m)
            differs |= d
        return type(ta)(items), differs
    if isinstance(ta, dict) and isinstance(ea, dict) and ta.keys() == ea.keys():
        items, differs = {}, False
        for key in ta:
            m, d = _merge(ta[key], ea[key], index)
            if m is None and d:
                return None, True
            items[key] = m
            differs |= d
        return items, differs
    if ta is True and ea is False:
        return _FLAG, True
    if type(ta) is type(ea) and isinstance(ta, (int, float)) and ta != ea:
        return ta, True
    return (ta, False) if ta == ea else (None, True)
