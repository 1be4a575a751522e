"""Objects named on the command line: ``module.path:name`` or ``file.py:name`` (the one rule
every subcommand uses)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["load_object", "load_callable", "load_model", "load_dataset", "load_loader"]


def load_object(spec: str) -> Any:
    """The object named by ``module.path:name`` or ``file.py:name``.

    Raises:
        ValueError: ``spec`` has no ``:name`` part, or the name is missing.
    """
    if ":" not in spec:
        raise ValueError(f"{spec!r} must be module.path:name or file.py:name")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{where} is not a file")
        mod_name = f"_lightning_influence_cli_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where} has no {name!r}")
        obj = getattr(obj, part)
    return obj



def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """:func:`load_object` of ``spec``, which must be callable (``what`` names the option in errors).

    Raises:
        ValueError: ``spec`` is malformed, names nothing, or names something not callable.
    """
    try:
        fn = load_object(spec)
    except ValueError as e:
        raise ValueError(f"--{what}: {e}") from None
    if not callable(fn):
        raise ValueError(f"--{what} {spec!r} is not callable")
    return fn


def add_model_arguments(parser: Any, made_from: str) -> None:
    """The model options every command that loads a model takes: ``--model``, ``--model-kwargs``,
    ``--checkpoint`` and ``--allow-other-weights`` (``made_from`` says where the checked weights
    fingerprint comes from, e.g. ``"the factors were made with"``)."""
    parser.add_argument("--model", required=True, help="module.path:name or file.py:name of the model (class, factory or instance)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON",
                        help="keyword arguments for a --model class, as a JSON object (default: a LightningModule's "
                             "checkpoint hyper-parameters)")
    parser.add_argument("--checkpoint", default=None, help="the trained weights (Lightning checkpoint or state dict)")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help=f"use the model although its weights are not the ones {made_from}")


def load_model(spec: str, checkpoint: Optional[str] = None, model_kwargs: Optional[str] = None) -> Any:
    """The model ``--model SPEC`` names, with ``--checkpoint``'s weights, in eval mode.

    ``SPEC`` names an ``nn.Module`` instance, a class or a factory. A class is built with
    ``--model-kwargs`` (a JSON object) when given; otherwise a LightningModule class with a
    Lightning checkpoint is built with ``load_from_checkpoint`` (the hyper-parameters the run
    saved), and anything else is called without arguments. The checkpoint is a Lightning
    checkpoint (its ``state_dict``) or a plain state dict.

    Raises:
        ValueError: a malformed spec or ``--model-kwargs``, a class that needs arguments, or a
            checkpoint that does not fit the model (the message names the differing tensors and
            what to pass).
    """
    import json

    import torch
    from torch import nn

    kwargs: dict[str, Any] = {}
    if model_kwargs:
        try:
            kwargs = json.loads(model_kwargs)
        except ValueError as e:
            raise ValueError(f"--model-kwargs {model_kwargs!r} is not JSON ({e}); e.g. --model-kwargs '{{\"hidden\": 64}}'") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object of keyword arguments, got {model_kwargs!r}")
    obj = load_object(spec)
    state = None
    if checkpoint:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"--checkpoint {checkpoint}: cannot be read ({e})") from None
    hparams = state.get("hyper_parameters") if isinstance(state, dict) else None
    if isinstance(obj, nn.Module):
        model, made = obj, f"the instance {spec}"
    else:
        if not callable(obj):
            raise ValueError(f"--model {spec} is a {type(obj).__name__}, not a module, class or factory")
        if not kwargs and isinstance(obj, type) and isinstance(hparams, dict) and hasattr(obj, "load_from_checkpoint"):
            kwargs = dict(hparams)  # the arguments the run built it with (save_hyperparameters)
            made = f"{spec}(**the checkpoint's hyper_parameters {json.dumps(kwargs, default=str)})"
        else:
            made = f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        try:
            model = obj(**kwargs)
        except TypeError as e:
            raise ValueError(f"--model {spec} cannot be built as {made} ({e}); pass --model-kwargs '{{\"name\": value}}' "
                             "or name a factory function that takes no argument") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} gave {type(model).__name__}, not an nn.Module")
    if state is not None:
        weights = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(weights, dict):
            raise ValueError(f"--checkpoint {checkpoint} holds a {type(weights).__name__}, not a state dict")
        mine = model.state_dict()
        missing = sorted(set(mine) - set(weights))
        unexpected = sorted(set(weights) - set(mine))
        shapes = [f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(mine[k].shape)}" for k in mine
                  if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(mine[k].shape)]
        if missing or unexpected or shapes:
            lines = shapes[:5] + ([f"missing from the checkpoint: {missing[:5]}"] if missing else []) \
                + ([f"not in the model: {unexpected[:5]}"] if unexpected else [])
            hint = (f"; the checkpoint was saved with hyper_parameters {json.dumps(hparams, default=str)}"
                    if isinstance(hparams, dict) and hparams else "")
            raise ValueError(f"--checkpoint {checkpoint} does not fit the model built as {made}:\n  " + "\n  ".join(lines)
                             + f"\nBuild it as the run did: --model-kwargs '{{...}}' or a factory function{hint}")
        model.load_state_dict(weights)
    return model.eval()


def load_dataset(spec: str, what: str) -> Any:
    """A ``Dataset`` or ``DataLoader`` named on the command line: ``module.path:name`` or
    ``file.py:name`` (an object, or a function called without arguments), or a file written with
    ``torch.save`` (``.pt``/``.pth``), e.g. the split a training script saved.

    Raises:
        ValueError: the spec names nothing, or a function that needs arguments.
    """
    import torch

    if spec.endswith((".pt", ".pth")) and ":" not in spec:
        try:
            return torch.load(spec, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"--{what} {spec}: cannot be read ({e})") from None
    from torch.utils.data import DataLoader, Dataset

    obj = load_object(spec)
    if callable(obj) and not isinstance(obj, (Dataset, DataLoader)):
        try:
            obj = obj()
        except TypeError as e:
            raise ValueError(f"--{what} {spec} cannot be called without arguments ({e}); name a factory function") from None
    return obj


def load_loader(spec: str, what: str, batch_size: int, collate: Optional[str] = None) -> Any:
    """:func:`load_dataset` of ``spec`` as a ``DataLoader``: a ``Dataset`` is batched in order
    (``batch_size``, the collate function ``collate`` names with ``module.path:name``, if any);
    a ``DataLoader`` is returned as it is."""
    from torch.utils.data import DataLoader

    obj = load_dataset(spec, what)
    if isinstance(obj, DataLoader):
        return obj
    return DataLoader(obj, batch_size=batch_size, shuffle=False, collate_fn=load_object(collate) if collate else None)
