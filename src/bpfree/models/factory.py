"""Your own model as a model name: ``py:FILE.py:FACTORY`` or ``module.path:FACTORY``.

``FACTORY(input_shape, n_outputs, **options)`` must return an ``nn.Module`` taking
``(batch, *input_shape)`` and giving ``(batch, n_outputs)`` logits (a language model:
``(batch, T, n_outputs)``). FACTORY may be a function or a class.

Options: FACTORY's parameters after the first two that have a default which is a number, a
string, a boolean, ``None`` or a tuple/list of those (or an annotation ``int``, ``float``, ``str``,
``bool``, ``tuple[int, ...]``...), are the model's options: ``--set KEY=VALUE`` or ``[model]`` in a
config file, checked and converted like the zoo's. A parameter without a default is a required
option. An untyped option (no annotation, default ``None`` or none) reads an integer, a number or
true/false given as text as such, anything else as text. Two more options are recorded by bpfree: ``file`` (the factory's file) and ``sha256``
(of its bytes): a run resumed with a changed file is refused.

Feedback points: a plain ``nn.Sequential`` without points gets them from :func:`bpfree.attach`
(after every hidden non-linearity). Any other module must hold its own
:class:`bpfree.FeedbackPoint` modules for the DFA family; BP, FA and sign symmetry need none.

``py:FILE.py`` is run from the bytes that were hashed, as a module of its own, with the file's
folder on ``sys.path`` while it runs and while FACTORY builds (so it can import its neighbours).
A configuration that records a ``sha256`` (a run being resumed) is checked against FILE before
FILE runs (:func:`check_recorded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch import nn

from ..options import OptionError, option
from ..points import AttachError, FeedbackPoint, attach
from . import ModelSpec, _REGISTRY

#: Options bpfree records itself (a factory parameter may not take these names).
RECORDED = ("file", "sha256")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z_]\w*$")
_SCALARS = (bool, int, float, str)
_SPECS: dict[tuple[str, str], ModelSpec] = {}


@dataclass(frozen=True)
class Factory:
    """A loaded factory: the model name, its file and that file's sha256, the callable itself."""

    name: str
    file: str
    sha256: str
    fn: Callable[..., Any]


@contextlib.contextmanager
def _on_path(folder: Optional[Path]) -> Iterator[None]:
    """``folder`` at the front of ``sys.path`` for the block (nothing for ``None``)."""
    if folder is None:
        yield
        return
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _run_file(path: Path, data: bytes, sha256: str) -> types.ModuleType:
    """Run ``data`` (the bytes of ``path``) as a fresh module named after its hash."""
    name = f"bpfree_user_model_{sha256[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        code = compile(data, str(path), "exec")
    except (SyntaxError, ValueError) as e:
        raise OptionError(f"the model file {path} is not valid Python: {_first_line(e)}") from None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _on_path(path.parent):
            exec(code, module.__dict__)
    except Exception as e:
        del sys.modules[name]
        raise OptionError(f"the model file {path} failed while it ran: {_first_line(e)}") from e
    return module


def _callable(module: types.ModuleType, attr: str, where: str) -> Callable[..., Any]:
    fn = getattr(module, attr, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise OptionError(f"{where} defines no {attr!r}; what it defines: {', '.join(found) or '(nothing callable)'}")
    if not callable(fn):
        raise OptionError(f"{where}: {attr!r} is a {type(fn).__name__}, not a function or class")
    return fn


def check_recorded(name: Any, sha256: Any) -> None:
    """Refuse ``py:FILE.py:FACTORY`` before FILE runs if its bytes no longer have the recorded ``sha256``."""
    if not (isinstance(name, str) and name.startswith("py:") and isinstance(sha256, str) and sha256):
        return
    path = Path(name[3:].rpartition(":")[0]).expanduser().absolute()
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return  # load_factory says what is wrong with the path
    if actual != sha256:
        raise OptionError(
            f"the model file {path} changed since this configuration was made: its sha256 is {actual}, the "
            f"configuration records {sha256}; restore the file or start a new run (the changed file was not run)"
        )


def load_factory(name: str) -> Optional[Factory]:
    """The factory a model name refers to, or ``None`` if ``name`` is not written like one."""
    if name.startswith("py:"):
        file, sep, attr = name[3:].rpartition(":")
        if not sep or not file or not _NAME.match(attr):
            raise OptionError(f"model {name!r}: write py:FILE.py:FACTORY (FACTORY a name defined in the file)")
        path = Path(file).expanduser().absolute()
        if not path.is_file():
            raise OptionError(f"the model file {path} does not exist")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OptionError(f"cannot read the model file {path}: {e.strerror or e}") from None
        sha = hashlib.sha256(data).hexdigest()
        module = _run_file(path, data, sha)
        return Factory(name, str(path), sha, _callable(module, attr, str(path)))
    module_name, sep, attr = name.partition(":")
    if not sep or not _MODULE.match(module_name) or not _NAME.match(attr):
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise OptionError(f"model {name!r}: importing {module_name} failed: {_first_line(e)}") from e
    file = getattr(module, "__file__", None) or ""
    sha = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file and Path(file).is_file() else ""
    return Factory(name, file, sha, _callable(module, attr, f"module {module_name}"))


def _option_type(annotation: Any, default: Any) -> Any:
    """The option type of a parameter: a usable annotation, else the default's type; ``None`` if neither."""
    ok = lambda t: t in _SCALARS or (typing.get_origin(t) is tuple and typing.get_args(t)[:1] and
                                     typing.get_args(t)[0] in _SCALARS)
    if annotation is not inspect.Parameter.empty and not isinstance(annotation, str):
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1 and ok(inner[0]):
                return Optional[inner[0]]
        elif origin is list and args and args[0] in _SCALARS:
            return tuple[args[0], ...]
        elif ok(annotation):
            return annotation
    if default is inspect.Parameter.empty or default is None:
        return Any  # untyped: numbers and booleans given as text are read as such (see _literal)
    if type(default) in _SCALARS:
        return type(default)
    if isinstance(default, (tuple, list)) and all(type(v) in _SCALARS for v in default):
        kinds = {type(v) for v in default}
        return tuple[kinds.pop(), ...] if len(kinds) == 1 else tuple[Any, ...]
    return None


def _literal(value: Any) -> Any:
    """A value given as text for an untyped option: an integer, a number, true/false, or the text itself."""
    if not isinstance(value, str):
        return value
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.strip().lower(), value)


