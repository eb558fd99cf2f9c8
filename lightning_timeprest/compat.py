"""Every use of a private API of Lightning, torchmetrics or PyTorch, in one place.

Checked against lightning 2.6.6, torchmetrics 1.9.0 and torch 2.13.0 (the versions CI installs). A new release of
one of them may move or rename any of these; this module is where to look first when an upgrade breaks the
strategy, and the only module that names them, with one exception: the strategy class, a ``DDPStrategy``
subclass, overrides ``_get_process_group_backend`` and the ``parallel_devices`` and ``precision_plugin``
properties, and so reads the base class's own ``_parallel_devices``, ``_precision_plugin``,
``_process_group_backend`` and ``_timeout``, as Lightning's own strategies do.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.fabric.utilities.init import _EmptyInit
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.pipelining._IR import MultiUseParameterConfig, Pipe, annotate_split_points
from torch.nn.modules import transformer as _transformer
from torch.utils import _pytree as pytree

__all__ = [
    "ASSERT_TENSOR_METADATA",
    "EmptyInit",
    "MultiUseParameterConfig",
    "Pipe",
    "after_closure",
    "annotate_split_points",
    "apply_to_tensors",
    "assert_async",
    "average_model",
    "buffer_table",
    "call_eagerly",
    "call_hooks",
    "causal_mask_check",
    "combined_training_batches",
    "compiled",
    "compute_locally",
    "data_source",
    "disable_distributed_sampler",
    "keep_random_state",
    "lightning_callbacks",
    "metric_bookkeeping",
    "non_persistent_buffers",
    "optimizers_to_device",
    "parameter_table",
    "pipe_from_traced",
    "pytree",
    "rebuild_average_model",
    "restore_sigterm_handling",
    "scaler_found_inf",
    "set_causal_mask_check",
    "set_metric_bookkeeping",
    "skip_closure_backward",
    "submodule_table",
    "take_over_sigterm_handling",
    "unwrap_compiled",
    "update_properties",
    "view_base",
]

# -- lightning (fabric and pytorch) ---------------------------------------------------------------------------

#: ``_EmptyInit``: allocate parameters without running their initialisers (materialising a held stage).
EmptyInit = _EmptyInit
#: ``_update_properties``: set ``device``/``dtype`` on a module tree as ``model.to()`` would.
update_properties = _update_properties
#: ``_optimizers_to_device``: move optimizer states with the stage's parameters.
optimizers_to_device = _optimizers_to_device


def data_source(trainer: Any, loop_name: str) -> Any:
    """The ``_DataConnector`` source of a loop (``fit_loop``, ``validate_loop``, ...): the user's dataloader hook."""
    return getattr(getattr(trainer, loop_name, None), "_data_source", None)


@contextmanager
def keep_random_state() -> Iterator[None]:
    """Undo any re-seeding inside the block: the random states of torch (CPU), numpy and Python are as before.

    ``DDPStrategy.setup_distributed`` calls ``reset_seed()``, which puts every rank back to the state
    ``seed_everything`` left, before the model was built. One device keeps the state after the model was built,
    and that state draws the shuffled order of the data, so without this a pipeline trained on other batches than
    one device with the same seed. CUDA's generators are left alone: reading them would start CUDA on every
    device, and building the model on the CPU does not move them.
    """
    states = _collect_rng_states(include_cuda=False)
    try:
        yield
    finally:
        _set_rng_states(states)


def disable_distributed_sampler(trainer: Any) -> None:
    """Keep the user's own sampler: one pipeline reads one data stream (``Trainer(use_distributed_sampler=)`` is
    read before the strategy can say so)."""
    trainer._accelerator_connector.use_distributed_sampler = False


def take_over_sigterm_handling(
    trainer: Any, check: Callable[[], None], notify: Callable[[Any, Any], None]
) -> tuple[Any, Any]:
    """Replace the training epoch loop's per-step SIGTERM broadcast with ``check`` and the signal connector's
    notifier (which broadcasts from inside the handler) with ``notify``; return what to give to
    :func:`restore_sigterm_handling` (``None`` for what Lightning does not have)."""
    loop, signals = trainer.fit_loop.epoch_loop, getattr(trainer, "_signal_connector", None)
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        return None, None
    loop._broadcast_sigterm_tensor = check  # the loop instance's own attribute, over the class's method
    if signals is not None and hasattr(signals, "_sigterm_notifier_fn"):
        signals._sigterm_notifier_fn = notify
    else:
        signals = None
    return loop, signals


