"""The registries of model families and data kinds, and how their entries are found.

An entry is made where a family or kind is defined (`@register_model(...)` in llmtrain.models.base,
`@register_data(...)` in llmtrain.data.base) and holds all the rest of llmtrain knows of it: its name, its schema
(the dataclass of its config section), its task (a model family and a data kind train together when their tasks
are equal) and its YAML presets (the `model=` / `data=` options). Entries are found without a list:

- built in: the modules of the registry's package (`llmtrain.models`, `llmtrain.data`, sub-packages included)
  in which a line starts with the decorator; only those are imported;
- plugins: the modules named by the `llmtrain.plugins` entry points of installed distributions, and by
  LLMTRAIN_PLUGINS (comma-separated module names importable from sys.path, e.g. through PYTHONPATH).

A preset is a YAML file beside the registering module (stored in Hydra's ConfigStore as an option of the group)
or, for the families and kinds shipped with llmtrain, in conf/<group>/. Either way it begins with
`defaults: [/schema_<group>_<name>@_here_, _self_]`, which types it by its schema.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pkgutil
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError

PLUGINS_ENV = "LLMTRAIN_PLUGINS"
ENTRY_POINTS = "llmtrain.plugins"
Presets = str | tuple[str, ...] | list[str]  # YAML file names; one may be given alone


@dataclass(frozen=True)
class Entry:
    """One model family (group "model") or data kind (group "data")."""

    name: str  # cfg.model.family / cfg.data.kind
    target: Any  # model: the ModelSpec instance; data: the DataModule class
    config: type  # the schema of the group's section
    task: str  # equal for the model and the data of a run; also the DataModule's DataInfo.task
    presets: tuple[str, ...]  # YAML file names (see Registry.store)
    module: str  # the module that registered it

    @property
    def options(self) -> list[str]:
        """The group options its presets make (`model=<option>`)."""
        return [Path(p).stem for p in self.presets]


class Registry:
    """Entries of one config group by name, filled by the decorator `decorator` in the modules of `package`
    and by plugins."""

    def __init__(self, group: str, field: str, package: str, decorator: str) -> None:
        self.group, self.field, self.package = group, field, package
        self.key = f"{group}.{field}"
        self._marker = re.compile(rf"^@{decorator}\(", re.MULTILINE)
        self._entries: dict[str, Entry] = {}
        self._presets: dict[tuple[Entry, Path], Any] = {}
        self._scanned = False

    def schema_name(self, name: str) -> str:
        """Where `name`'s schema is stored in the ConfigStore (at the root, so `--help` does not list it)."""
        return f"schema_{self.group}_{name}"

    def add(self, name: str, target: Any, *, config: type, task: str, presets: Presets, module: str) -> Entry:
        """Register `name`; one line when the registration cannot work."""
        where = f"{module} registers {self.group} {self.field} {name!r}"
        fields = {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
        if self.field not in fields or fields[self.field].default != name:
            raise ConfigError(self.key, f"{where} with config={getattr(config, '__name__', config)!r}, which must be "
                                        f"a dataclass with the field `{self.field}: str = {name!r}`")
        if not isinstance(task, str) or not task:
            raise ConfigError(self.key, f"{where} without a task (e.g. task=\"regression\")")
        presets = (presets,) if isinstance(presets, str) else tuple(presets)
        if not presets:
            raise ConfigError(self.key, f"{where} without presets (e.g. presets=(\"{name}.yaml\",)): its "
                                        f"{self.group}= options")
        for file in presets:
            if not file.endswith(".yaml") or Path(file).name != file:
                raise ConfigError(self.key, f"{where} with preset {file!r}; presets are YAML file names (x.yaml)")
        old = self._entries.get(name)
        if old is not None and old.module != module:
            raise ConfigError(self.key, f"{self.group} {self.field} {name!r} is registered twice: by {old.module} "
                                        f"and by {module}")
        entry = Entry(name, target, config, task, presets, module)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry of `name`; one line naming the registered ones when there is none."""
        if name not in self._entries:
            self.discover()
        if name not in self._entries:
            raise ConfigError(self.key, f"unknown {self.group} {self.field} {name!r}; choose one of "
                                        f"{sorted(self._entries)}")
        return self._entries[name]

    def entries(self) -> list[Entry]:
        """Every entry, built-in and plugin, by name."""
        if not self._scanned:
            self.discover()
        return [self._entries[n] for n in sorted(self._entries)]

    def discover(self) -> None:
        """Import the package's registering modules (once) and the plugins not imported yet."""
        discover(self)

    def _scan(self) -> None:
        if not self._scanned:
            self._scanned = True
            for module in registering_modules(self.package, self._marker):
                importlib.import_module(module)

    def store(self, conf: Path) -> None:
        """Every schema into Hydra's ConfigStore, and every preset beside its module as an option of the group,
        like the shipped conf/<group>/*.yaml. One line for a preset that is nowhere or whose option is taken."""
        shipped = {p.stem for p in (conf / self.group).glob("*.yaml")}
        owners: dict[str, str] = {}
        for e in self.entries():
            store_once(None, self.schema_name(e.name), e.config, e.module)
            here = module_dir(e.module)
            for file, option in zip(e.presets, e.options, strict=True):
                if option in owners:
                    raise ConfigError(self.group, f"option {option!r} is a preset of both {owners[option]} and "
                                                  f"{e.module}")
                owners[option] = e.module
                beside = here / file if here is not None else None
                if beside is not None and beside.is_file():
                    if option in shipped:
                        raise ConfigError(self.group, f"{beside} would replace the option {option!r} of "
                                                      f"{conf / self.group}; rename it")
                    store_once(self.group, option, self._preset(e, beside), e.module)
                elif option not in shipped:
                    raise ConfigError(self.group, f"{e.module} registers the preset {file!r}, which is neither "
                                                  f"beside it nor in {conf / self.group}")

    def _preset(self, e: Entry, path: Path) -> Any:
        """A plugin's preset (read once), refused unless it extends its own schema."""
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if (e, path) in self._presets:
            return self._presets[e, path]
        try:
            node = OmegaConf.load(path)
        except Exception as ex:
            first = (str(ex).strip().splitlines() or [type(ex).__name__])[0]
            raise ConfigError(self.group, f"{path} cannot be read: {first}") from None
        defaults = node.get("defaults") if isinstance(node, DictConfig) else None
        want = f"/{self.schema_name(e.name)}@_here_"
        if not isinstance(defaults, ListConfig) or want not in list(defaults):
            raise ConfigError(self.group, f"{path} must begin with `defaults: [{want}, _self_]`, which types it "
                                          f"by the schema of {self.group} {self.field} {e.name!r}")
        self._presets[e, path] = node
        return node


def discover(*registries: Registry) -> None:
    """Fill the registries: the registering modules of each one's package (imported once), then the plugins not
    imported yet."""
    for registry in registries:
        registry._scan()
    load_plugins()


_stored: dict[tuple[str | None, str], tuple[Any, Any]] = {}


def store_once(group: str | None, name: str, node: Any, provider: str) -> None:
    """`ConfigStore.store`, skipped when this very node is in the store already (an app registers its configs
    when imported and again when it starts; each store converts the node anew)."""
    from hydra.core.config_store import ConfigStore

    memo = _stored.get((group, name))
    if memo is not None and memo[0] is node and memo[1] is _held(group, name):
        return
    ConfigStore.instance().store(group=group, name=name, node=node, provider=provider)
    _stored[group, name] = (node, _held(group, name))


def _held(group: str | None, name: str) -> Any:
    """What the ConfigStore holds under group/name (None: nothing)."""
    from hydra.core.config_store import ConfigStore

    where = ConfigStore.instance().repo
    for part in group.split("/") if group else ():
        where = where.get(part, {})
    return where.get(f"{name}.yaml")


def module_dir(module: str) -> Path | None:
    """The directory of an imported module's file (None for one without a file)."""
    file = getattr(sys.modules.get(module), "__file__", None)
    return Path(file).resolve().parent if file else None


def registering_modules(package: str, marker: re.Pattern[str]) -> list[str]:
    """The modules of `package` and its sub-packages whose source has a line matching `marker`, found by reading
    their files (importing all would cost start-up time); a module without a readable source is listed too."""
    pkg = importlib.import_module(package)
    return sorted(name for name, source in _sources(list(pkg.__path__), f"{package}.")
                  if source is None or marker.search(source))


def _sources(paths: list[str], prefix: str) -> Iterator[tuple[str, str | None]]:
    for info in pkgutil.iter_modules(paths, prefix):
        base = Path(getattr(info.module_finder, "path", "")) / info.name.rpartition(".")[2]
        file = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
        try:
            source: str | None = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            source = None
        yield info.name, source
        if info.ispkg:
            yield from _sources([str(base)], f"{info.name}.")


_plugins: set[str] = set()


def load_plugins() -> None:
    """Import the plugin modules named by LLMTRAIN_PLUGINS and by the `llmtrain.plugins` entry points that are not
    imported yet (both read anew when the environment or sys.path changed: a forked process may have others)."""
    for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
        if name:
            _import_plugin(name, PLUGINS_ENV, "")
    for module, origin in _entry_points(tuple(sys.path)):
        _import_plugin(module, ENTRY_POINTS, origin)


@functools.lru_cache(maxsize=4)
def _entry_points(path: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module, where it is named) of each `llmtrain.plugins` entry point visible from sys.path `path`."""
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINTS):
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        out.append((ep.module, f" (entry point {ep.name!r} of {dist})"))
    return out


def _import_plugin(name: str, key: str, origin: str) -> None:
    if name in _plugins:
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as ex:
        if ex.name is None or not (name == ex.name or name.startswith(f"{ex.name}.")):
            raise  # the plugin itself imports something missing: its traceback says what
        raise ConfigError(key, f"no module named {name!r}{origin}; the directory holding it must be on sys.path "
                               "(PYTHONPATH)") from None
    _plugins.add(name)
