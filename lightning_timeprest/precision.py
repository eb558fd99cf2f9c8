"""The precision/optimizer hook: every stage update of a pipeline goes through :class:`PipelinePrecision`.

The strategy wraps whatever precision plugin Lightning chose for the user (32-true, bf16-mixed, 16-mixed, 64-true,
...) in a :class:`PipelinePrecision`, as Lightning's FSDP strategy pairs with ``FSDPPrecision``. The wrapper keeps
the wrapped plugin's own behaviour (autocast, conversions, loss scaling) and adds what a pipeline changes:

* **Synchronous schedules** (gpipe, 1f1b): Lightning's closure still drives the step on every stage. The backward
  hands over the gradients the schedule already computed (:attr:`PipelineLink.install_gradients`); clipping by
  norm uses the norm over every stage's gradients; with a ``GradScaler`` the stages agree on whether any of them
  overflowed, so all skip the step together.
* **Asynchronous policies**: each stage updates its weights once per mini-batch, inside the pipeline, at its own
  time. :meth:`PipelinePrecision.stage_update` runs such an update as Lightning's closure would on one device:
  ``on_before_zero_grad``, ``on_before_backward`` (with the mini-batch loss), the backward, ``on_after_backward``
  (with the stage's gradients), unscaling, ``on_before_optimizer_step``, clipping (per stage: no stage sees the
  others' gradients of the same mini-batch), then the optimizer step on the weights the policy says. Loss scaling
  is per stage: the last stage scales the loss with its scale and sends that scale back with the gradients; each
  stage unscales by it and skips only its own update if its gradients overflowed; the last stage backs its scale off
  when it overflows or hears (through the activations' headers) that an earlier stage did.

Values logged from these hooks on a pipeline come from each stage's own update: they are logged on every rank
under ``name/stage{s}`` (see :func:`hook_logs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_timeprest import compat
from lightning_timeprest.metrics import LogCapture, LoggedValue

__all__ = ["GRADIENT_HOOKS", "PipelineLink", "PipelinePrecision", "autocasting", "hook_logs", "uses_gradient_hooks"]

#: the hooks Lightning calls around each optimizer update, which see the loss or the gradients
GRADIENT_HOOKS = ("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step")


@dataclass
class PipelineLink:
    """What the precision hook needs from the pipeline it serves (set by the strategy at setup)."""

    stage: int
    num_stages: int
    asynchronous: bool
    #: synchronous backward: put the gradients the schedule computed on ``.grad`` (summed, averaged)
    install_gradients: Callable[[], None]
    #: all-reduce a CPU tensor over the stages of this pipeline with ``op`` ("sum" or "max")
    all_reduce: Callable[[Tensor, str], None]
    #: ids of this stage's parameter copies whose gradient norm another stage counts (replicated parameters)
    counted_elsewhere: Callable[[], set[int]]
    #: average this stage's gradients over the data-parallel replicas of the pipeline (as DDP does in backward)
    average_over_replicas: Callable[[list[Tensor]], None]
    #: the user's gradient hooks are overridden: what they log is sent to the logging rank(s)
    share_hook_logs: bool = False


class PipelinePrecision(Precision):
    """Wraps the precision plugin the user chose; owns every stage update of a pipeline (see the module doc)."""

    def __init__(self, precision: Precision) -> None:
        super().__init__()
        self.wrapped = precision
        self.link: PipelineLink | None = None
        self._captured: list[tuple[str, Any, dict[str, Any]]] = []
        self._capturing = False

    # -- what the wrapped plugin decides ------------------------------------------------------------------------

    @property  # type: ignore[override]
    def precision(self) -> Any:
        return self.wrapped.precision

    @property
    def scaler(self) -> Any:
        """The wrapped plugin's ``GradScaler`` (16-mixed), or ``None``."""
        return getattr(self.wrapped, "scaler", None)

    def __getattr__(self, name: str) -> Any:
        # anything else a plugin carries (device, dtypes, ...) is the wrapped plugin's
        wrapped = self.__dict__.get("wrapped")
        if wrapped is None:
            raise AttributeError(name)
        return getattr(wrapped, name)

    @override
    def connect(self, model: Any, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> Any:
        return self.wrapped.connect(model, optimizers, lr_schedulers)

    @override
    def convert_module(self, module: Any) -> Any:
        return self.wrapped.convert_module(module)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return self.wrapped.tensor_init_context()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.wrapped.module_init_context()

    @override
    def forward_context(self) -> AbstractContextManager:
        return self.wrapped.forward_context()

    @override
    def train_step_context(self) -> Any:
        return self.wrapped.train_step_context()

    @override
    def val_step_context(self) -> Any:
        return self.wrapped.val_step_context()

    @override
    def test_step_context(self) -> Any:
        return self.wrapped.test_step_context()

    @override
    def predict_step_context(self) -> Any:
        return self.wrapped.predict_step_context()

    @override
    def convert_input(self, data: Any) -> Any:
        return self.wrapped.convert_input(data)

    @override
    def convert_output(self, data: Any) -> Any:
        return self.wrapped.convert_output(data)

    @override
    def main_params(self, optimizer: Optimizer) -> Any:
        return self.wrapped.main_params(optimizer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.wrapped.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapped.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.wrapped.on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.wrapped.on_load_checkpoint(checkpoint)

    def save_state(self, checkpoint: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """Keep this plugin's state in ``checkpoint`` under the name of the plugin the user chose (``state``
        instead, where given), so that one device, or plain DDP, resumes from it as its own."""
        saved = checkpoint.pop(type(self).__qualname__, None)
        saved = state if state is not None else saved
        if saved:
            checkpoint[type(self.wrapped).__qualname__] = saved

    def rename_loaded_state(self, checkpoint: dict[str, Any]) -> None:
        """The reverse of :meth:`save_state` on a loaded checkpoint: Lightning restores a plugin's state from the
        entry named after its class."""
        if type(self.wrapped).__qualname__ in checkpoint:
            checkpoint[type(self).__qualname__] = checkpoint.pop(type(self.wrapped).__qualname__)

    @override
    def teardown(self) -> None:
        self.link = None
        self.wrapped.teardown()

    # -- the synchronous step (Lightning's closure on every stage) ----------------------------------------------

    @override
    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        with self.capturing(module):
            return self.wrapped.pre_backward(tensor, module)

    @override
    def backward(self, tensor: Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if self.link is None:
            self.wrapped.backward(tensor, model, optimizer, *args, **kwargs)
        else:  # the schedule back-propagated inside training_step: hand its gradients over
            self.link.install_gradients()

    @override
    def post_backward(self, tensor: Tensor, module: Any) -> Tensor:
        with self.capturing(module):
            return self.wrapped.post_backward(tensor, module)

    @override
    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.link is None:
            return self.wrapped.optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        if scaler is None:  # as Precision.optimizer_step

            def wrapped_closure() -> Any:
                with self.capturing(model):  # (the closure's on_before_zero_grad too)
                    result = closure()
                    compat.after_closure(self.wrapped, model, optimizer)
                return result

            return optimizer.step(closure=wrapped_closure, **kwargs)
        # 16-mixed as Lightning's MixedPrecision does it, with the stages agreeing on overflow before the step
        with self.capturing(model):
            closure_result = closure()
            skip_unscaling = closure_result is None and model.automatic_optimization  # backward skipped
            if not skip_unscaling and not getattr(optimizer, "_step_supports_amp_scaling", False):
                scaler.unscale_(optimizer)
            compat.after_closure(self.wrapped, model, optimizer)
        if skip_unscaling:
            return closure_result
        self._agree_on_overflow(scaler, optimizer)
        step_output = scaler.step(optimizer, **kwargs)
        scaler.update()
        return step_output

    def _agree_on_overflow(self, scaler: Any, optimizer: Optimizer) -> None:
        """A step that overflowed on any stage is skipped on every stage (and the scales back off alike)."""
        assert self.link is not None
        if self.link.num_stages == 1:
            return
        found = compat.scaler_found_inf(scaler, optimizer)
        flag = torch.tensor([float(sum(float(v.item()) for v in found.values()))])
        self.link.all_reduce(flag, "max")
        if flag.item() > 0:
            for value in found.values():
                value.fill_(1.0)

    @override
    def clip_gradients(
        self, optimizer: Optimizer, clip_val: int | float = 0.0, gradient_clip_algorithm: Any = None
    ) -> None:
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm or "norm"))
        if clip_val <= 0:
            return
        if self.scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise RuntimeError(
                f"The current optimizer, {type(optimizer).__qualname__}, does not allow for gradient clipping because "
                "it performs unscaling of gradients internally. HINT: Are you using a 'fused' optimizer?"
            )
        if algorithm == "value":
            self.wrapped.clip_grad_by_value(optimizer, clip_val)
        else:
            self.clip_grad_by_norm(optimizer, clip_val)

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        """Synchronous schedules: ``clip_grad_norm_`` over the parameters of all stages (a replicated parameter
        counts once). Asynchronous policies: over this stage's own parameters (each stage updates alone)."""
        link = self.link
        if link is None or link.asynchronous or link.num_stages == 1:
            self.wrapped.clip_grad_by_norm(optimizer, clip_val)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        copies = link.counted_elsewhere()
        squares = torch.zeros(1, dtype=torch.float64)
        for p in params:
            if id(p) not in copies:
                squares += p.grad.detach().double().pow(2).sum().cpu()
        link.all_reduce(squares, "sum")
        coefficient = min(float(clip_val) / (float(squares.sqrt()) + 1e-6), 1.0)
        for p in params:
            p.grad.detach().mul_(coefficient)

    # -- one stage's update under an asynchronous policy ----------------------------------------------------------

    def loss_scale(self) -> float:
        """The scale the last stage multiplies the loss by now (1 without a ``GradScaler``)."""
        scaler = self.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def stage_update(
        self,
        module: Any,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        loss: Tensor,
        backward: Callable[[Tensor], None],
        *,
        scale: float,
        upstream_overflow: bool = False,
        stepping: Callable[[], AbstractContextManager] = nullcontext,
    ) -> bool:
        """One stage's update for one mini-batch, as Lightning's closure runs one on one device; return whether the
        step was skipped (16-mixed: this stage's gradients overflowed).

        ``loss`` is the mini-batch loss (on the last stage with its graph: ``backward`` back-propagates what
        ``pre_backward`` made of it, the scaled loss under 16-mixed; elsewhere a value, the gradients arrive from
        the next stage already scaled by ``scale``). ``upstream_overflow``: an earlier stage skipped an update since
        the last one here (the last stage then backs its scale off). ``stepping`` wraps the optimizer step.
        """
        trainer = module.trainer
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        with self.capturing(module):
            compat.call_hooks(trainer, "on_before_zero_grad", optimizer)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(torch.zeros((), device=loss.device))  # (creates the scaler's state on first use)
                if scale != scaler.get_scale():  # the scale this mini-batch's loss was scaled with
                    scaler.update(new_scale=float(scale))
            tensor = self.wrapped.pre_backward(loss, module)
            backward(tensor)
            assert self.link is not None
            self.link.average_over_replicas(list(params))
            self.wrapped.post_backward(tensor, module)
            if scaler is not None:
                scaler.unscale_(optimizer)
            compat.after_closure(self.wrapped, module, optimizer)
        skipped = False
        with stepping():
            if scaler is None:
                optimizer.step()
            else:
                found = compat.scaler_found_inf(scaler, optimizer)
                skipped = any(float(v.item()) > 0 for v in found.values())
                scaler.step(optimizer)
                if upstream_overflow:  # back off as if this stage had overflowed (its own step was taken)
                    for value in found.values():
                        value.fill_(1.0)
                scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return skipped

    @property
    def shares_hook_logs(self) -> bool:
        """Whether what the user's gradient hooks log is gathered from every stage (they override one)."""
        return self.link is not None and self.link.share_hook_logs

    # -- what the hooks log ------------------------------------------------------------------------------------------

    @contextmanager
    def capturing(self, module: Any) -> Iterator[None]:
        """Record the ``self.log`` calls the user's gradient hooks make on a pipeline (see :func:`hook_logs`)."""
        link = self.link
        if link is None or link.num_stages == 1 or self._capturing or module is None:
            yield
            return
        capture = LogCapture(module)
        self._capturing = True
        try:
            with capture.microbatch():
                yield
        finally:
            self._capturing = False
            self._captured += capture.calls[0]

    def take_hook_logs(self) -> list[LoggedValue]:
        """What the gradient hooks logged on this stage since the last call, to log on every rank."""
        calls, self._captured = self._captured, []
        assert self.link is not None or not calls
        return hook_logs(calls, self.link.stage if self.link is not None else 0)


def autocasting() -> bool:
    """Whether autocast is on (on the CPU or on CUDA), as mixed precision plugins turn it on around a step."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def hook_logs(calls: Sequence[tuple[str, Any, dict[str, Any]]], stage: int) -> list[LoggedValue]:
    """The ``self.log`` calls of stage ``stage``'s gradient hooks, renamed ``name/stage{s}``: each stage's update
    has its own gradients (and under the asynchronous policies its own time), so a value such as a total gradient
    norm is a per-stage value. Only plain values travel (a ``Metric`` logged from these hooks is refused)."""
    out = []
    for name, value, kwargs in calls:
        if not isinstance(value, (Tensor, int, float)):
            raise TypeError(
                f"self.log({name!r}, ...) in a gradient hook logs a {type(value).__name__}; on a pipeline these hooks "
                "run on every stage and only plain numbers or scalar tensors can be sent to the logging rank"
            )
        tensor = value.detach().float().cpu().reshape(()) if isinstance(value, Tensor) else torch.tensor(float(value))
        out.append(LoggedValue(f"{name}/stage{stage}", tensor, None, dict(kwargs)))
    return out


def uses_gradient_hooks(trainer: Any, module: Any) -> bool:
    """Whether the LightningModule or a callback overrides one of :data:`GRADIENT_HOOKS` (the same on every rank)."""

    def overrides(obj: Any, base_name: str) -> bool:
        base = next((c for c in type(obj).__mro__ if c.__name__ == base_name), None)
        return base is not None and any(
            getattr(type(obj), hook, None) is not getattr(base, hook, None) for hook in GRADIENT_HOOKS
        )

    callbacks = list(getattr(trainer, "callbacks", []))
    return overrides(module, "LightningModule") or any(overrides(cb, "Callback") for cb in callbacks)
