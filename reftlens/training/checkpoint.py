"""Checkpoints: the whole training state (Φs, optimizer, scheduler, RNG, history) in safetensors +
JSON, written atomically; read back only into the set that wrote them.

A checkpoint folder holds ``reft/`` (the set, as :meth:`reftlens.ReftModel.save` writes it),
``optimizer.safetensors`` (AdamW's moments and the RNG states) and ``trainer_state.json`` (the
step, the optimizer's parameter groups, the scheduler and the history). Resuming checks every file
and the set (layers, positions, hook, Φ type and configuration of each intervention) before it
changes anything: a damaged file or another set is a clear error, never a half-loaded run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from reftlens.errors import LoadError, TrainingError
from reftlens.positions import from_json
from reftlens.saving import BANK_FILE, CONFIG_FILE, atomic_dir, bank_folders, load, set_view, write, write_bank
from reftlens.training.config import History, TrainConfig

if TYPE_CHECKING:
    from reftlens.model import ReftModel

STATE_FILE = "trainer_state.json"  # marks a checkpoint folder: the one kind a checkpoint may replace
OPTIMIZER_FILE = "optimizer.safetensors"


# the options a resumed run may change: how long it runs, how it reports and checkpoints, and the
# arithmetic it runs in; every other option shapes the run, and a resume must keep it
RESUMABLE = {
    "epochs",
    "max_steps",
    "precision",
    "eval_every",
    "progress",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
}


def run_options(config: TrainConfig) -> dict[str, Any]:
    """The options that shape a run (all but :data:`RESUMABLE`), as JSON values: an objective
    instance by its class and its public settings."""
    out: dict[str, Any] = {}
    for f in fields(config):
        if f.name in RESUMABLE:
            continue
        v = getattr(config, f.name)
        if not isinstance(v, (str, int, float, bool, list, dict, type(None))):
            settings = {
                k: x for k, x in vars(v).items() if not k.startswith("_") and isinstance(x, (str, int, float, list))
            }
            v = {"class": type(v).__name__, **settings}
        out[f.name] = json.loads(json.dumps(v))  # tuples → lists, as the file holds them
    return out


def save_checkpoint(
    folder: Path,
    reft: "ReftModel",
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    history: History,
    config: TrainConfig | None = None,
) -> None:
    """Write the whole training state (Φs, optimizer, scheduler, RNG, history, and the options that
    shape the run) to ``folder``, atomically. ``folder`` must be new, empty or an earlier checkpoint
    (it holds ``trainer_state.json``)."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}

    def write_all(tmp: Path) -> None:
        (tmp / "reft").mkdir()
        (write if reft.bank is None else write_bank)(reft, tmp / "reft")
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        meta = {"step": step, "param_groups": state["param_groups"], "scheduler": sched, "history": asdict(history)}
        if config is not None:
            meta["options"] = run_options(config)
        (tmp / STATE_FILE).write_text(json.dumps(meta))

    atomic_dir(folder, write_all, markers=[STATE_FILE])


