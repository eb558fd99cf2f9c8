"""Cutting a module that is not an ``nn.Sequential`` into stages, with torch's own tracer and splitter.

The module is traced with ``torch.export`` (the batch dimension of every tensor input marked dynamic, so that any
micro-batch size runs) and split by ``torch.distributed.pipelining`` at :class:`~torch.distributed.pipelining.
SplitPoint` markers placed at the beginning of *blocks*: submodules whose calls follow one another in the
forward. The result, a ``Pipe``, has one graph module per block and a top-level graph that says which values
flow from block to block: several tensors, and non-tensor values such as a batch size, may cross a boundary, and
a value may skip blocks (a residual or a mask computed early and used late).

A stage runs a contiguous range of blocks (:class:`TracedStage`). What it receives and sends is the *live set* at
its boundaries: every value computed before the boundary that a later block, or the output, still needs.

Two details keep the user's model semantics:

* leaf ``torch.nn`` layers (``Conv2d``, ``BatchNorm2d``, ``Dropout``, ...) run as the user's own module objects
  instead of their exported graphs, so ``train()``/``eval()`` switch batch-norm and dropout as usual (export
  records the mode it traced in);
* every parameter and buffer a stage reads is read through the user's own modules
  (:meth:`TracedStage.rebind`), so optimizers, ``state_dict`` and ``functional_call`` see one set of tensors.
"""

from __future__ import annotations

import inspect
import io
import logging
import operator
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_timeprest import compat
from lightning_timeprest.compat import pytree
from lightning_timeprest.partition import PartitionError
from lightning_timeprest.runtime import StageRunner

__all__ = ["CallRecord", "TracedModel", "TracedStage", "call_tree", "candidate_boundaries", "trace", "walk_calls"]

_MODE_DEPENDENT_OPS = ("dropout", "batch_norm", "native_dropout", "feature_dropout", "alpha_dropout", "instance_norm")


@dataclass
class CallRecord:
    """One call of a submodule during a sample forward: its name, how often it was called, its nested calls."""

    name: str
    calls: int = 0
    children: list[CallRecord] = field(default_factory=list)