def restore_sigterm_handling(loop: Any, signals: Any) -> None:
    """Give Lightning its own SIGTERM check and notifier back."""
    if loop is not None:
        loop.__dict__.pop("_broadcast_sigterm_tensor", None)
    if signals is not None:
        signals.__dict__.pop("_sigterm_notifier_fn", None)


def _trainer_call_module(trainer: Any) -> Any:
    """``lightning.pytorch.trainer.call`` (or ``pytorch_lightning``'s): the helpers that call hooks the way the
    trainer does (profiled, with the module's ``_current_fx_name`` set, which ``self.log`` checks)."""
    for cls in type(trainer).__mro__:
        if cls.__name__ == "Trainer" and cls.__module__.endswith(".trainer.trainer"):
            return importlib.import_module(cls.__module__.rsplit(".", 1)[0] + ".call")
    raise TypeError(f"not a Lightning Trainer: {type(trainer).__name__}")


def call_hooks(trainer: Any, name: str, *args: Any) -> None:
    """Call hook ``name`` on the callbacks, then on the LightningModule, as Lightning's loops do
    (``call._call_callback_hooks`` and ``call._call_lightning_module_hook``)."""
    call = _trainer_call_module(trainer)
    call._call_callback_hooks(trainer, name, *args)
    call._call_lightning_module_hook(trainer, name, *args)


def after_closure(precision: Any, model: Any, optimizer: Any) -> None:
    """What a precision plugin does after the closure: ``on_before_optimizer_step`` on the callbacks and the
    module, then gradient clipping through ``configure_gradient_clipping`` (``Precision._after_closure``)."""
    precision._after_closure(model, optimizer)


def lightning_callbacks(trainer: Any) -> Any:
    """``lightning.pytorch.callbacks`` (or ``pytorch_lightning``'s), the package of ``trainer``'s own callbacks."""
    return importlib.import_module(_trainer_call_module(trainer).__name__.rsplit(".", 2)[0] + ".callbacks")


def average_model(callback: Any) -> Any:
    """A ``WeightAveraging`` callback's ``AveragedModel`` (``None`` before ``fit`` starts)."""
    return callback._average_model


def rebuild_average_model(callback: Any, copy: torch.nn.Module, device: torch.device) -> None:
    """Give a ``WeightAveraging`` callback a fresh ``AveragedModel`` around ``copy`` (already a copy of the module),
    made with the callback's own arguments as its ``setup`` makes one (``_device``, ``_use_buffers``, ``_kwargs``);
    ``device``: where the module is, used unless the callback names one."""
    from torch.optim.swa_utils import AveragedModel

    averaged = AveragedModel(torch.nn.Module(), use_buffers=callback._use_buffers, **callback._kwargs)
    averaged.module = copy.to(callback._device or device)
    callback._average_model = averaged


def skip_closure_backward(trainer: Any, skip: bool) -> None:
    """Make Lightning's automatic-optimization closure run ``training_step`` only, without its ``zero_grad`` and
    ``backward`` (``fit_loop._skip_backward``, which Lightning's own StochasticWeightAveraging sets too)."""
    trainer.fit_loop._skip_backward = skip


# -- torchmetrics -------------------------------------------------------------------------------------------------


def metric_bookkeeping(metric: Any) -> tuple[int, Any, Any]:
    """A ``Metric``'s update count, the value of its last ``forward`` (what Lightning logs on step) and its cached
    ``compute()`` result: what its public ``metric_state`` leaves out."""
    return metric._update_count, metric._forward_cache, metric._computed


def set_metric_bookkeeping(metric: Any, update_count: int, forward_cache: Any, computed: Any = None) -> None:
    metric._update_count, metric._forward_cache, metric._computed = update_count, forward_cache, computed


def compute_locally(metric: Any) -> Any:
    """``metric.compute()`` over this process's state alone, without the sync over its process group that
    ``compute()`` does by default (``_to_sync``), as the value of a step's ``forward`` is."""
    before = metric._to_sync
    metric._to_sync = False
    try:
        return metric.compute()
    finally:
        metric._to_sync = before


# -- torch ----------------------------------------------------------------------------------------------------------

#: The dtype/device assertion ``torch.export`` records for ``.to()`` calls.
ASSERT_TENSOR_METADATA = torch.ops.aten._assert_tensor_metadata.default