def load_checkpoint(
    folder: Path,
    reft: "ReftModel",
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig | None = None,
) -> tuple[int, History]:
    """Restore the state :func:`save_checkpoint` wrote into ``reft``, ``optimizer`` and
    ``scheduler`` (and torch's RNG); return the step to go on from and the history so far.

    Everything is read and checked first: a damaged file raises :class:`~reftlens.errors.LoadError`
    naming it, a checkpoint of another set, of other sets of a bank or of a run with other options
    (``config``: all but :data:`RESUMABLE` must match) a :class:`~reftlens.errors.TrainingError`
    naming the difference; only then is anything changed."""
    meta = _read_state(folder / STATE_FILE)
    tensors = _read_tensors(folder / OPTIMIZER_FILE)
    check_same_set(folder / "reft", reft)
    if config is not None and isinstance(meta.get("options"), dict):  # older checkpoints hold none
        ours = run_options(config)
        differ = [k for k in sorted(set(ours) | set(meta["options"])) if ours.get(k) != meta["options"].get(k)]
        if differ:
            said = "; ".join(f"{k}: {meta['options'].get(k)!r} there, {ours.get(k)!r} now" for k in differ)
            raise TrainingError(
                f"checkpoint {folder} was written by a run with other options ({said}). Resume with the options "
                f"it was written with (only {sorted(RESUMABLE - {'resume'})} may change), or train into a new "
                "checkpoint_dir."
            )
    saved_set, _ = load(folder / "reft", reft.model, cast=reft.cast)
    if isinstance(saved_set, dict):  # a bank: its sets in order, as reft.phis holds them
        saved_set = [iv for ivs in saved_set.values() for iv in ivs]
    saved_phis = list({id(iv.phi): iv.phi for iv in saved_set}.values())
    if len(saved_phis) != len(reft.phis):
        raise TrainingError(f"checkpoint {folder} holds {len(saved_phis)} Φs but this set has {len(reft.phis)}.")
    for k, (mine, saved) in enumerate(zip(reft.phis, saved_phis)):
        theirs, ours = saved.state_dict(), mine.state_dict()
        if {n: t.shape for n, t in theirs.items()} != {n: t.shape for n, t in ours.items()}:
            raise TrainingError(
                f"checkpoint {folder}: Φ {k} ({type(mine).__name__}) has tensors "
                f"{ {n: tuple(t.shape) for n, t in theirs.items()} } there but "
                f"{ {n: tuple(t.shape) for n, t in ours.items()} } here; resume with the set the checkpoint was "
                "written for, or train into a new checkpoint_dir."
            )
    opt_state = _optimizer_state(folder, tensors, meta["param_groups"], optimizer)
    with torch.no_grad():
        for mine, saved in zip(reft.phis, saved_phis):
            mine.load_state_dict(saved.state_dict())
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        )
    h = meta["history"]
    return int(meta["step"]), History(h["steps"], h["evals"])


def _damaged(file: Path, why: str) -> LoadError:
    return LoadError(
        f"checkpoint file {file} is damaged ({why}); it was not written whole. Resume from another "
        "checkpoint, or start again with resume=False (the checkpoint is then replaced)."
    )


