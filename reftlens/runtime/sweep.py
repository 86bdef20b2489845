"""Many variants of one run, batched: the engine under every analysis.

A sweep holds a *base* run (token ids, optionally with a base set of interventions active on
every row, e.g. a causal-tracing corruption or a trained ReFT) and an optional *source* run (for
Φs with a source, e.g. the clean run of activation patching). Each *variant* is a list of
:class:`~reftlens.Intervention` applied on top of the base run; every variant's metric comes from
its own rows of a batched forward. Variants are ⟨Φ, P, L⟩ like any other, so a user-defined Φ swept
over layers × positions gets every trick the built-in patching gets:

- variants run as rows of one batch (up to ``batch_size`` rows a forward), the rows that share a
  hook and a Φ as one gather → Φ → scatter;
- ``strategy="replay"``: an edit at (block l, position p) leaves the blocks below l, and under
  causal attention the positions before p, as they were in the base run, so each variant starts
  at its first edited block from the recorded base run, covers positions p.. with the recorded keys
  and values of the earlier ones (:mod:`reftlens.runtime.replay`);
- ``read``: only the positions whose logits a metric reads are unembedded.

:class:`Sweep` holds what every strategy shares — the bound base set, the source run and its kept
activations, the variants bound to their sites — and delegates the running to an executor:
``_Whole`` (whole forwards) or ``_Replayed`` (block replay). An executor is a small object with the
three methods that differ (the base run's logits, the schedule of chunks, one chunk's forward); the
hooks both attach, the base set's and the variants' edits, come from one pair of helpers on their
common base class, over a row layout (``_Rows``) that says which rows run at which block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from reftlens.errors import AnalysisError, ConfigError, UnsupportedReplay
from reftlens.positions import RealTokens
from reftlens.progress import check_progress, progress_bar
from reftlens.runtime.kernel import check_finite_source, site_hook
from reftlens.runtime.plan import Site, SitePlan, flat_index
from reftlens.runtime.replay import BlockReplay, block_of
from reftlens.runtime.tl_backend import bind, hooked
from reftlens.sets import Intervention, Unit

# "auto" replays from this model size on (measured: a 0.3M-parameter model sweeps ~4x faster in
# packed whole forwards, SmolLM2-135M ~2x faster replayed)
REPLAY_MIN_PARAMS = 20_000_000

Consume = Callable[[list[int], Tensor], None]


@dataclass(eq=False)
class _Bound:
    """One unit of a variant (or of the base set) bound to one layer's hook, with its site mask
    over the base examples ``[B, S]`` and, for Φs with a source, its source rows (example-major)."""

    site: Site
    mask: Tensor
    slot: int = 0
    source_rows: list[Tensor] | None = None


class Sweep:
    """A base run (and a source run) to evaluate many variants against.

    Args:
        model: a TransformerLens bridge.
        tokens: the base run's token ids ``[B, S]`` (unpadded).
        base: interventions active on every row of every variant (Φs without a source).
        sources: token ids of the source run (``[B, S']`` or ``[1, S']``, broadcast), for Φs with a source.
        source_base: interventions active in the source run.
        strategy: ``"replay"``, ``"batch"`` (whole forwards) or ``"auto"`` (replay from
            ``REPLAY_MIN_PARAMS`` parameters on, or whenever the base set needs it).
        batch_size: the most rows in one forward.
        check_finite: refuse NaN or inf in the source rows a variant patches in (default True;
            :class:`~reftlens.errors.NonFiniteError` names the intervention, example and position).
        keep: hooks whose source activations the variants will read, kept by the first source run
            (which, with no base or source set and sources shaped like ``tokens``, is one forward
            with the base run); hooks not named here cost a source forward when first read.

    ``base_logits`` and ``source_logits`` hold the two reference runs; ``strategy`` is the one
    chosen (``"replay"`` or ``"batch"``) and ``executor`` the object that runs it.
    """

    def __init__(
        self,
        model: Any,
        tokens: Tensor,
        *,
        base: Sequence[Intervention] = (),
        sources: Tensor | None = None,
        source_base: Sequence[Intervention] = (),
        strategy: str = "auto",
        batch_size: int = 128,
        cast: bool = False,
        check_finite: bool = True,
        keep: Sequence[str] = (),
    ) -> None:
        if strategy not in ("auto", "replay", "batch"):
            raise AnalysisError(f"strategy must be 'auto', 'replay' or 'batch'; got {strategy!r}.")
        self.model = model
        self.tokens = tokens
        self.batch, self.seq = tokens.shape
        self.batch_size = max(batch_size, self.batch)
        self.cast = cast
        self.check_finite = check_finite
        self.n_layers = model.cfg.n_layers
        self.real = RealTokens.unpadded(self.batch, self.seq, tokens.device)
        self._hook_dict = model.hook_dict  # rebuilt by TransformerLens on every access: read once
        self._masks: dict[tuple, Tensor] = {}
        self.base = [b for u in _units(base, self.n_layers) for b in self._bind_unit(u)]
        if any(b.site.unit.takes_source for b in self.base):
            raise ConfigError(
                "a sweep's base interventions must not take a source; put Φs with a source in the variants."
            )
        stochastic = [b.site.unit.name for b in self.base if not getattr(b.site.unit.phi, "row_wise", True)]
        self._acts: dict[str, Tensor] = {}
        self._finite: dict[str, bool] = {}  # per kept source activation: no NaN or inf anywhere
        self._source_tokens = sources
        self._source_base = list(source_base)
        self.source_logits: Tensor | None = None
        unknown = [n for n in keep if n not in self._hook_dict]
        if unknown:
            raise ConfigError(
                f"keep names hooks this model does not have: {unknown[:3]}; use names such as "
                "'blocks.0.hook_resid_pre' (model.hook_dict)."
            )
        self._keep = set(keep)  # kept by the first source run, whenever it happens

        auto = strategy == "auto"
        if auto:
            big = sum(p.numel() for p in model.parameters()) >= REPLAY_MIN_PARAMS
            strategy = "replay" if big or stochastic else "batch"
        executor: _Executor | None = None
        if strategy == "replay":
            try:
                executor = _Replayed(self)
            except UnsupportedReplay as e:
                if not auto or stochastic:
                    raise AnalysisError(
                        f"strategy='replay' is not available here ({e}); use strategy='batch'"
                        + (f" (and no {stochastic[0]!r} in the base set)" if stochastic else "")
                        + "."
                    ) from e
        if executor is None and stochastic:
            raise AnalysisError(
                f"base intervention {stochastic[0]!r} draws fresh values per call, so the variants of one "
                "example would see different values in whole forwards; use strategy='replay'."
            )
        self.executor: _Executor = executor or _Whole(self)
        self.strategy = self.executor.strategy
        self.base_logits = self.executor.base_logits()

    # ---- binding -----------------------------------------------------------------------

    def _bind_unit(self, unit: Unit, slot: int = 0) -> list[_Bound]:
        mask = self._site_mask(unit.positions, self.real)
        return [_Bound(site, mask, slot) for site in bind(self.model, [unit], self._hook_dict)]

    def _site_mask(self, spec: Any, real: RealTokens) -> Tensor:
        """``spec.site_mask(real)``, once per spec and input shape (a sweep's variants repeat them;
        the masks are never written to)."""
        try:
            key = (spec, tuple(real.mask.shape))
            hash(key)
        except TypeError:  # a spec that cannot be a key (e.g. holds a list) is resolved every time
            return spec.site_mask(real)
        if key not in self._masks:
            self._masks[key] = spec.site_mask(real)
        return self._masks[key]

    # ---- the source run ----------------------------------------------------------------

    def _source_acts(self, names: set[str], with_base: bool = False) -> Tensor | None:
        """Run the source once (again only for hooks not kept yet) and keep the full activation at
        every hook in ``names``; the first run also keeps the source logits. ``with_base``: the
        plain base run goes as the first rows of the same forward (no set active on either side),
        and its logits are returned."""
        names = {
            self._hook_dict[n].name or n if n in self._hook_dict else n for n in names | self._keep
        }  # aliases → site names
        missing = sorted(names - set(self._acts))
        if not missing and self.source_logits is not None:
            return None
        if self._source_tokens is None:
            raise ConfigError("a variant holds a Φ that takes a source, but the sweep has no sources=.")
        kept: dict[str, Tensor] = {}
        first = self.batch if with_base else 0  # the source's first row

        def keep(name: str) -> Callable:
            def fn(h: Tensor, hook: Any = None) -> None:
                kept[name] = h[first:].detach()

            return fn

        src_real = RealTokens.unpadded(*self._source_tokens.shape, self._source_tokens.device)
        src_hooks = [
            (
                s.hook_point,
                site_hook(
                    SitePlan(
                        s, flat_index(s.unit.positions.site_mask(src_real)), None, tuple(self._source_tokens.shape)
                    ),
                    self.cast,
                ),
            )
            for s in bind(self.model, _units(self._source_base, self.n_layers), self._hook_dict)
        ]
        points = [self._hook_dict[n] for n in missing]
        tokens = torch.cat([self.tokens, self._source_tokens]) if with_base else self._source_tokens
        with hooked(self.model, src_hooks + [(p, keep(n)) for p, n in zip(points, missing)]), torch.no_grad():
            logits = self.model(tokens)
        if self.source_logits is None:
            self.source_logits = logits[first:]
        self._acts.update(kept)
        if self.check_finite:
            self._finite.update({n: bool(torch.isfinite(h).all()) for n, h in kept.items()})
        return logits[:first] if with_base else None

    def source_run(self) -> Tensor:
        """The source run's logits."""
        self._source_acts(set())
        return self.source_logits

    def activation(self, name: str) -> Tensor:
        """The source run's activation at hook ``name`` ``[B, S', ...]``."""
        self._source_acts({name})
        return self._acts[self._hook_dict[name].name or name if name in self._hook_dict else name]

    # ---- variants ----------------------------------------------------------------------

    def _variant_units(self, variant: Sequence[Intervention]) -> list[_Bound]:
        bound: list[_Bound] = []
        seen: dict[tuple[str, int], int] = {}
        for unit in _units(variant, self.n_layers):
            for b in self._bind_unit(unit):
                key = (b.site.hook_name, id(unit.phi))
                b.slot = seen.get(key, 0)
                seen[key] = b.slot + 1
                bound.append(b)
        return bound

    def _pair_sources(self, bound: list[list[_Bound]]) -> None:
        """Give every unit with a source its source rows, from one source run that keeps every
        hook the variants read (one run per new hook would redo the whole forward each time)."""
        wanted = [b for bs in bound for b in bs if b.site.unit.takes_source]
        if not wanted:
            return
        self._source_acts({b.site.hook_name for b in wanted})
        for b in wanted:
            b.source_rows = self._source_rows(b)

    def _source_rows(self, b: _Bound) -> list[Tensor]:
        """Per base example, the source rows that pair with its selected positions."""
        unit = b.site.unit
        act = self._acts[b.site.hook_name]
        spec = unit.source_positions or unit.positions
        src_real = RealTokens.unpadded(act.shape[0], act.shape[1], act.device)
        src_mask = self._site_mask(spec, src_real)
        if self.check_finite and not self._finite[b.site.hook_name]:  # look closer only when something is off
            check_finite_source(b.site.label, act[src_mask], src_mask, src_real, "pass check_finite=False")
        out = []
        for i in range(self.batch):
            j = i if act.shape[0] == self.batch else 0
            rows = act[j][src_mask[j]]
            if rows.shape[0] != int(b.mask[i].sum()):
                raise ConfigError(
                    f"intervention {unit.name!r}: example {i} selects {int(b.mask[i].sum())} base positions but "
                    f"{rows.shape[0]} source positions; give source_positions= with as many positions."
                )
            out.append(rows)
        return out

    def run(
        self,
        variants: Sequence[Sequence[Intervention]],
        consume: Consume,
        *,
        read: Sequence[int] | None = None,
        only_read: bool = False,
        progress: bool = False,
        desc: str = "sweep",
    ) -> None:
        """Run every variant; ``consume(indices, logits)`` gets each chunk's variant indices and their
        logits ``[len(indices) * B, S, vocab]`` (row ``i * B + b``: variant ``indices[i]``, example
        ``b``). With ``read``, positions outside it hold NaN; with ``only_read`` as well, the logits
        are those positions alone, ``[len(indices) * B, len(read), vocab]`` in ``read``'s order
        (no full-width tensor is built: at a 49k vocabulary it costs more than the unembedding).
        ``progress``: a bar (labelled ``desc``) counting the variants done, moved chunk by chunk."""
        check_progress(progress, "Sweep.run")
        if not isinstance(desc, str):
            raise ConfigError(f"Sweep.run: desc (the progress bar's label) must be a string; got {desc!r}.")
        if only_read and read is None:
            raise ConfigError("only_read=True needs read= (the positions to keep).")
        bound = [self._variant_units(v) for v in variants]
        self._pair_sources(bound)
        jobs = self.executor.schedule(bound, max(1, self.batch_size // self.batch))
        with progress_bar(len(variants), desc=desc, enabled=progress, unit="variant") as bar:
            for indices, job in jobs:
                consume(indices, self.executor.forward(job, bound, read, only_read))
                bar.update(len(indices))


@dataclass
class _Rows:
    """The rows of one batched run of variants. Row r continues base example ``base_rows[r]`` on
    positions ``start..``. In a replay, rows join the run at the block their variant first edits,
    ordered by that block: ``joins[k]`` is the first row that joins before block k, so block k
    runs the rows before the first row of any later block. Whole forwards: every row runs everywhere."""

    base_rows: Tensor
    start: int = 0
    joins: dict[int, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.base_rows.shape[0]

    def at(self, block: int | None) -> int:
        """How many rows run at ``block`` (a hook outside the blocks: all of them)."""
        later = [row for k, row in self.joins.items() if block is not None and k > block]
        return min(later) if later else self.n


class _Executor:
    """A way to run a sweep's variants. Both strategies attach the same two kinds of hooks, built
    here over a :class:`_Rows` layout: the base set's (:meth:`base_hooks`) and the variants' edits
    (:meth:`edit_hooks`), each one gather → Φ → scatter per site (:func:`~reftlens.runtime.kernel.site_hook`).
    They differ in three methods: the base run's logits, the schedule (which variants run together)
    and one chunk's forward."""

    strategy: str

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep

    def base_logits(self) -> Tensor:
        """The base run's logits ``[B, S, vocab]``."""
        raise NotImplementedError

    def schedule(self, bound: list[list[_Bound]], per: int) -> list[tuple[list[int], Any]]:
        """Chunks of at most ``per`` variants: ``(variant indices, job for forward)``."""
        raise NotImplementedError

    def forward(self, job: Any, bound: list[list[_Bound]], read: Sequence[int] | None, only_read: bool) -> Tensor:
        """One chunk's logits, as :meth:`Sweep.run` hands them to ``consume``."""
        raise NotImplementedError

    def base_hooks(self, rows: _Rows) -> list[tuple[Any, Callable]]:
        """Hooks of the base set over ``rows``. Rows that join at block k skip the base set's
        ``hook_in`` edits of block k, and rows that join at a block skip every edit before the
        blocks (embeddings): their recorded input already carries them."""
        sweep = self.sweep
        width = sweep.seq - rows.start
        hooks = []
        for b in sweep.base:
            k = block_of(b.site.hook_name)
            if k is None and rows.joins:
                continue
            n = rows.at(k)
            if not n:  # no row runs at this block
                continue
            mask = b.mask[rows.base_rows[:n], rows.start :]
            if k in rows.joins and b.site.hook_name == f"blocks.{k}.hook_in":
                mask[rows.joins[k] :] = False
            plan = SitePlan(b.site, flat_index(mask), None, (n, width))
            if plan.index is None or plan.index.numel():
                hooks.append((b.site.hook_point, site_hook(plan, sweep.cast)))
        return hooks

    def edit_hooks(self, chunk: Sequence[int], bound: list[list[_Bound]], rows: _Rows) -> list[tuple[Any, Callable]]:
        """Hooks for the variants of ``chunk`` (variant c at rows ``c * B ..``): one site plan per
        (hook, Φ, slot), rows in order."""
        sweep = self.sweep
        B, start, width = sweep.batch, rows.start, sweep.seq - rows.start
        groups: dict[tuple[str, int, int], list[tuple[int, _Bound]]] = {}
        for c, v in enumerate(chunk):
            for b in bound[v]:
                groups.setdefault((b.site.hook_name, id(b.site.unit.phi), b.slot), []).append((c, b))
        hooks = []
        for members in groups.values():
            site = members[0][1].site
            n = rows.at(block_of(site.hook_name))
            mask = torch.zeros(n, width, dtype=torch.bool, device=sweep.tokens.device)
            sources = []
            for c, b in members:
                mask[c * B : (c + 1) * B] = b.mask[:, start:]
                if b.source_rows is not None:
                    sources += [r[int(b.mask[i, :start].sum()) :] for i, r in enumerate(b.source_rows)]
            plan = SitePlan(site, flat_index(mask), torch.cat(sources) if sources else None, (n, width))
            hooks.append((site.hook_point, site_hook(plan, sweep.cast)))
        return hooks

    def _repeat(self, copies: int) -> Tensor:
        """``base_rows`` of ``copies`` variants: every base example, once per variant."""
        return torch.arange(self.sweep.batch, device=self.sweep.tokens.device).repeat(copies)


class _Whole(_Executor):
    """Whole forwards: up to ``per`` variants as rows of one forward of the base tokens."""

    strategy = "batch"

    def base_logits(self) -> Tensor:
        sweep = self.sweep
        src = sweep._source_tokens
        if src is not None and not sweep.base and not sweep._source_base and src.shape == sweep.tokens.shape:
            return sweep._source_acts(set(), with_base=True)  # both runs: rows of one forward
        with hooked(sweep.model, self.base_hooks(_Rows(self._repeat(1)))), torch.no_grad():
            return sweep.model(sweep.tokens)

    def schedule(self, bound: list[list[_Bound]], per: int) -> list[tuple[list[int], Any]]:
        chunks = [list(range(first, min(first + per, len(bound)))) for first in range(0, len(bound), per)]
        return [(chunk, chunk) for chunk in chunks]

    def forward(self, job: list[int], bound: list[list[_Bound]], read: Sequence[int] | None, only_read: bool) -> Tensor:
        sweep = self.sweep
        rows = _Rows(self._repeat(len(job)))
        hooks = self.base_hooks(rows) + self.edit_hooks(job, bound, rows)
        with hooked(sweep.model, hooks), torch.no_grad():
            logits = sweep.model(sweep.tokens[rows.base_rows])
        return logits[:, list(read)] if only_read else logits


class _Replayed(_Executor):
    """Block replay (:class:`~reftlens.runtime.replay.BlockReplay`): the base run is recorded once,
    and each variant runs from its first edited block, on positions from its first edited one.
    Raises :class:`~reftlens.errors.UnsupportedReplay` when replay does not reproduce the model."""

    strategy = "replay"

    def __init__(self, sweep: Sweep) -> None:
        super().__init__(sweep)
        everyone = self._repeat(1)
        self.replay = BlockReplay(sweep.model, sweep.tokens, self.base_hooks(_Rows(everyone)))
        half = sweep.seq // 2  # every example re-entering at the middle block, from the middle position
        self.replay.verify(half, self.base_hooks(_Rows(everyone, half, {sweep.n_layers // 2: 0})))

    def base_logits(self) -> Tensor:
        return self.replay.logits

    def schedule(self, bound: list[list[_Bound]], per: int) -> list[tuple[list[int], Any]]:
        """Variants grouped by the first position they edit (one replay width each), sorted within
        a group by the first block they edit (rows join in block order)."""
        seq, n_layers = self.sweep.seq, self.sweep.n_layers
        starts: dict[int, list[tuple[int, int]]] = {}
        for i, bs in enumerate(bound):
            start, block = seq, n_layers
            for b in bs:
                cols = b.mask.any(0).nonzero()
                if cols.numel():
                    start = min(start, int(cols[0]))
                k = block_of(b.site.hook_name)
                if k is None:
                    raise AnalysisError(
                        f"intervention {b.site.label} is not inside a block, so it cannot be replayed; "
                        "use strategy='batch'."
                    )
                block = min(block, k)
            starts.setdefault(min(start, seq - 1), []).append((block, i))
        jobs = []
        for start, items in sorted(starts.items()):
            items.sort()
            for first in range(0, len(items), per):
                chunk = items[first : first + per]
                jobs.append(([i for _, i in chunk], (start, chunk)))
        return jobs

    def forward(
        self,
        job: tuple[int, list[tuple[int, int]]],
        bound: list[list[_Bound]],
        read: Sequence[int] | None,
        only_read: bool,
    ) -> Tensor:
        sweep, (start, chunk) = self.sweep, job
        B = sweep.batch
        joins: dict[int, int] = {}
        for c, (block, _) in enumerate(chunk):
            joins.setdefault(block, c * B)
        rows = _Rows(self._repeat(len(chunk)), start, joins)
        n, base_rows, blocks = rows.n, rows.base_rows, sorted(joins)
        ends = [joins[k] for k in blocks[1:]] + [n]
        entering = {k: self.replay.entering(k, start, base_rows[joins[k] : end]) for k, end in zip(blocks, ends)}
        hooks = self.base_hooks(rows) + self.edit_hooks([v for _, v in chunk], bound, rows)
        live = None if read is None else [q for q in read if q >= start]
        with hooked(sweep.model, hooks), torch.no_grad():
            out = self.replay.run(entering, start, base_rows, live)
        if read is not None:
            picked = [out[:, live.index(q)] if q >= start else sweep.base_logits[base_rows, q] for q in read]
            if only_read:
                return torch.stack(picked, 1)
            full = torch.full((n, sweep.seq, out.shape[-1]), float("nan"), dtype=out.dtype, device=out.device)
            for q, logits in zip(read, picked):
                full[:, q] = logits
            return full
        return torch.cat([sweep.base_logits[base_rows, :start], out], 1) if start else out


def _units(interventions: Sequence[Intervention], n_layers: int) -> list[Unit]:
    return [u for iv in interventions for u in iv.expand(n_layers)]
