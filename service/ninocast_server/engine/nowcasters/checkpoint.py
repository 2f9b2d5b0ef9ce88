"""Loading and saving nowcasters.

Two on-disk forms:

* the reference's ``.pt`` files (NINO_SPEC §3.7): a torch zip whose top level is ``{"state_dict", "model_args"}``.
  They are read with ``weights_only=True``: the pickle may only rebuild tensors and plain containers, so a
  malicious file cannot run code. ``model_args`` is checked key by key against §3.1;
* our own directory form, which needs no pickle at all::

      <dir>/config.json        {"format": "ninocast-nowcaster", "version": 1, "kind": "nino"|"wnn",
                                "name": ..., "model_args": {...}, "source": {...},
                                "scope": {"families": [...], "tasks": [...]},   (optional, scope.py)
                                "start_step": N}   (optional: the advice that runs train N calls before
                                                    their first nowcast; 0 when absent)
      <dir>/model.safetensors  the state_dict

  or a routed directory (routed.py): ``"kind": "routed"``, ``"routes": {family: member | [member, ...]}``, and
  each member a subdirectory of the form above (or ``{"member": DIR, "upd_scale": X}``: that member with its
  predicted update scaled by X for this family);

``load_nowcaster("linefit" | <dir> | <routed dir> | <file.pt>)`` returns a ready ``Nowcaster``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ... import DEFAULT_NOWCASTER
from .base import Nowcaster
from .config import NiNoConfig, WNNConfig
from .linefit import Linefit
from .nino import NiNo, NiNoModel
from .routed import RoutedNowcaster
from .scope import OFFICIAL_SCOPE, Scope, ScopeError, parse_scope
from .wnn import WNN, WNNModel

FORMAT, VERSION = "ninocast-nowcaster", 1
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "models"  # nowcasters shipped inside the package
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# The reference's constructor arguments (§3.1) and what we do with each: the architecture (config.py; NiNo's
# fields include WNN+'s), settings only one value of which is implemented, and runtime knobs.
_ARCHITECTURE = NiNoConfig().model_args()
_FIXED = {"dms": True, "input_layer": "linear", "act_name": "silu", "improved_graph": True, "scale_method": "std",
          "towers": 1, "final_edge_update": False, "edge_sample_ratio": 0.0}  # only these values are implemented
_RUNTIME_ONLY = {"chunk_size", "message_passing_device"}  # memory/placement knobs: ignored, we chunk our own way

Model = NiNoModel | WNNModel


# ----------------------------------------------------------------------------- model_args -> module
def _is_gnn(value: Any) -> bool:
    """The reference treats False, None and "none" as "no GNN" (the WNN+ variant)."""
    return not (value is None or value is False or (isinstance(value, str) and value.lower() == "none"))


def _check_value(key: str, value: Any, where: str) -> Any:
    default = _ARCHITECTURE[key]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:  # float
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise CheckpointError(f"{where}: model_args[{key!r}] = {value!r} is not a valid {type(default).__name__}")
    return value


def model_from_args(model_args: Mapping[str, Any], where: str = "checkpoint",
                    device: str | torch.device = "cpu") -> Model:
    """Build the (untrained) module a checkpoint's ``model_args`` describe; unknown or unsupported args raise.

    Loaders build it on the "meta" device: no memory is spent before the weights' shapes have been checked."""
    if not isinstance(model_args, Mapping):
        raise CheckpointError(f"{where}: model_args must be a dict, got {type(model_args).__name__}")
    known = set(_ARCHITECTURE) | set(_FIXED) | _RUNTIME_ONLY
    unknown = sorted(str(k) for k in model_args if k not in known)
    if unknown:
        raise CheckpointError(f"{where}: unknown model_args {unknown}; known: {sorted(known)}")
    for key, required in _FIXED.items():
        if key in model_args and model_args[key] not in (required, None):
            raise CheckpointError(f"{where}: model_args[{key!r}] = {model_args[key]!r} is not supported "
                                  f"(only {required!r} is implemented)")
    config_type = NiNoConfig if _is_gnn(model_args.get("gnn", True)) else WNNConfig
    args = {k: _check_value(k, model_args[k], where) for k in config_type.arg_names() if k in model_args}
    try:
        config = config_type(**args)  # WNN+ checkpoints of the reference also carry NiNo's args: not read
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    with torch.device(device):
        return NiNoModel(config) if isinstance(config, NiNoConfig) else WNNModel(config)