def _read_state(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except OSError as e:
        raise _damaged(file, f"cannot be read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(file, f"not JSON: {e}") from None
    shape = {"step": int, "param_groups": list, "scheduler": dict, "history": dict}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in shape.items()):
        raise _damaged(file, "it needs 'step', 'param_groups', 'scheduler' and 'history'")
    h = meta["history"]
    if not isinstance(h.get("steps"), list) or not isinstance(h.get("evals"), list):
        raise _damaged(file, "its history needs 'steps' and 'evals' lists")
    return meta


def _read_tensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise _damaged(file, "missing")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for a truncated header or body
        raise _damaged(file, f"not a whole safetensors file: {e}") from None
    if "rng.cpu" not in tensors:
        raise _damaged(file, "it holds no 'rng.cpu' state")
    return tensors


def _optimizer_state(
    folder: Path, tensors: dict[str, Tensor], groups: list[Any], optimizer: torch.optim.Optimizer
) -> dict[int, dict[str, Tensor]]:
    """The optimizer state of the checkpoint, checked against ``optimizer``'s parameters."""
    mine = optimizer.param_groups
    theirs = [g.get("set") if isinstance(g, dict) else None for g in groups]
    if theirs != [g.get("set") for g in mine]:
        raise TrainingError(
            f"checkpoint {folder} trained the sets {theirs}, but this run trains {[g.get('set') for g in mine]} "
            "(the sets its data names); resume with the data the checkpoint was written for."
        )
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in mine]:
        raise TrainingError(
            f"checkpoint {folder} holds parameter groups of {sizes} tensors, but this run's optimizer has "
            f"{[len(g['params']) for g in mine]}; resume with the set and data the checkpoint was written for."
        )
    params = [p for g in mine for p in g["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            if not i.isdigit() or int(i) >= len(params):
                raise _damaged(folder / OPTIMIZER_FILE, f"{key!r} names no parameter")
            if v.ndim and v.shape != params[int(i)].shape:
                raise _damaged(folder / OPTIMIZER_FILE, f"{key!r} is {tuple(v.shape)}, not the parameter's shape")
            state.setdefault(int(i), {})[name] = v
    return state


# ---- is it the same set? ----------------------------------------------------------------------------


def check_same_set(folder: Path, reft: "ReftModel") -> None:
    """Refuse a checkpoint's set ``folder`` that is not ``reft``'s: other sets, or an intervention
    with other layers, positions, hook or Φ (type or configuration, e.g. its rank; not its init)."""
    saved = _saved_sets(folder)
    here = _sets_here(reft)
    if list(saved) != list(here):
        what = lambda names: "one set" if names == [None] else f"the sets {names}"  # noqa: E731
        raise TrainingError(
            f"checkpoint {folder.parent} holds {what(list(saved))} but this run trains {what(list(here))}; "
            "resume with the set the checkpoint was written for, or train into a new checkpoint_dir."
        )
    for name, units in here.items():
        theirs = saved[name]
        where = "" if name is None else f"set {name!r}: "
        if len(theirs) != len(units):
            raise TrainingError(
                f"checkpoint {folder.parent}: {where}it holds {len(theirs)} interventions but this set has "
                f"{len(units)}; resume with the set the checkpoint was written for, or use a new checkpoint_dir."
            )
        for a, b in zip(theirs, units):
            for key in a:
                if key != "name" and a[key] != b[key]:  # a name is a label (by default, from the Φ)
                    raise TrainingError(
                        f"checkpoint {folder.parent}: {where}intervention {b['name']!r} has {key} {_show(key, a[key])} "
                        f"in the checkpoint but {_show(key, b[key])} here; resume with the set the checkpoint was written for, or "
                        "train into a new checkpoint_dir."
                    )


def _saved_sets(folder: Path) -> dict[str | None, list[dict[str, Any]]]:
    if (folder / BANK_FILE).is_file():
        return {name: _describe_saved(sub / CONFIG_FILE) for name, sub in bank_folders(folder).items()}
    return {None: _describe_saved(folder / CONFIG_FILE)}


def _describe_saved(file: Path) -> list[dict[str, Any]]:
    try:
        config = json.loads(file.read_text())
        phis = config["phis"]
        return [
            _describe(
                u["name"],
                phis[u["phi"]]["type"],
                phis[u["phi"]]["config"],
                u["layers"],
                u["positions"],
                u["source_positions"],
                u["hook"],
            )
            for u in config["units"]
        ]
    except OSError as e:
        raise _damaged(file, f"cannot be read: {e.strerror or e}") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _damaged(file, f"not a reftlens set config: {type(e).__name__} {e}") from None


def _sets_here(reft: "ReftModel") -> dict[str | None, list[dict[str, Any]]]:
    views = {None: reft} if reft.bank is None else {name: set_view(reft, name) for name in reft.adapters}
    out = {}
    for name, view in views.items():
        out[name] = [
            _describe(
                u.name,
                getattr(type(u.phi), "type_name", type(u.phi).__name__),
                u.phi.config() if hasattr(u.phi, "config") else {},
                list(u.layers),
                _json(u.positions),
                _json(u.source_positions) if u.source_positions is not None else None,
                u.hook,
            )
            for u in view.units
        ]
    return out


def _show(key: str, value: Any) -> str:
    """A value as the user wrote it: a position spec as its string ('f2+l2'), the rest as is."""
    if key in ("positions", "source_positions") and value is not None:
        try:
            return repr(str(from_json(value)))
        except Exception:  # a spec saved by a newer reftlens: show its JSON
            pass
    return repr(value)


def _json(positions: Any) -> Any:
    try:
        return positions.to_json()
    except ValueError:
        return str(positions)


def _describe(
    name: str, phi_type: str, phi_config: Any, layers: Any, positions: Any, source: Any, hook: str
) -> dict[str, Any]:
    """What must match between a checkpoint and a resumed run, in JSON's terms (tuples are lists)."""
    return json.loads(
        json.dumps(
            {
                "name": name,
                "layers": layers,
                "positions": positions,
                "source_positions": source,
                "hook": hook,
                "Φ type": phi_type,
                # the initialisation only chose the first weights, which the checkpoint replaces
                "Φ configuration": {k: v for k, v in phi_config.items() if k != "init"}
                if isinstance(phi_config, dict)
                else phi_config,
            },
            default=repr,
        )
    )
