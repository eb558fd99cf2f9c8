"""Point-to-point communication between neighbouring pipeline stages, over torch.distributed.

Three process groups per pipeline keep independent traffic apart, so that messages of one kind can never be
matched against, or wait behind, messages of another kind between the same pair of ranks:

* activations (forward, stage s -> s+1),
* gradients (backward, stage s+1 -> s),
* control (small pickled objects: logged values, predictions, checkpoint shards; always gloo).

Sends are asynchronous (``isend``), so a stage never blocks on a peer that is busy; every receive is bounded
by ``timeout``, so a dead or stuck peer ends the waiting rank with an error instead of a hang. A peer that
crashes closes its sockets and gloo reports it at once.

Activations, batches and step results travel as messages of a stream (:class:`_Inbox`, :class:`_Outbox`): a
fixed-size header that lays out the parts that follow. The receiver posts the next message's receives as soon as
it has taken one, the parts laid out as the last message's were, because a gloo send transmits only once the
matching receive is posted: a receive posted after the header arrived waits until the sending process notices
it, which takes milliseconds while that process computes on its core.

gloo cannot send CUDA tensors between processes that share one GPU, so with gloo every tensor is staged
through CPU memory; with nccl tensors travel from the device directly.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_timeprest.compat import pytree
from lightning_timeprest.errors import PipelineCommError, peer_lost

__all__ = ["PipelineCommError", "PipelineGroups", "StageComm", "destroy_pipeline_groups", "new_pipeline_groups"]

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
)
_HEADER_LEN = 256
_TENSOR, _TUPLE, _LIST, _TREE = 0, 1, 2, 3
_PICKLED = -2  # isend_value: the value follows pickled whole


class _Slot:
    """Stands for the i-th tensor in a pickled boundary structure (the tensors travel as tensors)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Slot, (self.index,))


@dataclass
class PipelineGroups:
    """The process groups of the pipeline this rank belongs to."""

    ranks: tuple[int, ...]
    activations: Any
    gradients: Any
    control: Any


def new_pipeline_groups(
    pipelines: Sequence[Sequence[int]], rank: int, backend: str, timeout: timedelta
) -> PipelineGroups:
    """Create the groups of every pipeline (a collective: every rank calls it with the same ``pipelines``)."""
    mine: PipelineGroups | None = None
    for ranks in pipelines:
        groups = PipelineGroups(
            tuple(ranks),
            dist.new_group(list(ranks), backend=backend, timeout=timeout),
            dist.new_group(list(ranks), backend=backend, timeout=timeout),
            dist.new_group(list(ranks), backend="gloo", timeout=timeout),
        )
        if rank in ranks:
            mine = groups
    if mine is None:
        raise ValueError(f"rank {rank} belongs to none of the pipelines {pipelines}")
    return mine


def _flatten(value: Any) -> tuple[int, list[Tensor], bytes]:
    """Split a boundary value into its tensors and, unless it is a tensor or a tuple/list of tensors, the pickled
    structure around them (several tensors, ints, None, ... may cross a stage boundary)."""
    if isinstance(value, Tensor):
        return _TENSOR, [value], b""
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return (_TUPLE if isinstance(value, tuple) else _LIST), list(value), b""
    leaves, spec = pytree.tree_flatten(value)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    slots, i = [], 0
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            slots.append(_Slot(i))
            i += 1
        else:
            slots.append(leaf)
    try:
        structure = pickle.dumps(pytree.tree_unflatten(slots, spec))
    except Exception as err:
        raise PipelineCommError(
            f"a stage boundary carries a value that cannot be sent ({type(value).__name__}: {err}); move the split "
            "so that the boundary carries tensors and plain Python values"
        ) from err
    return _TREE, tensors, structure


def _wants_grad(t: Tensor, differentiable: bool | None) -> bool:
    """Whether a tensor sent as an activation gets a gradient back (``differentiable``: see ``send_activation``)."""
    return t.requires_grad if differentiable is None else differentiable and t.is_floating_point()