def options_class(factory: Factory) -> tuple[type, list[str]]:
    """The options dataclass of ``factory`` (its parameters, then ``file`` and ``sha256``), and the
    names of the parameters it passes on."""
    fn = factory.fn
    label = f"{factory.name}"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return _dataclass(factory, [], label), []
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise OptionError(f"model {label}: the factory must take (input_shape, n_outputs, **options), "
                          f"its parameters are ({', '.join(p.name for p in params)})")
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:
        hints = {}
    fields = []
    for p in positional[2:] + [p for p in params if p.kind is p.KEYWORD_ONLY]:
        if p.name in RECORDED:
            raise OptionError(f"model {label}: the factory's parameter {p.name!r} clashes with the option bpfree "
                              f"records ({', '.join(RECORDED)}); rename it")
        tp = _option_type(hints.get(p.name, p.annotation), p.default)
        if tp is None:
            continue  # a default that is no config value (a class, a module): the factory's own
        required = p.default is inspect.Parameter.empty
        default = None if required else (tuple(p.default) if isinstance(p.default, list) else p.default)
        help = f"{'required: ' if required else ''}parameter {p.name} of the factory"
        fields.append((p.name, Optional[tp] if required and tp is not Any else tp, option(default, help), required))
    return _dataclass(factory, fields, label), [f[0] for f in fields]


def _dataclass(factory: Factory, fields: list, label: str) -> type:
    required = [f[0] for f in fields if f[3]]
    untyped = [f[0] for f in fields if f[1] is Any]

    def check(self) -> None:
        if self.sha256 and factory.sha256 and self.sha256 != factory.sha256:
            raise OptionError(
                f"the model file {factory.file} changed since this configuration was made: its sha256 is "
                f"{factory.sha256}, the configuration records {self.sha256}; restore the file or start a new run"
            )
        self.file, self.sha256 = factory.file, factory.sha256
        for key in untyped:
            setattr(self, key, _literal(getattr(self, key)))
        for key in required:
            if getattr(self, key) is None:
                raise OptionError(f"model {label}: option {key!r} is required (the factory's parameter has no "
                                  f"default); give --set {key}=VALUE")

    spec = [(n, tp, fld) for n, tp, fld, _ in fields] + [
        ("file", str, option("", "the factory's file, recorded by bpfree")),
        ("sha256", str, option("", "sha256 of the factory's file, recorded by bpfree; a run resumed with a "
                                   "changed file is refused")),
    ]
    return dataclasses.make_dataclass("FactoryOptions", spec, namespace={"check": check})


def build(factory: Factory, names: list[str]) -> Callable[..., nn.Module]:
    """The model builder of ``factory``: calls it, checks the result, gives a plain Sequential its points."""

    def build_model(input_shape: tuple[int, ...], num_classes: int, o: Any) -> nn.Module:
        kwargs = {k: getattr(o, k) for k in names}
        folder = Path(factory.file).parent if factory.name.startswith("py:") else None
        try:
            with _on_path(folder):
                model = factory.fn(tuple(input_shape), int(num_classes), **kwargs)
        except Exception as e:
            raise ValueError(f"model {factory.name}: the factory failed: {_first_line(e)}") from e
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {factory.name}: the factory returned {type(model).__name__}, not an nn.Module")
        if type(model) is nn.Sequential and not any(isinstance(m, FeedbackPoint) for m in model.modules()):
            try:
                model, _ = attach(model)
            except AttachError as e:
                warnings.warn(f"model {factory.name}: {e}; it has no feedback points, so the DFA family cannot "
                              f"train it", RuntimeWarning, stacklevel=2)
        return model

    return build_model


def _resolve(name: object) -> Optional[ModelSpec]:
    if not isinstance(name, str) or ":" not in name:
        return None
    factory = load_factory(name)
    if factory is None:
        return None
    key = (name, factory.sha256 or factory.file)
    if key not in _SPECS:
        options, names = options_class(factory)
        summary = f"{getattr(factory.fn, '__name__', name)} from {factory.file or name}"
        _SPECS[key] = ModelSpec(name, summary, options, build(factory, names))
    return _SPECS[key]


_REGISTRY.add_resolver(_resolve, "py:FILE.py:FACTORY, module.path:FACTORY")