def _load_state(model: Model, state: Mapping[str, Any], where: str) -> Model:
    """Strict load into a meta-device ``model``, with a readable account of what does not fit (instead of
    torch's long RuntimeError). The checked CPU tensors become the parameters (no copy, no init)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: state_dict must be a dict, got {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key, want in expected.items():
        got = state.get(key)
        if got is None:
            continue
        if not isinstance(got, Tensor) or not got.is_floating_point():
            problems.append(f"{key} is not a floating-point tensor")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, model_args imply {tuple(want.shape)}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match model_args {model.config.model_args()}: "
                              + "; ".join(problems))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _wrap(model: Model, name: str, scope: Scope | None, start_step: int = 0) -> Nowcaster:
    nowcaster = NiNo(model, name=name) if isinstance(model, NiNoModel) else WNN(model, name=name)
    nowcaster.scope, nowcaster.start_step = scope, start_step
    return nowcaster


# ----------------------------------------------------------------------------- official .pt files
def load_official(path: str | Path) -> Model:
    """A reference checkpoint (§3.7) -> its module, loaded without unpickling anything but tensors."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # also keeps torch away from the legacy (non-zip) pickle format
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (expected a torch zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: the file holds objects other than tensors and plain containers "
                              f"({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "model_args" not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a dict with 'state_dict' and 'model_args', found {found}")
    return _load_state(model_from_args(obj["model_args"], str(path), "meta"), obj["state_dict"], str(path))