def _unflatten(kind: int, tensors: list[Tensor], structure: bytes = b"") -> Any:
    if kind == _TENSOR:
        return tensors[0]
    if kind == _TREE:
        leaves, spec = pytree.tree_flatten(pickle.loads(structure), is_leaf=lambda x: isinstance(x, _Slot))
        return pytree.tree_unflatten([tensors[x.index] if isinstance(x, _Slot) else x for x in leaves], spec)
    return tuple(tensors) if kind == _TUPLE else list(tensors)


_TAGS = {"values": 1, "objects": 2}  # the control group's streams
Layout = tuple[tuple[torch.dtype, tuple[int, ...]], ...]  # the dtype and shape of each part of a message


def _pickled(obj: Any) -> tuple[Tensor, list[Tensor]]:
    """A message of one pickled object: its header and its one part."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[0], header[2] = _PICKLED, data.numel()
    return header, [data]


def _layout(values: list[int], fields: int) -> Layout:
    """The parts a message's header lays out: ``[kind, count, nbytes]``, then per tensor its dtype, for activations
    whether it wants a gradient (``fields`` 3, else 2), its ndim and shape; a pickled object is one part of bytes."""
    kind, count, nbytes, pos = values[0], values[1], values[2], 3
    if kind == _PICKLED:
        return ((torch.uint8, (nbytes,)),)
    layout: list[tuple[torch.dtype, tuple[int, ...]]] = [(torch.uint8, (nbytes,))] if nbytes else []
    for _ in range(count):
        ndim = values[pos + fields - 1]
        layout.append((_DTYPES[values[pos]], tuple(values[pos + fields : pos + fields + ndim])))
        pos += fields + ndim
    return tuple(layout)


class PostedRecv:
    """A receive posted ahead of the moment its data is needed, so that the transfer overlaps the stage's compute.

    :meth:`ready` asks, without blocking, whether it has arrived: a helper thread then waits on it (gloo's
    ``is_completed()`` never turns true before ``wait()``, and a ``wait`` that times out breaks the connection);
    :meth:`result` waits for it.
    """

    def __init__(self, work: Any, buffer: Tensor, comm: StageComm) -> None:
        self.buffer = buffer
        self._comm = comm
        self._work = work
        self._error: BaseException | None = None
        self._done: threading.Event | None = None  # set by the helper thread, once one watches

    def _watch(self) -> None:
        try:
            self._work.wait(timeout=self._comm.timeout)
        except BaseException as err:  # reported to the stage by result()
            self._error = err
        finally:
            assert self._done is not None
            self._done.set()
            self._comm.arrived.set()

    def ready(self) -> bool:
        if self._done is None:
            self._done = threading.Event()
            threading.Thread(target=self._watch, daemon=True).start()
        return self._done.is_set()

    def result(self, stage: int, what: str) -> Tensor:
        start = time.perf_counter()
        try:
            if self._done is None:
                self._work.wait(timeout=self._comm.timeout)
            else:
                self._done.wait()
        except RuntimeError as err:
            self._error = err
        finally:
            self._comm.wait_seconds += time.perf_counter() - start
        if self._error is not None:
            raise PipelineCommError(
                f"stage {self._comm.stage} (rank {dist.get_rank()}) waited for {what} from stage {stage} and got no "
                f"answer: {self._error}"
            ) from self._error
        return self.buffer


class _Outbox:
    """The sending end of a stream of messages to one peer (see :class:`_Inbox`)."""

    def __init__(self, comm: StageComm, group: Any, stage: int, tag: int, device: torch.device) -> None:
        self.comm, self.group, self.stage, self.tag, self.device = comm, group, stage, tag, device
        self.sent: Layout | None = None  # the parts of the last message: what the peer has posted receives for

    def send(self, header: Tensor, parts: Sequence[Tensor]) -> None:
        layout = tuple((t.dtype, tuple(t.shape)) for t in parts)
        fill = [torch.zeros(shape, dtype=dtype) for dtype, shape in self.sent or ()] if layout != self.sent else []
        for t in [header, *fill, *parts]:  # (the zeros fill the receives the peer posted for the old layout)
            self.comm._isend(t, self.stage, self.group, self.tag, self.device)
        self.sent = layout


class _Inbox:
    """The receiving end of a stream of messages from one peer: each a header of ``_HEADER_LEN`` int64, then the
    parts it lays out (``layout_of``). Once a message is taken the next one's receives are posted at once: its header
    and, laid out as the message just taken, its parts. A sender whose layout changed first fills those with zeros
    (:class:`_Outbox`); they are dropped here and the parts posted again as the header says."""

    def __init__(self, comm: StageComm, group: Any, stage: int, tag: int, device: torch.device, what: str) -> None:
        self.comm, self.group, self.stage, self.tag, self.device, self.what = comm, group, stage, tag, device, what
        self.expected: Layout | None = None
        self.header: PostedRecv | None = None
        self.parts: list[PostedRecv] = []

    def _post(self, layout: Layout) -> list[PostedRecv]:
        rank = self.comm._rank_of(self.stage)
        posted = []
        for dtype, shape in layout:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            posted.append(PostedRecv(dist.irecv(buf, rank, group=self.group, tag=self.tag), buf, self.comm))
        return posted

    def post(self) -> PostedRecv:
        """The next message's header receive (posted now, with its expected parts, unless it is already)."""
        if self.header is None:
            buf = torch.empty(_HEADER_LEN, dtype=torch.int64)
            work = dist.irecv(buf, self.comm._rank_of(self.stage), group=self.group, tag=self.tag)
            self.header = PostedRecv(work, buf, self.comm)
            self.parts = self._post(self.expected) if self.expected is not None else []
        return self.header

    def take(self, layout_of: Callable[[list[int]], Layout]) -> tuple[list[int], list[Tensor]]:
        """Wait for the next message; return its header values and its parts."""
        values = self.post().result(self.stage, self.what).tolist()
        layout, expected, posted = layout_of(values), self.expected, self.parts
        self.header, self.parts = None, []
        parts = [p.result(self.stage, self.what) for p in posted]
        if layout != expected:
            parts = [p.result(self.stage, self.what) for p in self._post(layout)]
        self.expected = layout
        self.post()
        return values, parts


