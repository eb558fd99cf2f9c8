"""Executing one stage's part of a schedule.

The user's LightningModule keeps its own ``training_step``: the pipelined ``nn.Sequential`` inside it is
replaced by a :class:`StageModule` holding only this stage's layers. What a call of it does depends on the
stage:

* first stage: runs its layers on the real input (after the user's own stem code), keeps the output for the
  next stage, and ends the user's step there with :class:`StageBoundary` (nothing after the pipelined module
  can run before the later stages did);
* last stage: ignores the input it is given and returns its layers applied to the activation received from the
  previous stage, so the user's loss code runs on the real pipeline output;
* middle stages never run user code: they receive, apply their layers and send.

The layers draw from the stage's own random stream, and the step's code after the pipelined call from another
one (:mod:`~lightning_timeprest.streams`), so the step's code before it draws alike on the first and the last
stage.

:class:`PipelineRuntime` walks the stage's op list of a :class:`~lightning_timeprest.schedules.Schedule`
for one mini-batch, doing the forward and backward ops and their transfers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_timeprest.comm import StageComm
from lightning_timeprest.costs import OpClock
from lightning_timeprest.schedules import OpKind, Schedule
from lightning_timeprest.streams import StageStreams
from lightning_timeprest.weight_gradients import WeightGradients

__all__ = ["PipelineRuntime", "StageBoundary", "StageModule", "StageRunner", "StepResult", "through_stage"]


class StageBoundary(BaseException):
    """Ends the user's step on a stage that is not the last, right after the stage's layers ran.

    A ``BaseException`` so that an ``except Exception`` in user code does not swallow it.
    """


class StageRunner(nn.Module):
    """What runs one stage's part of the pipelined module; the user's call of that module is handed to it.

    Subclasses say how the user's call becomes the first stage's input (:meth:`entry`) and how the stage maps
    its input to its output (:meth:`run_layers`).
    """

    module_name: str

    def __init__(self) -> None:
        super().__init__()
        self._handler: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None
        self.streams: StageStreams | None = None  # set when placed (streams.py)

    def drawing(self) -> AbstractContextManager[None]:
        """Around the stage's layers: they draw from the stage's own random stream (streams.py)."""
        return self.streams.layers.drawing() if self.streams is not None else nullcontext()

    def entry(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def run_layers(self, x: Any) -> Any:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._handler is None:
            raise RuntimeError(
                f"the pipelined module {self.module_name or 'forward'!r} holds only one stage's layers and runs only "
                "inside the pipeline's training/validation/test/predict steps; call the model through the Trainer"
            )
        return self._handler(args, kwargs)

    @contextmanager
    def handled_by(self, handler: Callable[[tuple[Any, ...], dict[str, Any]], Any]) -> Iterator[None]:
        self._handler = handler
        try:
            yield
        finally:
            self._handler = None


class StageModule(StageRunner):
    """Stands in for the pipelined ``nn.Sequential`` on one rank.

    Holds this stage's layers under their original child names, so parameter names (``layers.3.weight``) and
    state-dict keys stay those of the original model. Indexed, sliced, iterated or measured with ``len`` it is the
    original ``nn.Sequential`` (``names``: all its children), with an empty module for each layer another stage
    holds: code such as ``{"params": self.layers[-1].parameters(), "lr": ...}`` in ``configure_optimizers`` gets
    what the stage holds of that layer, as the parameters of the original model it sees are this stage's.
    """

    def __init__(self, module_name: str, layers: Sequence[tuple[str, nn.Module]], names: Sequence[str]) -> None:
        super().__init__()
        for name, layer in layers:
            self.add_module(name, layer)
        self.module_name = module_name
        self._names = list(names)

    def _layer(self, name: str) -> nn.Module:
        held = self._modules.get(name)
        return held if held is not None else _Elsewhere(f"{self.module_name}.{name}")

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._layer(n) for n in self._names)

    def __getitem__(self, index: int | slice) -> nn.Module:
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict((n, self._layer(n)) for n in self._names[index]))
        return self._layer(self._names[index])

    def entry(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 1 or kwargs:
            raise RuntimeError(
                f"the pipelined nn.Sequential {self.module_name!r} takes one input, got {len(args)} positional and "
                f"{len(kwargs)} keyword arguments"
            )
        return args[0]

    def run_layers(self, x: Any) -> Any:
        for layer in self.children():
            x = layer(x)
        return x


class _Elsewhere(nn.Module):
    """A layer of the pipelined ``nn.Sequential`` that another stage holds, as this stage sees it: nothing."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} runs on another stage of the pipeline; call the model through the Trainer")

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            name = self.__dict__.get("name", "this layer")
            raise AttributeError(f"{name} is held by another stage of the pipeline: no {attr!r} of it here") from None