def apply_to_tensors(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``module._apply(fn)``: move or convert every parameter and buffer in place, as ``.to()`` does, with a
    function that may leave some as they are (a stage's released tensors stay on the meta device)."""
    module._apply(fn)


def parameter_table(module: torch.nn.Module) -> dict[str, Any]:
    """``module._parameters``: the module's own parameters by name, to replace or remove one in place (placing a
    stage releases other stages' tensors; ``register_parameter`` refuses to overwrite or to take meta twins)."""
    return module._parameters


def buffer_table(module: torch.nn.Module) -> dict[str, Any]:
    """``module._buffers``, as :func:`parameter_table`."""
    return module._buffers


def submodule_table(module: torch.nn.Module) -> dict[str, Any]:
    """``module._modules``: the module's children by name, including ones ``named_children`` hides (duplicates)."""
    return module._modules


def non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    """``module._non_persistent_buffers_set``: its buffers that ``state_dict`` leaves out."""
    return module._non_persistent_buffers_set


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was made from (``tensor._base``), or the tensor itself when it is not a view."""
    return tensor._base if tensor._base is not None else tensor


def assert_async(condition: torch.Tensor, message: str) -> None:
    """``torch._assert_async``: an assertion that stays in a traced graph (checked when the graph runs)."""
    torch._assert_async(condition, message)


def pipe_from_traced(module: torch.nn.Module, program: Any) -> Any:
    """``Pipe._from_traced``: torch.distributed.pipelining's split of an exported program at its annotated split
    points, with parameters used by several stages replicated."""
    return Pipe._from_traced(module, program, MultiUseParameterConfig.REPLICATE)


def has_grad_hooks(t: torch.Tensor) -> bool:
    """Whether hooks were registered on tensor ``t`` (``register_hook``, ``register_post_accumulate_grad_hook``)
    that autograd calls with its gradient."""
    return bool(t._backward_hooks) or has_post_accumulate_hooks(t)


def has_post_accumulate_hooks(t: torch.Tensor) -> bool:
    """Whether ``t.register_post_accumulate_grad_hook`` registered a hook (absent before torch 2.2)."""
    return bool(getattr(t, "_post_accumulate_grad_hooks", None))


def grad_hooks(t: torch.Tensor) -> list[Callable[[torch.Tensor], torch.Tensor | None]]:
    """The hooks ``t.register_hook`` registered, in the order autograd calls them."""
    return list(t._backward_hooks.values()) if t._backward_hooks else []


def scaler_found_inf(scaler: Any, optimizer: Any) -> dict[Any, torch.Tensor]:
    """A ``GradScaler``'s found-inf flags for ``optimizer`` after ``unscale_`` (one tensor per device)."""
    return scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device", {})


def causal_mask_check() -> tuple[Callable[..., bool], Callable[..., torch.Tensor]]:
    """``torch.nn.Transformer``'s "is this mask causal?" check and its causal-mask builder."""
    return _transformer._detect_is_causal_mask, _transformer._generate_square_subsequent_mask


def set_causal_mask_check(check: Callable[..., bool]) -> None:
    """Replace the check ``nn.TransformerEncoder``/``nn.TransformerDecoder`` call (a module global)."""
    _transformer._detect_is_causal_mask = check


def _call_original(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self._orig_mod(*args, **kwargs)


def compiled(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs compiled code: a ``torch.compile(m)`` wrapper (``OptimizedModule``) or a
    module compiled in place (``m.compile()``)."""
    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def call_eagerly(module: torch.nn.Module) -> Callable[[], None]:
    """Make calls of the compiled ``module`` run its code uncompiled; return what puts its compiled call back.

    A wrapper's ``forward`` (an instance attribute) calls the wrapped module directly instead of through dynamo,
    and so reaches whatever is installed as ``_orig_mod`` (a stage); an in-place compiled module forgets its
    compiled call."""
    if isinstance(module, OptimizedModule):
        forward = module.__dict__["forward"]
        module.forward = types.MethodType(_call_original, module)

        def restore() -> None:
            module.forward = forward

        return restore
    impl = module._compiled_call_impl
    module._compiled_call_impl = None

    def restore_impl() -> None:
        module._compiled_call_impl = impl

    return restore_impl


def unwrap_compiled(name: str, module: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The module a ``torch.compile(m)`` wrapper holds and its dotted name (``name._orig_mod``); others as given."""
    while isinstance(module, OptimizedModule):
        name, module = (f"{name}._orig_mod" if name else "_orig_mod"), module._orig_mod
    return name, module


def combined_training_batches(trainer: Any) -> bool:
    """Whether a training batch holds several loaders' batches at once: a ``CombinedLoader`` over a dict or list
    of loaders in any mode but ``sequential`` (which yields one loader's batches at a time)."""
    loader = trainer.fit_loop._combined_loader
    return loader is not None and loader._mode != "sequential" and isinstance(loader.iterables, (dict, list, tuple))
