"""Save and load intervention sets: safetensors for tensors, JSON for everything else.

No pickle anywhere, so loading an untrusted folder never runs code: a saved set names each
Φ by its registered type name, and only registered types load. Writes are atomic, crash-safe and
one at a time (:func:`atomic_dir`); loads recover an interrupted write (:func:`recover`), read only
inside the folder (:func:`inside`) and check every size against the base model before building.

Folder layout::

    reft_config.json          schema version, Φ types and constructor arguments, units
                              (layers, positions, hook), dtypes, held rotations, base-model
                              fingerprint, the SHA-256 of the weights file, and the settings
                              the set was trained with (intervene_on, chat_template,
                              prepend_bos; null or absent: not recorded)
    reft_weights.safetensors  every Φ tensor, keyed phis.<i>.<name>

A bank of named sets saves each set as such a folder under ``sets/`` and lists them in order::

    reft_bank.json            {"format": "reftlens-bank", "sets": [{"name": ..., "folder": "sets/0000"}, ...]}
    sets/0000/                one set: reft_config.json + reft_weights.safetensors
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from reftlens.errors import LoadError, ReftError, SaveError
from reftlens.interventions.base import FunctionPhi, phi_class
from reftlens.interventions.directional import Scaled
from reftlens.interventions.subspace import OrthonormalRows
from reftlens.positions import from_json
from reftlens.runtime.bank import SetSettings, check_settings

if TYPE_CHECKING:
    pass

SCHEMA_VERSION = 1
CONFIG_FILE = "reft_config.json"
WEIGHTS_FILE = "reft_weights.safetensors"
BANK_FILE = "reft_bank.json"
_FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def fingerprint(model: Any) -> dict[str, Any]:
    """What a saved set must match: architecture and shapes of the base model, and a cheap check
    of its weights (:func:`weights_fingerprint`; absent where the model's transformers module
    cannot be reached)."""
    cfg = model.cfg
    out = {
        "architecture": getattr(cfg, "architecture", None),
        "d_model": int(cfg.d_model),
        "n_layers": int(cfg.n_layers),
        "d_vocab": int(cfg.d_vocab),
    }
    hf = getattr(model, "original_model", None)
    weights = weights_fingerprint(hf) if isinstance(hf, torch.nn.Module) else None
    return {**out, "weights": weights} if weights else out


def weights_fingerprint(hf: torch.nn.Module) -> dict[str, list[float]] | None:
    """A few numbers that tell one set of base weights from another of the same shape, cheaply:
    ``embedding``, 16 fixed entries of the input embedding and its mean and RMS; ``layer 0``, the
    mean and RMS of each weight of the first decoder layer (by name). Layout-free statistics, so
    a TransformerLens bridge and its plain transformers twin agree; compared with a tolerance
    (:func:`fingerprint_diff`), so the same model in bf16 and in fp32 agree."""
    from reftlens.runtime.hf_backend import decoder_layers

    try:
        emb = hf.get_input_embeddings().weight
        layer = decoder_layers(hf)[0]
    except Exception:
        return None
    if any(hasattr(t, "device_mesh") for t in [emb, *layer.parameters()]):
        # a base sharded across processes (reftlens.training.shard_base): reading its values is a
        # collective that a save on one rank would wait on forever, so the check is shapes only
        return None
    with torch.no_grad():
        W = emb.detach()
        rows = torch.linspace(0, W.shape[0] - 1, 4).long().tolist()
        cols = torch.linspace(0, W.shape[1] - 1, 4).long().tolist()
        out = {"embedding": [W[r, c].float().item() for r in rows for c in cols] + _stats(W)}
        out["layer 0"] = [x for _, w in sorted(layer.named_parameters()) for x in _stats(w.detach())]
    return {k: [float(f"{x:.6g}") for x in v] for k, v in out.items()}


def _stats(w: torch.Tensor, most: int = 1 << 16) -> list[float]:
    """Mean and RMS of at most ``most`` evenly strided entries of ``w`` (cheap on any model size)."""
    flat = w.reshape(-1)
    sample = flat[:: max(1, flat.numel() // most)].double()
    return [sample.mean().item(), sample.pow(2).mean().sqrt().item()]


def fingerprint_diff(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """How the base model ``here`` differs from the fingerprint a save recorded (empty: it matches).

    Shapes must be equal; the weight check compares each part within 2% (bf16 rounding passes,
    other weights do not), and is skipped for saves made before it was recorded."""
    diff = [
        f"{k}: saved {saved.get(k)!r}, model {v!r}" for k, v in here.items() if k != "weights" and saved.get(k) != v
    ]
    old, new = saved.get("weights"), here.get("weights")
    if diff or not isinstance(old, dict) or not isinstance(new, dict):
        return diff
    for part, values in new.items():
        kept = old.get(part)
        if not isinstance(kept, list) or len(kept) != len(values):
            continue  # recorded by another reftlens: nothing to compare
        a, b = torch.tensor(kept, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
        scale = float(a.abs().max()) if a.numel() else 0.0
        if not bool(torch.isfinite(a).all()) or bool(
            ((a - b).abs() > 0.02 * (a.abs() + b.abs()) / 2 + 1e-3 * scale).any()
        ):
            diff.append(
                f"the weights of its {part} differ (same shapes, other values: saved check {kept[:3]}..., "
                f"model {values[:3]}...)"
            )
    return diff


def _widths(model: Any) -> dict[str, int]:
    """The sizes a Φ of this model can have (a hook's width), by name."""
    cfg = model.cfg
    out = {"d_model": int(cfg.d_model)}
    for name in ("d_mlp", "d_head"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            out[name] = v
    if isinstance(getattr(cfg, "d_head", None), int) and isinstance(getattr(cfg, "n_heads", None), int):
        out["n_heads × d_head"] = cfg.d_head * cfg.n_heads
    return out


#: config keys of the registered Φs that are sizes (a width, or a rank below it): checked against
#: the base model before a Φ is built, so a damaged config never allocates a huge tensor
SIZE_KEYS = ("d_model", "vector", "mean", "directions", "rank", "k")


def _check_sizes(config: dict[str, Any], widths: dict[str, int], where: str) -> None:
    """Refuse an integer size in a Φ's config larger than every width of the base model."""
    limit = max(widths.values())
    for key in SIZE_KEYS:
        v = config.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= limit:
            shown = ", ".join(f"{k} {n}" for k, n in widths.items())
            raise LoadError(
                f"{where}.{key} is {v}, but the base model's widths are {shown}: no Φ of this model has a size "
                f"above {limit}. The save is damaged or belongs to another model; nothing was allocated."
            )


#: What identifies an earlier save that a new one may replace: each entry is a glob pattern, or a
#: tuple of patterns that must all match, for files at the top of the folder. This default
#: recognises every kind reftlens writes; each writer passes its own kind alone (``markers=``), so
#: it replaces its own earlier output and refuses another writer's.
EARLIER_SAVE_MARKERS: tuple[tuple[str, ...], ...] = (
    (CONFIG_FILE,),  # ReftModel.save
    (BANK_FILE,),  # ReftModel.save of a bank
    ("reftlens_export.json",),  # export.save_hf
    ("trainer_state.json",),  # training checkpoints
    ("config.json", "intkey_*.bin"),  # export.save_pyreft (pyreft/pyvene layout)
)


#: Test hook: called with the name of each step of :func:`atomic_dir` (see :data:`WRITE_STEPS`); the
#: fault-injection tests set it in a child process to kill it at that step. None in normal use.
_step_hook: Callable[[str], None] | None = None

#: The steps of a write, in order, at which :func:`atomic_dir` calls :data:`_step_hook`. "swapped" is
#: the one-call exchange (Linux ``renameat2(RENAME_EXCHANGE)``); "moved-aside" and "moved-in" are the
#: two renames used where the exchange is unavailable (``REFTLENS_NO_EXCHANGE=1`` forces them).
WRITE_STEPS = (
    "locked",
    "recovered",
    "tmp-created",
    "written",
    "synced",
    "moved-aside",
    "swapped",
    "moved-in",
    "cleaned",
)


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def atomic_dir(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    markers: Iterable[str | Sequence[str]] = EARLIER_SAVE_MARKERS,
) -> Path:
    """Write a folder atomically and crash-safely; one writer at a time.

    The protocol, all under an exclusive lock on the sibling file ``.NAME.lock`` (held with
    ``fcntl.flock``, so the kernel releases it when the process dies: no stale lock):

    1. recover: leftovers of an earlier, interrupted write are resolved (:func:`recover`): if
       ``path`` is missing but ``.NAME.old-*/NAME`` (the earlier save, moved aside) exists, it is
       moved back; every ``.NAME.tmp-*`` and ``.NAME.old-*`` is then deleted;
    2. ``write`` fills a new temporary sibling ``.NAME.tmp-*``; every file and folder is fsynced;
    3. the temporary folder takes the place of ``path``: on Linux by one ``renameat2`` call that
       exchanges the two (``path`` exists at every instant, old or new), elsewhere by moving the
       earlier save aside to ``.NAME.old-*/NAME`` and the new one in (a crash between the two
       leaves the earlier save there, which step 1 of the next write, or the next load, restores);
    4. the earlier save is deleted, the parent folder fsynced, the lock released.

    A kill at any instant therefore leaves ``path`` loadable as the old or the new content (or
    recoverable by the next access). ``path`` may be new, an empty folder, or an earlier save
    recognised by ``markers`` (see :data:`EARLIER_SAVE_MARKERS`), which is replaced whole. A file,
    or a folder holding anything else, raises :class:`~reftlens.errors.SaveError` before anything
    is written, and so does another process writing to ``path`` at the same time.
    """
    path, markers = Path(path).absolute(), list(markers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _step("locked")
        _recover(path)
        _step("recovered")
        check_save_target(path, markers=markers)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        _step("tmp-created")
        try:
            write(tmp)
            _step("written")
            _fsync_tree(tmp)  # make the bytes durable before the rename publishes them
            _step("synced")
            check_save_target(path, markers=markers)  # again: something may have appeared there while writing
            if path.exists() or path.is_symlink():
                if _exchange(tmp, path):  # tmp now holds the earlier save
                    _step("swapped")
                else:
                    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                    os.replace(path, old / path.name)
                    _step("moved-aside")
                    try:
                        os.replace(tmp, path)
                    except BaseException:
                        os.replace(old / path.name, path)  # put the earlier save back at once
                        raise
                    _step("moved-in")
                    _remove(old)
            else:
                os.replace(tmp, path)
                _step("moved-in")
            _fsync_dir(path.parent)
        finally:
            _remove(tmp)
        _step("cleaned")
    return path


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """The ``.NAME.tmp-*`` and ``.NAME.old-*`` siblings of ``path`` (newest first)."""
    parent = path.parent
    if not parent.is_dir():
        return [], []

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    tmps = sorted(parent.glob(f".{glob.escape(path.name)}.tmp-*"), key=mtime, reverse=True)
    olds = sorted(parent.glob(f".{glob.escape(path.name)}.old-*"), key=mtime, reverse=True)
    return tmps, olds


def _recover(path: Path) -> None:
    """Resolve what an interrupted write left (the caller holds the lock): restore the earlier
    save if ``path`` is missing, then delete every temporary and moved-aside folder."""
    tmps, olds = _leftovers(path)
    if not path.exists() and not path.is_symlink():
        for old in olds:
            if (old / path.name).is_dir():
                os.replace(old / path.name, path)
                _fsync_dir(path.parent)
                break
    for leftover in tmps + olds:
        _remove(leftover)


def _remove(p: Path) -> None:
    """Delete a leftover: a folder with its contents, or a link or file itself (never a link's target)."""
    if p.is_symlink() or p.is_file():
        try:
            p.unlink()
        except OSError:
            pass
    else:
        shutil.rmtree(p, ignore_errors=True)


def recover(path: str | os.PathLike) -> Path:
    """Make ``path`` readable after an interrupted :func:`atomic_dir` write; returns the folder to read.

    Every load calls this first. When no write is in progress it does what step 1 of
    :func:`atomic_dir` does (restore the earlier save moved aside, delete leftovers). Where the lock
    cannot be taken (a read-only folder) it returns the moved-aside earlier save to read from, if
    ``path`` itself is missing. While another process writes to ``path`` it changes nothing, and a
    missing ``path`` raises :class:`~reftlens.errors.LoadError` (the write is not finished)."""
    path = Path(path).absolute()
    tmps, olds = _leftovers(path)
    if not tmps and not olds:
        return path
    try:
        with _locked(path):
            _recover(path)
        return path
    except SaveError:  # another process is writing
        if path.exists():
            return path
        raise LoadError(
            f"{path} is being written by another process right now (its earlier save is moved aside); "
            "load it again when that save has finished."
        ) from None
    except OSError:  # cannot take the lock (read-only): read the moved-aside save in place
        if path.exists():
            return path
        for old in olds:
            if (old / path.name).is_dir():
                return old / path.name
        return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive write lock of ``path`` (the sibling file ``.NAME.lock``), or raise
    :class:`~reftlens.errors.SaveError` naming the folder if another process holds it.

    The lock is ``fcntl.flock`` on the file, so a killed holder never leaves a stale lock; the
    file is deleted on release (re-checking after locking that it is still the file at that path)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer at a time is then up to the caller
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise SaveError(
                f"cannot save to {path}: another process (pid {holder}) is writing to it right now (it holds "
                f"{lock.name}). Two concurrent writes to one folder are refused so that one wins whole; wait for "
                "the other save to finish, or save to another folder."
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder deleted the file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic call (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if os.environ.get("REFTLENS_NO_EXCHANGE") == "1" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), folder]:
        _fsync_dir(d)


def check_save_target(
    path: str | os.PathLike, *, markers: Iterable[str | Sequence[str]] = EARLIER_SAVE_MARKERS
) -> None:
    """Raise :class:`~reftlens.errors.SaveError` unless ``path`` is missing, an empty folder or an
    earlier save recognised by ``markers`` (as :func:`atomic_dir` takes them). Writes nothing, so a
    long job (training) can check where it will save before it starts."""
    path = Path(path).absolute()
    groups = [(m,) if isinstance(m, str) else tuple(m) for m in markers]
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        what = "a file" if path.is_file() else "not a folder (a broken link or a special file)"
        raise SaveError(
            f"cannot save to {path}: it is {what}, and a save is a folder. Choose a new folder path (or an "
            "empty folder); the file was left untouched."
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries or any(all(any(f.is_file() for f in path.glob(pattern)) for pattern in group) for group in groups):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    kinds = " or ".join(" with ".join(group) for group in groups)
    raise SaveError(
        f"cannot save to {path}: the folder holds other files ({shown}) and is not an earlier save to replace "
        f"(it has no {kinds}). Save to a new or empty folder, or move those files away first; nothing in the "
        "folder was touched."
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _phi_record(phi: torch.nn.Module) -> dict[str, Any]:
    if isinstance(phi, FunctionPhi):
        raise ReftError(
            f"Φ {phi.extra_repr()!r} is a plain function and cannot be saved; write it as a reftlens.Phi "
            "subclass registered with @reftlens.register('name')."
        )
    if isinstance(phi, Scaled):
        raise ReftError(
            f"Φ Scaled({phi.config()['phi']}) is a view for running several α at once and is not saved; save the set "
            "it was made from (reft.save(path)), or bake a fixed α into the Φ (e.g. Steer(v, alpha=α))."
        )
    type_name = getattr(type(phi), "type_name", "")
    try:
        registered = phi_class(type_name) if type_name else None
    except KeyError:
        registered = None
    if registered is not type(phi):
        raise ReftError(
            f"Φ {type(phi).__name__} is not registered, so a save could not name it. Decorate the class with "
            "@reftlens.register('name') and give it a config() returning its constructor arguments."
        )
    config = phi.config() if hasattr(phi, "config") else {}
    dtypes = {t.dtype for t in phi.state_dict().values() if t.is_floating_point()}
    record = {
        "type": type_name,
        "config": config,
        "dtype": str(next(iter(dtypes))).removeprefix("torch.") if dtypes else None,
    }
    # rows held at exactly their saved value (e.g. pyreft's R, see OrthonormalRows): held again on load
    held = [name for name, m in phi.named_modules() if isinstance(m, OrthonormalRows) and m.is_held]
    return {**record, "held": held} if held else record


def save(reft: Any, path: str | os.PathLike, *, adapter: str | None = None) -> Path:
    """Write the interventions of ``reft`` (anything with ``phis``, ``units``, ``cast`` and
    ``model``, e.g. a ReftModel) to the folder ``path`` (atomically). ``path`` must be new, an
    empty folder or an earlier save (it holds ``reft_config.json`` or ``reft_bank.json``), which is
    replaced. A bank writes every set; ``adapter=`` writes that one set as a plain save."""
    markers = [CONFIG_FILE, BANK_FILE]
    if adapter is not None:
        if not is_named(reft):
            raise ReftError(f"there is no set {adapter!r} to save; the sets are none (not a bank).")
        view = set_view(reft, adapter)
        return atomic_dir(path, lambda folder: write(view, folder), markers=markers)
    if is_named(reft):
        return atomic_dir(path, lambda folder: write_bank(reft, folder), markers=markers)
    return atomic_dir(path, lambda folder: write(reft, folder), markers=markers)


def is_named(reft: Any) -> bool:
    """Whether ``reft`` (a ReftModel's or an export's sets) is a bank of named sets, saved as a bank;
    a plain set (a bank of one) is saved as one set."""
    sets = getattr(reft, "sets", None)
    return bool(getattr(sets, "named", getattr(reft, "named", False)))


def bank_sets(units: Sequence[Any]) -> dict[str, list[Any]]:
    """Units by set, in order (a plain set's under its one name)."""
    sets: dict[str, list[Any]] = {}
    for u in units:
        sets.setdefault(u.adapter, []).append(u)
    return sets


def set_view(reft: Any, adapter: str) -> Any:
    """One set, as ``write`` takes it: its Φs, its units under their names within the set, its settings."""
    import dataclasses

    sets = bank_sets(reft.units)
    if adapter not in sets:
        raise ReftError(f"there is no set {adapter!r} to save; the sets are {list(sets)}.")
    units = [dataclasses.replace(u, name=u.name.removeprefix(f"{adapter}/")) for u in sets[adapter]]
    phis = list({id(u.phi): u.phi for u in units}.values())
    settings = {adapter: _settings_of(reft).get(adapter, SetSettings())}
    return SimpleNamespace(
        phis=phis, units=units, cast=reft.cast, model=getattr(reft, "model", None), settings=settings
    )


def _settings_of(reft: Any) -> dict[Any, SetSettings]:
    return dict(getattr(reft, "settings", None) or {})


def write_bank(
    reft: Any, folder: Path, base: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> None:
    """Write every set of a bank into ``folder`` (``sets/<i>/`` each, and ``reft_bank.json``)."""
    listed = []
    for i, name in enumerate(bank_sets(reft.units)):  # every set, in order
        sub = f"sets/{i:04d}"
        (folder / sub).mkdir(parents=True)
        write(set_view(reft, name), folder / sub, base, extra)
        listed.append({"name": name, "folder": sub})
    (folder / BANK_FILE).write_text(
        json.dumps({"format": "reftlens-bank", "schema_version": SCHEMA_VERSION, "sets": listed}, indent=2) + "\n"
    )


def is_bank(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a saved bank (rather than one set)."""
    return (Path(path) / BANK_FILE).is_file()


def bank_folders(path: str | os.PathLike) -> dict[str, Path]:
    """A saved bank's sets: name → folder, in order. Each folder must lie inside the bank's folder
    (a relative path, no ``..``, no link leading out), else :class:`~reftlens.errors.LoadError`."""
    file = Path(path) / BANK_FILE
    try:
        meta = json.loads(inside(path, BANK_FILE, f"{file}").read_text())
        listed = meta["sets"]
        out = {e["name"]: e["folder"] for e in listed}
        if (
            meta.get("format") != "reftlens-bank"
            or not out
            or not all(isinstance(n, str) for n in out)
            or not all(isinstance(f, str) for f in out.values())
        ):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise LoadError(
            f"{file} is not a reftlens bank index (format 'reftlens-bank' with a non-empty list of "
            "sets, each a name and a folder); the save is damaged."
        ) from None
    return {name: inside(path, sub, f"{file}: set {name!r} folder") for name, sub in out.items()}


def inside(folder: str | os.PathLike, relative: Any, where: str) -> Path:
    """``folder / relative``, refused with :class:`~reftlens.errors.LoadError` (naming ``where``)
    unless it stays inside ``folder``: a relative path without ``..`` that, links followed,
    resolves inside ``folder``. Every path a load reads from a config or index goes through this,
    so a damaged or hostile save cannot make a load read another folder's files."""
    if not isinstance(relative, str) or not relative:
        raise LoadError(f"{where} must be a non-empty relative path inside {folder}; got {_kind(relative)}.")
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or relative.startswith(("/", "\\")) or "\x00" in relative:
        raise LoadError(
            f"{where} is {relative!r}, which leads out of {folder}: a save may only name files inside its own "
            "folder (relative paths, no '..'). The save is damaged or was edited by hand; nothing was read."
        )
    root = Path(folder).resolve()
    target = (Path(folder) / rel).resolve()
    if target != root and root not in target.parents:
        raise LoadError(
            f"{where}: {Path(folder) / rel} is a link to {target}, outside {root}. A save may only read files "
            "inside its own folder; copy the files in instead of linking them. Nothing was read."
        )
    return Path(folder) / rel


def write(reft: Any, folder: Path, base: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write the two files of a save into an existing folder (not atomic by itself).

    ``reft`` is anything with ``phis``, ``units`` and ``cast`` (a plain ReftModel, one set's view, or
    the exported interventions of an HF model), and ``settings`` (set name → SetSettings: its one
    set's are written); ``base`` is the base-model fingerprint (default: from ``reft.model``);
    ``extra`` goes into the config as is.
    """
    from safetensors.torch import save_file

    index = {id(phi): i for i, phi in enumerate(reft.phis)}
    records = [_phi_record(phi) for phi in reft.phis]
    tensors = {
        f"phis.{i}.{k}": v.detach().to("cpu").contiguous().clone()
        for i, phi in enumerate(reft.phis)
        for k, v in phi.state_dict().items()
    }
    units = []
    for u in reft.units:
        try:
            positions = u.positions.to_json()
            source = u.source_positions.to_json() if u.source_positions is not None else None
        except ValueError as e:
            raise ReftError(f"intervention {u.name!r}: {e}") from None
        units.append(
            {
                "name": u.name,
                "phi": index[id(u.phi)],
                "layers": list(u.layers),
                "positions": positions,
                "source_positions": source,
                "hook": u.hook,
                "stack": u.stack,
            }
        )
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "format": "reftlens",
        "schema_version": SCHEMA_VERSION,
        "reftlens_version": _version(),
        "phis": records,
        "units": units,
        "cast": reft.cast,
        "base_model": base if base is not None else fingerprint(reft.model),
        "weights_sha256": sha256(folder / WEIGHTS_FILE),
        **_one_set_settings(reft).to_json(),
        **(extra or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _one_set_settings(reft: Any) -> SetSettings:
    settings = list(_settings_of(reft).values())
    return settings[0] if len(settings) == 1 else SetSettings()


def settings_of(config: dict[str, Any], where: str = CONFIG_FILE) -> SetSettings:
    """The settings a saved set records (a save without them: not recorded, the defaults)."""
    values = {k: config.get(k) for k in ("intervene_on", "chat_template", "prepend_bos")}
    check_settings(values, where, LoadError)
    return SetSettings(**values)


def read(
    path: str | os.PathLike,
    here: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
    widths: dict[str, int] | None = None,
) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    """Read and check a save against the base-model fingerprint ``here``: ``(config, phis)``.

    ``widths``: the base model's widths by name (default: its ``d_model``); every size in a Φ's
    config must be at most the largest, checked before any Φ is built.

    Every field of the config is checked (a wrong one raises :class:`LoadError` naming the file
    and the field, e.g. ``phis[0].type``) before any tensor is read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for f in (config_path, weights_path):
        if not f.is_file():
            raise LoadError(f"{folder} is not a reftlens save: {f.name} is missing. Save with reft.save(path).")
        inside(folder, f.name, f"{folder}: {f.name}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{config_path} is not valid JSON ({e}); the save is damaged.") from None
    except UnicodeDecodeError as e:
        raise LoadError(f"{config_path} is not UTF-8 text ({e}); the save is damaged.") from None
    if not isinstance(config, dict):
        raise LoadError(
            f"{config_path} must hold a JSON object (the reftlens config); got {_kind(config)}. The save is damaged."
        )
    if config.get("format") != "reftlens":
        raise LoadError(f"{config_path} is not a reftlens config (format={config.get('format')!r}).")
    version = config.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise LoadError(
            f"{folder} was saved with schema version {version} by reftlens {config.get('reftlens_version')}; this "
            f"reftlens ({_version()}) reads up to version {SCHEMA_VERSION}. Upgrade reftlens to load it."
        )
    saved = config.get("base_model")
    if not isinstance(saved, dict):
        raise LoadError(
            f"{config_path}: base_model must be an object with the base model's {', '.join(here)}; got {_kind(saved)}. "
            "The save is damaged."
        )
    diff = fingerprint_diff(saved, here)
    if diff:
        raise LoadError(
            f"{folder} was trained on a different base model ({'; '.join(diff)}). Load it onto the model it was trained on."
        )
    settings_of(config, str(config_path))
    classes = _check_phis(config, config_path)
    _check_units(config, str(config_path), len(classes), here.get("n_layers"))
    if sha256(weights_path) != config.get("weights_sha256"):
        raise LoadError(
            f"{weights_path} does not match the checksum in {CONFIG_FILE}: the file is truncated or was modified."
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{weights_path} cannot be read ({e}).") from None

    phis = []
    bounds = widths or {"d_model": int(here["d_model"])}
    for i, rec in enumerate(config["phis"]):  # every size first: nothing is allocated for a damaged config
        _check_sizes(rec["config"], bounds, f"{config_path}: phis[{i}].config")
    for i, (rec, cls) in enumerate(zip(config["phis"], classes)):
        phi = _build_phi(cls, rec["config"], f"{config_path}: phis[{i}].config")
        if rec["dtype"] is not None:  # load_state_dict copies into the existing dtype: match the saved one first
            phi.to(_FLOAT_DTYPES[rec["dtype"]])
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"phis.{i}.")}
        for k, v in state.items():
            if (
                rec["dtype"] is not None
                and v.is_floating_point()
                and str(v.dtype).removeprefix("torch.") != rec["dtype"]
            ):
                raise LoadError(f"Φ {i} ({rec['type']}): tensor {k} is {v.dtype} but the config says {rec['dtype']}.")
        try:
            phi.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise LoadError(f"Φ {i} ({rec['type']}) does not match its saved tensors: {e}") from None
        _hold(phi, rec.get("held", []), f"{config_path}: phis[{i}].held")
        if dtype is not None:  # after the hold: .to casts A and its held value alike
            phi.to(dtype)
        phis.append(phi)
    return config, phis


def _hold(phi: torch.nn.Module, names: Any, where: str) -> None:
    """Hold the OrthonormalRows submodules ``names`` of a loaded Φ at their saved value."""
    modules = dict(phi.named_modules())
    if not isinstance(names, list) or not all(isinstance(modules.get(n), OrthonormalRows) for n in names):
        rows = [n for n, m in modules.items() if isinstance(m, OrthonormalRows)]
        raise LoadError(
            f"{where} must list submodules with orthonormal rows of this Φ (out of {rows}); got {_kind(names)}. "
            "The save is damaged."
        )
    for n in names:
        modules[n].hold()


def _kind(value: Any) -> str:
    """A short description of a JSON value for messages: ``a list ["loreft"]``, ``null``."""
    if value is None:
        return "null"
    name = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return f"{name} {text}" if len(text) <= 60 else name


def _check_phis(config: dict[str, Any], config_path: Path) -> list[type[torch.nn.Module]]:
    """Check the ``phis`` records; return each one's registered class."""
    records = config.get("phis")
    if not isinstance(records, list):
        raise LoadError(f"{config_path}: phis must be a list of Φ records; got {_kind(records)}. The save is damaged.")
    classes = []
    for i, rec in enumerate(records):
        where = f"{config_path}: phis[{i}]"
        if not isinstance(rec, dict):
            raise LoadError(
                f"{where} must be an object with type, config and dtype; got {_kind(rec)}. The save is damaged."
            )
        missing = [k for k in ("type", "config", "dtype") if k not in rec]
        if missing:
            raise LoadError(
                f"{where} lacks {', '.join(missing)}; a Φ record needs type, config and dtype. The save is damaged."
            )
        if not isinstance(rec["type"], str):
            raise LoadError(f"{where}.type must be a string naming a registered Φ type; got {_kind(rec['type'])}.")
        try:
            classes.append(phi_class(rec["type"]))
        except KeyError as e:
            raise LoadError(f"{where}.type: {e.args[0]}") from None
        if not isinstance(rec["config"], dict):
            raise LoadError(
                f"{where}.config must be an object of {rec['type']!r}'s constructor arguments; got {_kind(rec['config'])}."
            )
        if rec["dtype"] is not None and rec["dtype"] not in _FLOAT_DTYPES:
            raise LoadError(f"{where}.dtype must be null or one of {sorted(_FLOAT_DTYPES)}; got {_kind(rec['dtype'])}.")
    return classes


def _build_phi(cls: type[torch.nn.Module], config: dict[str, Any], where: str) -> torch.nn.Module:
    """``cls(**config)``, with a wrong argument set reported by name."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        required = [
            p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
        ]
        unknown, missing = sorted(set(config) - set(named)), [n for n in required if n not in config]
        if unknown or missing:
            problems = ([f"unknown key(s) {unknown}"] if unknown else []) + (
                [f"missing key(s) {missing}"] if missing else []
            )
            raise LoadError(
                f"{where} has {' and '.join(problems)} for Φ type {getattr(cls, 'type_name', cls.__name__)!r}, "
                f"whose constructor takes {named}. The save is damaged or was written for another version of this Φ."
            )
    try:
        return cls(**config)
    except Exception as e:
        raise LoadError(
            f"{where} cannot build Φ type {getattr(cls, 'type_name', cls.__name__)!r}: {type(e).__name__}: {str(e).rstrip('.')}. "
            "The save is damaged or was written for another version of this Φ."
        ) from e


_UNIT_FIELDS = ("name", "phi", "layers", "positions", "source_positions", "hook")


def _check_units(config: dict[str, Any], file: str, n_phis: int, n_layers: int | None) -> None:
    """Check the ``units`` records of a config (``file`` names it in messages)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    units = config.get("units")
    if not isinstance(units, list):
        raise LoadError(
            f"{file}: units must be a list of intervention records; got {_kind(units)}. The save is damaged."
        )
    if "cast" in config and not isinstance(config["cast"], bool):
        raise LoadError(f"{file}: cast must be true or false; got {_kind(config['cast'])}.")
    for i, u in enumerate(units):
        where = f"{file}: units[{i}]"
        if not isinstance(u, dict):
            raise LoadError(
                f"{where} must be an object with {', '.join(_UNIT_FIELDS)}; got {_kind(u)}. The save is damaged."
            )
        missing = [k for k in _UNIT_FIELDS if k not in u]
        if missing:
            raise LoadError(
                f"{where} lacks {', '.join(missing)}; a unit needs {', '.join(_UNIT_FIELDS)}. The save is damaged."
            )
        if not isinstance(u["name"], str):
            raise LoadError(f"{where}.name must be a string; got {_kind(u['name'])}.")
        if not is_int(u["phi"]) or not 0 <= u["phi"] < n_phis:
            raise LoadError(
                f"{where}.phi must be the index of one of the {n_phis} saved Φs (0..{n_phis - 1}); got {_kind(u['phi'])}."
            )
        layers = u["layers"]
        if (
            not isinstance(layers, list)
            or not layers
            or not all(is_int(l) for l in layers)
            or len(set(layers)) != len(layers)
        ):
            raise LoadError(f"{where}.layers must be a non-empty list of distinct layer indices; got {_kind(layers)}.")
        if n_layers is not None and not all(0 <= l < n_layers for l in layers):
            raise LoadError(
                f"{where}.layers {layers} name a layer the model lacks; the model has layers 0..{n_layers - 1}."
            )
        for key in ("positions", "source_positions"):
            if key == "source_positions" and u[key] is None:
                continue
            try:
                from_json(u[key])
            except ValueError as e:
                raise LoadError(f"{where}.{key}: {e}") from None
        if not isinstance(u["hook"], str) or not u["hook"]:
            raise LoadError(
                f"{where}.hook must be a TransformerLens hook name such as 'resid_post'; got {_kind(u['hook'])}."
            )
        if u.get("stack") is not None and not is_int(u["stack"]):
            raise LoadError(f"{where}.stack must be null or an int; got {_kind(u['stack'])}.")


def interventions(config: dict[str, Any], phis: list[torch.nn.Module]) -> list[Any]:
    """The saved units as Interventions (each holding its saved Φ; tied units share one).

    A bad unit record raises :class:`LoadError` naming ``units[i]`` and the field."""
    from reftlens.sets import Intervention

    base = config.get("base_model")
    _check_units(config, CONFIG_FILE, len(phis), base.get("n_layers") if isinstance(base, dict) else None)
    out = []
    for i, u in enumerate(config["units"]):
        try:
            out.append(
                Intervention(
                    phis[u["phi"]],
                    layers=u["layers"],
                    positions=from_json(u["positions"]),
                    hook=u["hook"],
                    source_positions=from_json(u["source_positions"]) if u["source_positions"] is not None else None,
                    stack=u.get("stack"),
                    name=u["name"],
                )
            )
        except ReftError as e:
            raise LoadError(f"{CONFIG_FILE}: units[{i}] ({u['name']!r}): {e}") from None
    return out


@dataclass
class LoadedSets:
    """What :func:`load_sets` reads: each set's interventions and settings (a plain save's under
    ``"default"``), the cast to use, and whether it was a bank (``named``)."""

    sets: dict[str, list[Any]]
    settings: dict[str, SetSettings]
    cast: bool
    named: bool


def load_sets(
    path: str | os.PathLike,
    model: Any,
    *,
    dtype: torch.dtype | None = None,
    cast: bool | None = None,
    adapter: str | None = None,
) -> LoadedSets:
    """Read a saved set or bank for ``model``, everything checked before anything is returned;
    with ``adapter=`` one set of a saved bank, as a plain set."""
    from reftlens.runtime.bank import DEFAULT

    path = recover(path)
    if is_bank(path):
        folders = bank_folders(path)
        if adapter is not None:
            if adapter not in folders:
                raise LoadError(f"the bank saved at {path} has no set {adapter!r}; its sets are {list(folders)}.")
            return load_sets(folders[adapter], model, dtype=dtype, cast=cast)
        loaded = {name: load_sets(folder, model, dtype=dtype, cast=cast) for name, folder in folders.items()}
        return LoadedSets(
            {name: one.sets[DEFAULT] for name, one in loaded.items()},
            {name: one.settings[DEFAULT] for name, one in loaded.items()},
            any(one.cast for one in loaded.values()),
            True,
        )
    if adapter is not None:
        raise LoadError(
            f"{path} holds one set, not a bank, so it has no set {adapter!r} to pick; load it without adapter=."
        )
    config, phis = read(path, fingerprint(model), dtype=dtype, widths=_widths(model))
    model_dtype = next(model.parameters()).dtype
    use_cast = config.get("cast", False) if cast is None else cast
    phi_dtypes = {t.dtype for p in phis for t in p.state_dict().values() if t.is_floating_point()}
    if not use_cast and phi_dtypes - {model_dtype}:
        raise LoadError(
            f"the saved Φs are {sorted(str(d) for d in phi_dtypes)} but the model is {model_dtype}. Pass "
            f"dtype={model_dtype} to convert them, or cast=True to run them in their own precision."
        )
    return LoadedSets({DEFAULT: interventions(config, phis)}, {DEFAULT: settings_of(config)}, use_cast, False)


def load(
    path: str | os.PathLike,
    model: Any,
    *,
    dtype: torch.dtype | None = None,
    cast: bool | None = None,
    adapter: str | None = None,
) -> tuple[Any, bool]:
    """Read a saved set for ``model``: ``(interventions, cast)``. Everything is checked before
    anything is returned; :meth:`reftlens.ReftModel.load` wraps the result (with the settings, see
    :func:`load_sets`). A saved bank gives a dict of named sets, or with ``adapter=`` the list of
    that one set."""
    loaded = load_sets(path, model, dtype=dtype, cast=cast, adapter=adapter)
    return (loaded.sets if loaded.named else next(iter(loaded.sets.values()))), loaded.cast


def _version() -> str:
    from reftlens.version import __version__

    return __version__