def call_tree(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallRecord:
    """Run ``module`` once and record which submodules its forward calls, nested by call, in call order.

    The nesting is that of the calls, not of the attribute hierarchy: the blocks of a ``ModuleList`` that the
    forward iterates are children of the module whose forward calls them.
    """
    root = CallRecord("")
    records: dict[str, CallRecord] = {}
    stack = [root]
    handles = []

    def pre(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            record = records.get(name)
            if record is None:
                record = records[name] = CallRecord(name)
                stack[-1].children.append(record)
            record.calls += 1
            stack.append(record)

        return hook

    def post(_module: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_pre_hook(pre(name)))
            handles.append(sub.register_forward_hook(post))
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return root


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def candidate_boundaries(module: nn.Module, tree: CallRecord, target: int) -> list[str]:
    """The blocks to split the forward into: the names of the submodules that begin them, in call order (about
    ``target`` of them); every name but the first is a cut.

    Starts from the calls the forward makes directly and refines the largest (by parameters) into the calls it
    makes, until there are ``target`` candidates or nothing is left to refine. A module called more than once
    per forward cannot be a cut (the cut would happen at each call); it stays inside the block before it.
    """
    frontier = list(tree.children)
    size = {r.name: _numel(module.get_submodule(r.name)) for r in walk_calls(tree) if r.name}
    while len(frontier) < target:
        refinable = [i for i, r in enumerate(frontier) if r.children and r.calls == 1]
        if not refinable:
            break
        i = max(refinable, key=lambda k: size[frontier[k].name])
        frontier[i : i + 1] = frontier[i].children
    if not frontier:
        raise PartitionError("the forward calls no submodule, so there is nothing to split into stages")
    return [frontier[0].name] + [r.name for r in frontier[1:] if r.calls == 1]


def walk_calls(record: CallRecord) -> Iterator[CallRecord]:
    """``record`` and every call under it, in call order."""
    yield record
    for child in record.children:
        yield from walk_calls(child)


@contextmanager
def _split_markers(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """``torch.distributed.pipelining``'s split annotation, undone afterwards (it patches ``forward``)."""
    from torch.distributed.pipelining import SplitPoint

    subs = [module.get_submodule(n) for n in names]
    saved = [sub.__dict__.get("forward") for sub in subs]
    compat.annotate_split_points(module, dict.fromkeys(names, SplitPoint.BEGINNING))
    try:
        yield
    finally:
        for sub, forward in zip(subs, saved, strict=True):
            sub.__dict__.pop("_orig_forward", None)
            if forward is None:
                sub.__dict__.pop("forward", None)
            else:
                sub.forward = forward


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def _dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Dim 0 of every tensor input whose first dimension is the batch size is dynamic; all else is static."""
    dim = torch.export.Dim("batch")
    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments

    def spec(value: Any) -> Any:
        if isinstance(value, Tensor):
            return {0: dim} if value.dim() > 0 and value.shape[0] == batch else None
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    return {name: spec(value) for name, value in bound.items()}


def _explain(err: BaseException, what: str) -> PartitionError:
    """torch.export's reason in a few lines: its first line and the user code it points at."""
    lines = str(err).splitlines()
    head = next((line.strip() for line in lines if line.strip()), "")
    where = []
    for i, line in enumerate(lines):
        if line.strip().startswith('File "') and "site-packages" not in line and "/torch/" not in line:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            where.append(f"{line.strip()}: {code}" if code and not code.startswith("File") else line.strip())
    detail = f"{type(err).__name__}: {head}" + "".join(f"\n    at {w}" for w in where[-3:])
    if any("specialized it to be a constant" in line for line in lines):
        detail += (
            "\n    the forward works for one batch size only (a view or reshape with a literal size, or a branch on "
            "the batch size)"
        )
    return PartitionError(
        f"cannot trace {what} into a graph to split into stages (torch.export failed):\n    {detail}\n"
        "Ways out: name a submodule whose forward can be traced with TiMePReStStrategy(module_name=...) (the code "
        "around it stays in your step and runs on the first and last stages); or remove the construct torch.export "
        "reports (Python control flow on tensor values or on the batch size, a shape fixed to one batch size such "
        "as x.view(64, -1): use x.flatten(1)); or put the layers in an nn.Sequential, which needs no tracing"
    )


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export logs the graph of a forward it cannot capture; the error this module raises says it briefly."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "torch"]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with redirect_stderr(io.StringIO()):  # (the graph dump of a failed trace is printed, not logged)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def trace(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], boundaries: Sequence[str], what: str
) -> TracedModel:
    """Trace ``module`` on a sample call and split it at the beginning of each submodule in ``boundaries``."""
    injected = _training_defaults(module, kwargs, what)
    kwargs = {**kwargs, **injected}
    batch = _batch_size(args, kwargs)
    if batch is None or batch < 2:
        raise PartitionError(
            f"tracing {what} needs a sample batch of at least 2 samples (the batch dimension is traced as dynamic), "
            f"got {batch}; use a larger batch size"
        )
    try:
        dynamic = _dynamic_shapes(module, args, kwargs, batch)
    except TypeError as err:
        raise PartitionError(f"the sample call does not match the signature of {what}.forward: {err}") from None
    with _split_markers(module, boundaries), warnings.catch_warnings(), _quiet_torch():
        warnings.simplefilter("ignore")
        try:
            try:
                program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
            except Exception as err:
                if "GuardOnDataDependentSymNode" not in f"{type(err).__name__}{err}":
                    raise
                with _causal_masks_resolved(module, args, kwargs):  # nn.Transformer's mask check, then retry
                    program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
        except Exception as err:
            raise _explain(err, what) from err
        try:
            pipe = compat.pipe_from_traced(module, program)
        except Exception as err:
            raise PartitionError(
                f"torch.distributed.pipelining could not split {what} at {list(boundaries)}: {err}"
            ) from err
    split_gm = pipe.split_gm
    blocks = [
        getattr(split_gm, f"submod_pp_{k}", None) or getattr(split_gm, f"submod_{k}") for k in range(pipe.num_stages)
    ]
    if len(blocks) != len(boundaries) + 1:
        raise PartitionError(
            f"splitting {what} at {list(boundaries)} gave {len(blocks)} blocks instead of {len(boundaries) + 1}: a "
            "split point whose module is not called in the forward, or two split points with nothing between them"
        )
    for block in blocks:
        _drop_metadata_asserts(block)
    in_spec = program.call_spec.in_spec
    out_spec = program.call_spec.out_spec
    # what must stay as traced: the non-batch shape of each tensor input, the value of each plain input
    sample_shapes = [
        (("batch", *leaf.shape[1:]) if leaf.dim() > 0 and leaf.shape[0] == batch else tuple(leaf.shape))
        if isinstance(leaf, Tensor)
        else _Constant(leaf)
        for leaf in pytree.tree_leaves((args, kwargs))
    ]
    traced = TracedModel(module, split_gm.graph, blocks, in_spec, out_spec, sample_shapes, what)
    traced.injected, traced.keywords = injected, dict.fromkeys(kwargs)
    return traced


@contextmanager
def _causal_masks_resolved(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
    """Decide ``torch.nn.Transformer``'s "is this mask causal?" check at trace time.

    The check (``bool((mask == causal).all())``) reads tensor values, which a trace cannot branch on. One run on the
    sample records each call's answer; during the trace each call returns the recorded answer and adds a runtime
    assertion to the graph that the mask still gives that answer, so a different mask later fails loudly instead of
    running the wrong attention.
    """
    original, causal_mask = compat.causal_mask_check()
    answers: list[bool] = []

    def record(mask: Tensor | None, is_causal: bool | None = None, size: int | None = None) -> bool:
        answers.append(original(mask, is_causal, size))
        return answers[-1]

    compat.set_causal_mask_check(record)
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        compat.set_causal_mask_check(original)
    replay = iter(answers)

    def resolved(mask: Tensor | None, is_causal: bool | None = None, size: int | None = None) -> bool:
        answer = next(replay, None)
        if is_causal is not None or mask is None or answer is None:
            return original(mask, is_causal, size)
        causal = causal_mask(size if size is not None else mask.size(-2), device=mask.device, dtype=mask.dtype)
        if mask.size() == causal.size():
            compat.assert_async(
                (mask == causal).all() == answer,
                f"an attention mask was traced as {'' if answer else 'not '}causal and is now the opposite; pass "
                "is_causal= (tgt_is_causal=) explicitly, or the same kind of mask in every step",
            )
        return answer

    compat.set_causal_mask_check(resolved)
    try:
        yield
    finally:
        compat.set_causal_mask_check(original)


def _drop_metadata_asserts(block: nn.Module) -> None:
    """Remove the dtype/device assertions export records for ``.to()`` calls: the precision plugin may convert the
    whole module after the trace (``64-true``, ``bf16-true``), which is legitimate and would trip them."""
    for sub in block.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, fx.Graph):
            continue
        found = [n for n in graph.nodes if n.op == "call_function" and n.target is compat.ASSERT_TENSOR_METADATA]
        for node in found:
            graph.erase_node(node)
        if found and isinstance(sub, fx.GraphModule):
            sub.recompile()
        elif found and getattr(sub, "graph_module", None) is not None:  # export's InterpreterModule
            sub.finalize()


def _training_defaults(module: nn.Module, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """Keyword arguments the trace adds to every call: ``use_cache=False`` for a forward that takes ``use_cache``
    (Hugging Face models), which would otherwise return a key/value cache object no pipeline stage can send and
    training never reads."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    if "use_cache" not in parameters:
        return {}
    if kwargs.get("use_cache"):
        raise PartitionError(
            f"{what} is called with use_cache=True: a pipeline stage cannot pass on a key/value cache, and training "
            "does not read it; leave use_cache out (the pipeline passes use_cache=False) or pass use_cache=False"
        )
    return {} if "use_cache" in kwargs else {"use_cache": False}


_aten = torch.ops.aten
_TRAIN_ARGUMENT = {  # dropout ops that take (input, p, train): the trace records train=True
    _aten.dropout.default,
    _aten.native_dropout.default,
    _aten.feature_dropout.default,
    _aten.alpha_dropout.default,
    _aten.feature_alpha_dropout.default,
}
_SDPA = _aten.scaled_dot_product_attention.default


class _ModeFollowing:
    """A recorded dropout op that drops only while ``owner`` is in training mode."""

    def __init__(self, op: Any, owner: nn.Module) -> None:
        self.op, self.owner = op, owner
        self.__name__ = f"{op.__name__.split('.')[0]}_following_mode"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.owner.training:
            return self.op(*args, **kwargs)
        if self.op is _SDPA:  # (query, key, value, attn_mask, dropout_p, ...)
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            elif "dropout_p" in kwargs:
                kwargs = {**kwargs, "dropout_p": 0.0}
        elif len(args) > 2:
            args = (*args[:2], False, *args[3:])
        else:
            kwargs = {**kwargs, "train": False}
        return self.op(*args, **kwargs)


@dataclass(frozen=True)
class _Constant:
    value: Any


class TracedModel:
    """A traced module split into blocks, and the dataflow of values between them."""

    def __init__(
        self,
        module: nn.Module,
        graph: fx.Graph,
        blocks: list[nn.Module],
        in_spec: Any,
        out_spec: Any,
        sample_shapes: list[tuple[Any, ...] | _Constant],
        what: str,
    ) -> None:
        self.module = module
        self.blocks = blocks
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.sample_shapes = sample_shapes
        self.what = what
        self.injected: dict[str, Any] = {}
        self.keywords: dict[str, None] = {}
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.placeholders = [n.name for n in self.nodes if n.op == "placeholder"]
        self.output = next(n for n in graph.nodes if n.op == "output")
        self.block_of: dict[str, int] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                self.block_of[node.name] = -1
            elif node.op == "call_module":
                self.block_of[node.name] = int(str(node.target).rsplit("_", 1)[1])
            elif node.op == "call_function" and node.target is operator.getitem:
                self.block_of[node.name] = self.block_of[node.args[0].name]
            else:
                raise PartitionError(f"unexpected node {node.format_node()} in the split graph of {what}")
        last_use: dict[str, int] = {}
        for node in self.nodes:
            for user in node.users:
                b = len(blocks) if user.op == "output" else self.block_of[user.name]
                last_use[node.name] = max(last_use.get(node.name, -1), b)
        self.last_use = last_use

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def live(self, boundary: int) -> list[str]:
        """The values that cross the boundary before block ``boundary``: made before it, needed at or after it."""
        if boundary == 0:
            return list(self.placeholders)
        return [n.name for n in self.nodes if self.block_of[n.name] < boundary <= self.last_use.get(n.name, -1)]

    def block_parameters(self, k: int) -> int:
        return sum(p.numel() for p in self.blocks[k].parameters())

    def stage(self, first: int, stop: int) -> TracedStage:
        """The part of the model that runs blocks ``first`` to ``stop - 1``."""
        return TracedStage(self, first, stop)


class TracedStage(StageRunner):
    """Runs a contiguous range of blocks of a :class:`TracedModel`: receives the live values at its first boundary,
    returns those at its last one (or, for the last blocks, the model's output in its original structure).

    Not registered in the user's model: it reads the very parameter and buffer objects of the user's modules.
    """

    def __init__(self, model: TracedModel, first: int, stop: int) -> None:
        super().__init__()
        self.module_name = ""
        self.first, self.stop = first, stop
        self.is_end = stop == model.num_blocks
        self.blocks = nn.ModuleDict({f"b{k}": model.blocks[k] for k in range(first, stop)})
        self._model = model
        self._inputs = model.live(first)
        self._outputs = [] if self.is_end else model.live(stop)
        self._nodes = [n for n in model.nodes if first <= model.block_of[n.name] < stop]
        self._use_original_leaves()
        self._follow_training_mode()

    def original_name(self, path: str) -> str:
        """The name in the traced module of a parameter or buffer path of this stage (``b3.layer1.0.conv1.weight``
        -> ``layer1.0.conv1.weight``)."""
        return path.split(".", 2)[2]

    def _use_original_leaves(self) -> None:
        root = self._model.module
        for block in self.blocks.values():
            for path, sub in list(block.named_modules()):
                if not path:
                    continue
                try:  # (export names the second call of a module "name@1")
                    original = root.get_submodule(re.sub(r"@\d+", "", path))
                except AttributeError:
                    continue
                if original is sub or next(original.children(), None) is not None:
                    continue
                if not type(original).__module__.startswith("torch.nn.modules"):
                    continue
                parent_path, _, attr = path.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                compat.submodule_table(parent)[attr] = original

    def _follow_training_mode(self) -> None:
        """Make the dropout the trace recorded (functional dropout, attention dropout inside
        ``scaled_dot_product_attention``) follow ``train()``/``eval()`` of the module whose code called it."""
        root = self._model.module
        for block in self.blocks.values():
            for path, sub in block.named_modules():
                graph = getattr(sub, "graph", None)
                if not isinstance(graph, fx.Graph):
                    continue
                try:
                    owner = root.get_submodule(re.sub(r"@\d+", "", path)) if path else root
                except AttributeError:
                    owner = root
                changed = False
                for node in graph.nodes:
                    if node.op == "call_function" and (node.target in _TRAIN_ARGUMENT or node.target is _SDPA):
                        node.target = _ModeFollowing(node.target, owner)
                        changed = True
                if changed and isinstance(sub, fx.GraphModule):
                    sub.recompile()
                elif changed and getattr(sub, "graph_module", None) is not None:
                    sub.finalize()

    def mode_dependent_ops(self) -> list[str]:
        """Calls recorded with the training mode of the trace (functional dropout or batch-norm in user code)."""
        found = []
        for block in self.blocks.values():
            for path, sub in block.named_modules():
                graph = getattr(sub, "graph", None)
                if not isinstance(graph, fx.Graph):
                    continue
                for node in graph.nodes:
                    name = getattr(node.target, "__name__", str(node.target))
                    if node.op == "call_function" and name.split(".")[0] in _MODE_DEPENDENT_OPS:
                        found.append(f"{path or self._model.what}: {name}")
        return found

    def rebind(self) -> list[str]:
        """Make this stage read the user's own tensors; return the names (in the traced module) of those it reads.

        Each exported module that holds tensors shares the tensor tables of the user's module at the same path,
        so anything that replaces a tensor there (``to()``, ``load_state_dict``, ``functional_call``) is seen here.
        """
        root = self._model.module
        names = []
        for block in self.blocks.values():
            if "_reads" not in block.__dict__:  # before any table is shared: what the block itself holds
                block.__dict__["_reads"] = [
                    f"{path}.{k}" if path else k
                    for path, sub in block.named_modules()
                    for table in (compat.parameter_table(sub), compat.buffer_table(sub))
                    for k, v in table.items()
                    if v is not None
                ]
            names += block.__dict__["_reads"]
            for path, sub in block.named_modules():
                try:
                    original = root.get_submodule(path) if path else root
                except AttributeError:
                    continue
                if sub is original:
                    continue
                for kind in ("_parameters", "_buffers"):
                    table, theirs = getattr(sub, kind), getattr(original, kind)
                    if theirs is not table and all(theirs.get(k) is v for k, v in table.items()):
                        object.__setattr__(sub, kind, theirs)
        return names

    def entry(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The first stage's input: the user's call, flattened as the trace saw it."""
        kwargs = {**kwargs, **{k: v for k, v in self._model.injected.items() if k not in kwargs}}
        if kwargs.keys() == self._model.keywords.keys():  # the same keywords, perhaps in another order
            kwargs = {k: kwargs[k] for k in self._model.keywords}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._model.in_spec:
            raise RuntimeError(
                f"{self._model.what} was traced for calls shaped {self._model.in_spec} but is now called with "
                f"{spec}; call it the same way in every step"
            )
        for i, (leaf, shape) in enumerate(zip(leaves, self._model.sample_shapes, strict=True)):
            if isinstance(shape, _Constant):
                if isinstance(leaf, Tensor) or leaf != shape.value:
                    raise RuntimeError(
                        f"input {i} of {self._model.what} was traced as {shape.value!r} and is now {leaf!r}; the trace "
                        "fixes plain Python arguments, so pass the same value in every step (or pass a tensor)"
                    )
            elif not isinstance(leaf, Tensor) or (
                tuple(leaf.shape[1:]) != shape[1:] if shape[:1] == ("batch",) else tuple(leaf.shape) != shape
            ):
                raise RuntimeError(
                    f"input {i} of {self._model.what} is {getattr(leaf, 'shape', type(leaf).__name__)}, but it was "
                    f"traced with shape {shape}; only the batch dimension may change between steps (pad or crop to "
                    "the traced size)"
                )
        return tuple(leaves)

    def run_layers(self, values: Any) -> Any:
        env = dict(zip(self._inputs, values, strict=True))
        for node in self._nodes:
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            if node.op == "call_module":
                env[node.name] = self.blocks[f"b{self._model.block_of[node.name]}"](*args)
            else:
                env[node.name] = operator.getitem(*args)
        if not self.is_end:
            return tuple(env[name] for name in self._outputs)
        flat = fx.node.map_arg(self._model.output.args[0], lambda n: env[n.name])
        return pytree.tree_unflatten(list(flat), self._model.out_spec)