# ----------------------------------------------------------------------------- our directory format
def save_nowcaster(model: NiNo | WNN | Model, out_dir: str | Path, name: str | None = None,
                   source: Mapping[str, Any] | None = None, scope: Scope | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` (created if needed); returns the directory.
    ``scope`` defaults to the nowcaster's own (an imported official checkpoint keeps what it was trained on)."""
    from safetensors.torch import save_file

    module = model.model if isinstance(model, (NiNo, WNN)) else model
    if not isinstance(module, (NiNoModel, WNNModel)):
        raise TypeError(f"cannot save a {type(model).__name__}: only NiNo and WNN nowcasters have weights")
    kind = "nino" if isinstance(module, NiNoModel) else "wnn"
    name = name or getattr(model, "name", None) or kind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors writes a 0600 temp file and renames it; a server running as another user (the docker image's
    # uid 10001 reading a mounted models dir) must be able to read it.
    os.chmod(out / WEIGHTS_FILE, 0o644)
    config = {"format": FORMAT, "version": VERSION, "kind": kind, "name": name,
              "model_args": module.config.model_args(), "source": dict(source or {})}
    scope = scope or getattr(model, "scope", None)
    if scope is not None:
        config["scope"] = scope.to_json()
    if getattr(model, "start_step", 0):
        config["start_step"] = model.start_step  # type: ignore[union-attr]
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_config(path: str | Path) -> dict:
    """A nowcaster directory's ``config.json``, checked for format and version (any kind)."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{path}: permission denied (this process cannot list or open files in it)")
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: a nowcaster directory needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a {FORMAT} config (format = {config.get('format')!r})"
                              if isinstance(config, dict) else f"{cfg_path}: expected a JSON object")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path}: unsupported version {config.get('version')!r} (this code reads {VERSION})")
    return config


def load_directory(path: str | Path) -> tuple[Model, dict]:
    """Our directory format -> (module, config); ``config["scope"]`` is checked and parsed into a Scope."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = read_config(path)
    if config.get("kind") == "routed":
        raise CheckpointError(f"{cfg_path}: a routed nowcaster has no weights of its own; use one of its members "
                              f"({', '.join(sorted(_member_dirs(config.get('routes'))))})")
    if not weights.is_file():
        raise CheckpointError(f"{path}: a nowcaster directory needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    kind, args = config.get("kind"), config.get("model_args")
    if kind not in ("nino", "wnn"):
        raise CheckpointError(f"{cfg_path}: kind must be 'nino', 'wnn' or 'routed', got {kind!r}")
    if not isinstance(args, dict):
        raise CheckpointError(f"{cfg_path}: model_args must be an object")
    try:
        config["scope"] = parse_scope(config.get("scope"), str(cfg_path))
    except ScopeError as e:
        raise CheckpointError(str(e)) from None
    start = config.setdefault("start_step", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise CheckpointError(f"{cfg_path}: start_step must be a non-negative integer (optimizer calls before a "
                              f"run's first nowcast), got {start!r}")
    model = model_from_args(args, str(cfg_path), "meta")
    if (kind == "nino") != isinstance(model, NiNoModel):
        raise CheckpointError(f"{cfg_path}: kind {kind!r} disagrees with model_args gnn={args.get('gnn')!r}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    return _load_state(model, state, str(weights)), config


def resolve_ref(ref: str) -> str:
    """"default" -> the bundled default nowcaster (ninocast-nino); a bundled name -> its directory."""
    if ref == "default":
        ref = DEFAULT_NOWCASTER
    if ref != "linefit" and not Path(ref).exists() and (BUNDLED_DIR / ref).is_dir():
        return str(BUNDLED_DIR / ref)
    return ref


def load_nowcaster(ref: str, device: str | torch.device = "cpu", name: str | None = None) -> Nowcaster:
    """"linefit", a directory in our format, or an official ``.pt`` file -> a Nowcaster on ``device``.

    The name defaults to the config's name (directories) or the file stem (``nino_mlp.pt`` -> ``nino_mlp``).
    """
    ref = resolve_ref(ref)
    if ref == "linefit":
        return Linefit(name=name or "linefit").to(device)
    path = Path(ref)
    if path.is_dir():
        if read_config(path).get("kind") == "routed":
            return load_routed(path, device, name)
        model, config = load_directory(path)
        return _wrap(model, name or str(config.get("name") or path.name), config["scope"],
                     config["start_step"]).to(device)
    if path.is_file():  # the reference's format: trained on the reference's meta-training set
        return _wrap(load_official(path), name or path.stem, OFFICIAL_SCOPE).to(device)
    raise CheckpointError(f"no nowcaster at {ref!r}: expected 'linefit', a directory with {CONFIG_FILE} and "
                          f"{WEIGHTS_FILE}, or an official .pt checkpoint")


def load_routed(path: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> RoutedNowcaster:
    """A routed directory (routed.py): ``routes`` maps families to member subdirectories, each loaded once (a
    member listed with its own ``upd_scale`` shares that member's weights)."""
    path = Path(path)
    config = read_config(path)
    cfg_path = path / CONFIG_FILE
    routes = _parse_routes(config.get("routes"), cfg_path)
    routed_name = str(name or config.get("name") or path.name)
    loaded: dict[str, tuple[Model, dict]] = {}
    members: dict[RouteEntry, Nowcaster] = {}
    for entry in dict.fromkeys(e for es in routes.values() for e in es):
        member, scale = entry
        if member not in loaded:
            sub = (path / member).resolve()
            if sub.parent != path.resolve():
                raise CheckpointError(f"{cfg_path}: member {member!r} must be a subdirectory of {path}")
            if read_config(sub).get("kind") == "routed":
                raise CheckpointError(f"{cfg_path}: member {member!r} is itself routed (members hold weights)")
            loaded[member] = load_directory(sub)
        model, member_config = loaded[member]
        label = f"{routed_name}/{member}"
        if scale is not None and scale != model.config.upd_scale:
            where = f"{cfg_path}: member {member!r} at upd_scale {scale:g}"
            model = _load_state(model_from_args({**member_config["model_args"], "upd_scale": scale}, where, "meta"),
                                model.state_dict(), where)
            label += f"@upd_scale={scale:g}"
        members[entry] = _wrap(model, label, member_config["scope"], member_config["start_step"])
    try:
        routed = RoutedNowcaster(routed_name, {family: [members[e] for e in es] for family, es in routes.items()})
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    return routed.to(device)


RouteEntry = tuple[str, float | None]  # (member subdirectory, its update scale for this family, None = its own)


def _parse_routes(routes: object, cfg_path: Path) -> dict[str, list[RouteEntry]]:
    """``routes``: family -> a member, or a list of them; a member is its subdirectory's name, or
    ``{"member": NAME, "upd_scale": X}`` to scale that member's predicted update by X for this family. Why: the
    best scale was found to differ by family (docs/metatrain.md, round 7), and one set of weights then serves
    both."""
    bad = CheckpointError(f"{cfg_path}: routes must be a non-empty object of family -> member directory (or a "
                          'list of them, chosen by their scope.spacing); a member may be {"member": DIR, '
                          '"upd_scale": X}')
    if not isinstance(routes, dict) or not routes:
        raise bad
    out: dict[str, list[RouteEntry]] = {}
    for family, listed in routes.items():
        items = listed if isinstance(listed, list) else [listed]
        if not isinstance(family, str) or not items:
            raise bad
        out[family] = []
        for item in items:
            if isinstance(item, str):
                out[family].append((item, None))
                continue
            if not isinstance(item, dict) or not isinstance(item.get("member"), str):
                raise bad
            scale = item.get("upd_scale")
            if set(item) != {"member", "upd_scale"} or not _is_scale(scale):
                raise CheckpointError(f"{cfg_path}: routes[{family!r}] member {item.get('member')!r}: a member "
                                      "object takes 'member' and 'upd_scale' (a positive finite number) only, "
                                      f"got {item!r}")
            out[family].append((item["member"], float(scale)))
    return out


def _is_scale(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def _member_dirs(routes: object) -> set[str]:
    """The member directory names a routes object mentions (each value a name, an object or a list of them)."""
    values = routes.values() if isinstance(routes, dict) else ()
    items = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return {str(x.get("member")) if isinstance(x, dict) else str(x) for x in items}


def save_routed(out_dir: str | Path, members: Mapping[str, str | Path | Sequence[str | Path]],
                name: str | None = None, upd_scales: Mapping[str, float] | None = None) -> RoutedNowcaster:
    """family -> member directory (or several, the first the default, the others chosen by their scope.spacing):
    copy each distinct member into ``out_dir`` (named after its source), write the routed config and return it
    loaded. ``upd_scales``: family -> the update scale of its first member for that family (its weights are not
    copied twice). ``out_dir`` must not exist yet: a half-replaced nowcaster is worse than none, so on any error
    nothing is left behind."""
    import shutil

    out = Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{out}: already exists (write a routed nowcaster into a new directory)")
    upd_scales = dict(upd_scales or {})
    unrouted = sorted(set(upd_scales) - set(members))
    if unrouted:
        raise CheckpointError(f"an update scale is given for {unrouted}, which no member serves")
    bad = {f: x for f, x in upd_scales.items() if not _is_scale(x)}
    if bad:
        raise CheckpointError(f"update scales must be positive finite numbers, got {bad}")
    listed = {f: [Path(m)] if isinstance(m, (str, Path)) else [Path(x) for x in m] for f, m in members.items()}
    sources = {str(src.resolve()): src for ms in listed.values() for src in ms}
    names: dict[str, str] = {}
    for key, src in sources.items():
        if read_config(src).get("kind") == "routed":  # missing or foreign: fails here, before anything is written
            raise CheckpointError(f"{src}: is itself routed (members hold weights; name its members instead)")
        base, n = src.resolve().name, 1
        names[key] = base
        while names[key] in list(names.values())[:-1]:  # two members named alike: vision, vision-2, ...
            n += 1
            names[key] = f"{base}-{n}"
    out.mkdir(parents=True)
    try:
        for key, sub in names.items():
            shutil.copytree(sources[key], out / sub, ignore=shutil.ignore_patterns("train", "work*"))
        routes: dict[str, str | dict | list[str | dict]] = {}
        for family, ms in listed.items():
            subs: list[str | dict] = [names[str(src.resolve())] for src in ms]
            if family in upd_scales:
                subs[0] = {"member": subs[0], "upd_scale": upd_scales[family]}
            routes[family] = subs[0] if len(subs) == 1 else subs
        config = {"format": FORMAT, "version": VERSION, "kind": "routed", "name": name or out.name, "routes": routes}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        routed = load_routed(out)  # the members must agree (ctx, horizon, graph needs) and run their families
        (out / "MODEL_CARD.md").write_text(_routed_card(routed, routes))
    except Exception:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return routed


def _routed_card(routed: RoutedNowcaster, routes: Mapping[str, str | dict | list[str | dict]]) -> str:
    rows = []
    for family, subs in routes.items():
        for sub, member in zip(subs if isinstance(subs, list) else [subs], routed.routes[family]):
            sub = sub["member"] if isinstance(sub, dict) else sub
            scope = member.scope
            trained = (", ".join(scope.tasks) or "/".join(scope.families)) if scope else "no claim"
            spacing = "any" if not scope or not scope.spacing else "-".join(map(str, dict.fromkeys(scope.spacing)))
            scale = member.describe().get("model_args", {}).get("upd_scale")
            scale = "-" if scale is None else f"{scale:g}"
            rows.append(f"| {family} | [{sub}/]({sub}/MODEL_CARD.md) | {spacing} | {scale} | {member.start_step} | "
                        f"{trained} |")
    return "\n".join([
        f"# {routed.name}", "",
        "A routed nowcaster (`ninocast route`): each model is nowcast by the member trained on its graph family "
        "(where a family has several, the first whose snapshot spacing, period / ctx, is the run's; else the "
        "first listed); a model outside that member's scope gets its warning under this name.", "",
        "| family | member | snapshot spacing (steps) | update scale | first nowcast after (calls) | meta-trained on |",
        "|---|---|---|---|---|---|",
        *rows, ""])