@dataclass
class StageComm:
    """Activation and gradient transfers of one stage with its neighbours."""

    stage: int
    groups: PipelineGroups
    device: torch.device
    timeout: timedelta
    backend: str
    _pending: list[tuple[Any, list[Tensor]]] = field(default_factory=list)
    #: seconds spent blocked in receives and in waiting for sends (communication wait)
    wait_seconds: float = 0.0
    #: set by every watched :class:`PostedRecv` when its data arrives: a stage with nothing to run sleeps on it
    arrived: threading.Event = field(default_factory=threading.Event)
    #: the ``note`` of the last activation received
    note: int = 0
    #: the message streams, by (kind, peer stage): their receives posted ahead (every message from the previous
    #: stage on the activation group is one of the activation stream, whichever runtime receives it next)
    _inboxes: dict[tuple[str, int], _Inbox] = field(default_factory=dict)
    _outboxes: dict[tuple[str, int], _Outbox] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.groups.ranks)

    def _rank_of(self, stage: int) -> int:
        return self.groups.ranks[stage]

    @property
    def _wire_device(self) -> torch.device:
        return torch.device("cpu") if self.backend == "gloo" else self.device

    def _streams(self, kind: str) -> tuple[Any, int, torch.device]:
        # the control group carries two kinds: batches and pickled objects, told apart by the tag
        if kind == "activations":
            return self.groups.activations, 0, self._wire_device
        return self.groups.control, _TAGS[kind], torch.device("cpu")

    def _inbox(self, kind: str, stage: int) -> _Inbox:
        inbox = self._inboxes.get((kind, stage))
        if inbox is None:
            group, tag, device = self._streams(kind)
            what = {"activations": "an activation", "values": "the batch"}.get(kind, "step results")
            inbox = self._inboxes[kind, stage] = _Inbox(self, group, stage, tag, device, what)
        return inbox

    def _outbox(self, kind: str, stage: int) -> _Outbox:
        outbox = self._outboxes.get((kind, stage))
        if outbox is None:
            group, tag, device = self._streams(kind)
            outbox = self._outboxes[kind, stage] = _Outbox(self, group, stage, tag, device)
        return outbox

    def _isend(self, tensor: Tensor, stage: int, group: Any, tag: int = 0, device: torch.device | None = None) -> None:
        tensor = tensor.detach().to(device or self._wire_device).contiguous()
        work = dist.isend(tensor, self._rank_of(stage), group=group, tag=tag)
        self._pending.append((work, [tensor]))
        if len(self._pending) > 64:  # asynchronous schedules never flush: forget sends that completed
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def _recv(self, tensor: Tensor, stage: int, group: Any, what: str) -> Tensor:
        return self._wait(dist.irecv(tensor, self._rank_of(stage), group=group), tensor, stage, what)

    def _wait(self, work: Any, tensor: Tensor, stage: int, what: str) -> Tensor:
        start = time.perf_counter()
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as err:
            raise PipelineCommError(
                f"stage {self.stage} (rank {dist.get_rank()}) waited for {what} from stage {stage} "
                f"(rank {self._rank_of(stage)}) and got no answer: {err}"
            ) from err
        finally:
            self.wait_seconds += time.perf_counter() - start
        return tensor

    def send_activation(self, value: Any, tag: int = 0, differentiable: bool | None = None, note: int = 0) -> None:
        """Send a stage output (tensor or tuple/list of tensors) to the next stage, with an integer ``tag`` and an
        integer ``note`` (read by the receiver as :attr:`note`: the count of updates skipped upstream).

        ``differentiable=True`` marks float tensors as needing a gradient back even if they were computed without
        a graph (a forward that will be recomputed at backward time).
        """
        kind, tensors, structure = _flatten(value)
        header = [kind, len(tensors), len(structure)]
        for t in tensors:
            header += [_DTYPES.index(t.dtype), int(_wants_grad(t, differentiable)), t.dim(), *t.shape]
        if len(header) > _HEADER_LEN - 2:
            raise PipelineCommError(f"stage output is too complex to send ({len(tensors)} tensors)")
        buf = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        buf[: len(header)] = torch.tensor(header, dtype=torch.int64)
        buf[-2] = note
        buf[-1] = tag
        parts = [torch.frombuffer(bytearray(structure), dtype=torch.uint8)] if structure else []
        self._outbox("activations", self.stage + 1).send(buf, parts + tensors)

    def recv_activation(self, requires_grad: bool) -> Any:
        """Receive the previous stage's output; float tensors sent with ``requires_grad`` get it here too."""
        return self.recv_tagged_activation(requires_grad)[0]

    def post_activation_header(self) -> PostedRecv:
        """Start receiving the next activation (once: a header already posted is returned)."""
        return self._inbox("activations", self.stage - 1).post()

    def recv_tagged_activation(self, requires_grad: bool) -> tuple[Any, int]:
        """Like :meth:`recv_activation`, and the sender's tag. The next activation's receives are posted before
        returning, so that it travels while this stage computes."""
        values, parts = self._inbox("activations", self.stage - 1).take(lambda v: _layout(v, 3))
        count, nbytes, pos = values[1], values[2], 3
        grads = []
        for _ in range(count):
            grads.append(bool(values[pos + 1]))
            pos += 3 + values[pos + 2]
        self.note = values[-2]
        structure = parts[0].cpu().numpy().tobytes() if nbytes else b""
        tensors = []
        for t, grad in zip(parts[len(parts) - count :], grads, strict=True):
            t = t.to(self.device)
            if grad and requires_grad:
                t.requires_grad_(True)
            tensors.append(t)
        return _unflatten(values[0], tensors, structure), values[-1]

    def send_meta(self, values: Sequence[float]) -> None:
        """Send the previous stage a mini-batch's values that travel with its gradients (loss scale, loss)."""
        self._isend(torch.tensor(values, dtype=torch.float64), self.stage - 1, self.groups.gradients)

    def post_meta(self, count: int) -> PostedRecv:
        """Post the receive of the next stage's :meth:`send_meta` (``count`` values) in gradient-stream order."""
        buf = torch.empty(count, dtype=torch.float64)
        work = dist.irecv(buf, self._rank_of(self.stage + 1), group=self.groups.gradients)
        return PostedRecv(work, buf, self)

    def recv_meta(self, count: int, posted: PostedRecv | None = None) -> list[float]:
        """The values :meth:`send_meta` sent (``posted``: from :meth:`post_meta`, else received now)."""
        if posted is None:
            posted = self.post_meta(count)
        return posted.result(self.stage + 1, "a gradient's loss scale").tolist()

    def send_gradients(self, inputs: Any) -> None:
        """Send to the previous stage the gradients of the inputs that arrived with ``requires_grad``."""
        for t in _flatten(inputs)[1]:
            if t.requires_grad:
                self._isend(
                    t.grad if t.grad is not None else torch.zeros_like(t),
                    self.stage - 1,
                    self.groups.gradients,
                )

    def post_gradients(self, outputs: Any, differentiable: bool | None = None) -> list[tuple[int, PostedRecv]]:
        """Post the receives of the gradients the next stage will send for ``outputs`` (sent with
        :meth:`send_activation` and the same ``differentiable``), long before they are needed; returns them with
        the positions of their tensors in ``outputs``. Valid only while gradients come back in the order their
        activations went out, with no other receive on the gradient group (the asynchronous schedules, static or
        dynamic: backwards run in mini-batch order)."""
        posted = []
        for i, t in enumerate(_flatten(outputs)[1]):
            if _wants_grad(t, differentiable):
                buf = torch.empty(t.shape, dtype=t.dtype, device=self._wire_device)
                work = dist.irecv(buf, self._rank_of(self.stage + 1), group=self.groups.gradients)
                posted.append((i, PostedRecv(work, buf, self)))
        return posted

    def recv_gradients(
        self, outputs: Any, posted: list[tuple[int, PostedRecv]] | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Receive the next stage's gradients for ``outputs``; return ``(output, grad)`` pairs to back-propagate.

        ``posted``: the receives :meth:`post_gradients` posted for them when they were sent (``outputs`` may then
        be a recomputation of those: a gradient for an output that no longer requires one is dropped).
        """
        pairs = []
        if posted is not None:
            tensors = _flatten(outputs)[1]
            for i, receive in posted:
                grad = receive.result(self.stage + 1, "a gradient")
                if tensors[i].requires_grad:
                    pairs.append((tensors[i], grad.to(self.device)))
            return pairs
        for t in _flatten(outputs)[1]:
            if t.requires_grad:
                buf = torch.empty(t.shape, dtype=t.dtype, device=self._wire_device)
                grad = self._recv(buf, self.stage + 1, self.groups.gradients, "a gradient")
                pairs.append((t, grad.to(self.device)))
        return pairs

    def wait_sends(self) -> None:
        """Block until every posted send has completed (its buffer can then be freed)."""
        pending, self._pending = self._pending, []
        start = time.perf_counter()
        for work, _ in pending:
            try:
                work.wait(timeout=self.timeout)
            except RuntimeError as err:
                raise PipelineCommError(f"stage {self.stage}: a send to a neighbour did not complete: {err}") from err
        self.wait_seconds += time.perf_counter() - start

    def isend_object(self, obj: Any, dst_stage: int) -> None:
        """Send a picklable object without waiting for the receiver (control group; pair with recv_object_from)."""
        with self._control(f"sending to stage {dst_stage}"):
            self._outbox("objects", dst_stage).send(*_pickled(obj))

    def isend_value(self, value: Any, dst_stage: int) -> None:
        """Send a pytree of CPU tensors and plain values (a batch) over the control group without waiting: the
        tensors travel as tensors, only the structure around them is pickled (unpickling a tensor costs far more
        than receiving it). Pair with :meth:`recv_value`."""
        kind, tensors, structure = _flatten(value)
        header = [kind, len(tensors), len(structure)]
        for t in tensors:
            header += [_DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1, t.dim(), *t.shape]
        with self._control(f"sending to stage {dst_stage}"):
            if len(header) > _HEADER_LEN or -1 in header[3:]:  # too many tensors or an unusual dtype: pickled whole
                self._outbox("values", dst_stage).send(*_pickled(value))
                return
            buf = torch.zeros(_HEADER_LEN, dtype=torch.int64)
            buf[: len(header)] = torch.tensor(header, dtype=torch.int64)
            parts = [torch.frombuffer(bytearray(structure), dtype=torch.uint8)] if structure else []
            self._outbox("values", dst_stage).send(buf, parts + tensors)

    def recv_value(self, src_stage: int) -> Any:
        """Receive what :meth:`isend_value` sent, waiting at most ``timeout``."""
        values, parts = self._inbox("values", src_stage).take(lambda v: _layout(v, 2))
        kind, count, nbytes = values[0], values[1], values[2]
        if kind == _PICKLED:
            return pickle.loads(parts[0].numpy().tobytes())
        structure = parts[0].numpy().tobytes() if nbytes else b""
        return _unflatten(kind, parts[len(parts) - count :], structure)

    def object_arriving(self, src_stage: int) -> bool:
        """Whether the next object from ``src_stage`` has begun to arrive (its header is in), without blocking; its
        arrival sets :attr:`arrived`."""
        return self._inbox("objects", src_stage).post().ready()

    def recv_object_from(self, src_stage: int) -> Any:
        """Receive an object sent with :meth:`isend_object`, waiting at most ``timeout``."""
        _, parts = self._inbox("objects", src_stage).take(lambda v: _layout(v, 2))
        return pickle.loads(parts[0].numpy().tobytes())

    # -- control plane: small Python objects and replicated tensors over the gloo control group -------------

    def _control(self, what: str) -> AbstractContextManager[None]:
        return peer_lost(f"stage {self.stage} (rank {dist.get_rank()})", what)

    def broadcast_object(self, obj: Any, src_stage: int) -> Any:
        box = [obj if self.stage == src_stage else None]
        with self._control(f"exchanging step results from stage {src_stage}"):
            dist.broadcast_object_list(box, src=self._rank_of(src_stage), group=self.groups.control)
        return box[0]

    def gather_objects(self, obj: Any, dst_stage: int = 0) -> list[Any] | None:
        out: list[Any] | None = [None] * self.num_stages if self.stage == dst_stage else None
        with self._control(f"gathering stage states on stage {dst_stage}"):
            dist.gather_object(obj, out, dst=self._rank_of(dst_stage), group=self.groups.control)
        return out

    def all_gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.num_stages
        with self._control("gathering stage states on every stage"):
            dist.all_gather_object(out, obj, group=self.groups.control)
        return out

    def broadcast_tensor(self, tensor: Tensor, src_stage: int) -> None:
        """Broadcast a CPU tensor in place from ``src_stage`` to every stage."""
        with self._control(f"copying replicated tensors from stage {src_stage}"):
            dist.broadcast(tensor, self._rank_of(src_stage), group=self.groups.control)

    def all_reduce_sum(self, tensor: Tensor) -> None:
        """Sum a CPU tensor in place over all stages."""
        with self._control("summing gradients of replicated parameters"):
            dist.all_reduce(tensor, group=self.groups.control)


def destroy_pipeline_groups(groups: PipelineGroups) -> None:
    """Release the process groups of :func:`new_pipeline_groups` (each rank, for its own pipeline)."""
    for group in (groups.activations, groups.gradients, groups.control):
        dist.destroy_process_group(group)