def through_stage(
    module: StageRunner, is_first: bool, is_last: bool, inputs: Any, call_user: Callable[[], Any] | None
) -> tuple[Any, Any]:
    """Run one micro-batch through this stage; return (the user's step output, the stage's output).

    Stage 0 and the last stage run the user's step (``call_user``) with the pipelined module handled here: stage
    0 feeds it the step's own input and stops the step at the boundary; the last stage feeds it ``inputs`` (the
    activation received) and lets the step finish. Middle stages apply their layers to ``inputs``.
    """
    if call_user is None:
        with module.drawing():
            return None, module.run_layers(inputs)
    produced: list[Any] = []
    after_call = module.streams.after_call if module.streams is not None and is_last else None

    def handler(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if produced:
            raise RuntimeError(
                f"the pipelined module {module.module_name or 'forward'!r} was called twice in one step; a pipelined "
                "module can be called once per step (it carries one batch through the stages). Call it once on the "
                "inputs concatenated along the batch and split its output, e.g. a contrastive step's two views: "
                "z1, z2 = self(torch.cat([x1, x2])).chunk(2) (a BatchNorm inside then normalises over both views)"
            )
        with module.drawing():
            out = module.run_layers(module.entry(args, kwargs) if is_first else inputs)
        produced.append(out)
        if not is_last:
            raise StageBoundary
        if after_call is not None:  # the rest of the step runs here only: it must not move the global stream
            after_call.enter()
        return out

    user_output = None
    with module.handled_by(handler):
        try:
            user_output = call_user()
        except StageBoundary:
            pass
        finally:
            if after_call is not None:
                after_call.leave()
    if not produced:
        raise RuntimeError(
            f"the step did not call the pipelined module {module.module_name or 'forward'!r}; the step must run the "
            "model (e.g. self(x) whose forward calls it) so that the pipeline can carry the batch. A step that skips "
            "a batch (returns early, e.g. None) cannot on a pipeline, where the other stages wait for the batch: "
            "leave such batches out in the data (the dataset, a collate_fn or a sampler). If the model your steps run "
            "is another module (the one chosen may be, say, a larger frozen teacher called in training only), name "
            "it: TiMePReStStrategy(module_name=...)"
        )
    return user_output, produced[0]


@dataclass
class _InFlight:
    inputs: Any = None  # activation received from the previous stage
    outputs: Any = None  # this stage's output, sent to the next stage
    loss: Tensor | None = None  # last stage: the user's micro-batch loss


@dataclass
class StepResult:
    """What one mini-batch produced on this stage: the user's step outputs (last stage only)."""

    outputs: list[Any] = field(default_factory=list)


class PipelineRuntime:
    """Runs this stage's ops of a schedule, micro-batch by micro-batch."""

    def __init__(self, stage: int, num_stages: int, stage_module: StageRunner, comm: StageComm) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.module = stage_module
        self.comm = comm
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        #: how long this stage's training ops took (compute only), for the ideal they are compared with
        self.clock = OpClock()
        #: the Linear layers whose weight gradients the backward ops take once per mini-batch, when installed
        #: (gpipe: every micro-batch's activations are held until the backwards anyway)
        self.weight_grads = WeightGradients()

    @property
    def runs_user_code(self) -> bool:
        return self.is_first or self.is_last

    def run(
        self,
        schedule: Schedule,
        call_user: Callable[[int], Any],
        *,
        train: bool,
        loss_of: Callable[[Any], Tensor] | None = None,
        loss_weights: Sequence[float] = (),
    ) -> StepResult:
        """Run one mini-batch.

        ``call_user(j)`` runs the user's step on micro-batch ``j`` and returns its output. With ``train`` the
        backward ops run too: the last stage back-propagates ``loss_of(output_j) * loss_weights[j]``, so the
        accumulated gradients equal those of the whole mini-batch. Without ``train`` only the forward ops run.
        """
        result = StepResult()
        inflight: dict[int, _InFlight] = {}
        backwards: list[float] = []  # the backward ops' times, recorded with a share of the deferred products each
        try:
            for op in schedule.ops(self.stage):
                assert op.microbatch is not None, "synchronous schedules back-propagate per micro-batch"
                start, waited = time.perf_counter(), self.comm.wait_seconds
                if op.kind is OpKind.FORWARD:
                    record, output = self._forward(op.microbatch, call_user, train)
                    if self.is_last:
                        result.outputs.append(output)
                        if train:
                            assert loss_of is not None
                            record.loss = loss_of(output)
                    if train:
                        inflight[op.microbatch] = record
                        self.clock.add("forward", time.perf_counter() - start - (self.comm.wait_seconds - waited))
                elif train:
                    with self.weight_grads.deferring():
                        self._backward(inflight.pop(op.microbatch), loss_weights[op.microbatch])
                    backwards.append(time.perf_counter() - start - (self.comm.wait_seconds - waited))
            if backwards:
                start = time.perf_counter()
                self.weight_grads.flush()
                flush_s = (time.perf_counter() - start) / len(backwards)  # a share of the deferred products each
                for seconds in backwards:
                    self.clock.add("backward", seconds + flush_s)
            self.comm.wait_sends()
        finally:
            inflight.clear()
            self.weight_grads.discard()
        return result

    def _forward(self, j: int, call_user: Callable[[int], Any], train: bool) -> tuple[_InFlight, Any]:
        record = _InFlight()
        if not self.is_first:
            record.inputs = self.comm.recv_activation(requires_grad=train and torch.is_grad_enabled())
        user_output, out = through_stage(
            self.module,
            self.is_first,
            self.is_last,
            record.inputs,
            (lambda: call_user(j)) if self.runs_user_code else None,
        )
        if not self.is_last:
            self.comm.send_activation(out)
            record.outputs = out
        return record, user_output

    def _backward(self, record: _InFlight, weight: float) -> None:
        if self.is_last:
            assert record.loss is not None
            if not record.loss.requires_grad:
                raise RuntimeError(
                    "the loss returned by training_step does not require grad; it cannot be back-propagated"
                )
            torch.autograd.backward(record.loss * weight)
        else:
            pairs = self.comm.recv_gradients(record.outputs)
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if not self.is_first:
            self.comm.send_gradients(record.inputs)
