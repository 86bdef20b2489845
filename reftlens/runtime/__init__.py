"""The engine: a set of interventions resolves into a :class:`~reftlens.runtime.plan.Plan` for one
batch; a backend executes plans.

- :mod:`~reftlens.runtime.bank` — the named sets a ReftModel holds (a plain set is a bank of one),
  their per-set settings, planning a batch, and :class:`~reftlens.runtime.bank.Call`, the per-call
  choices (each row's set, ``intervene_on``) passed explicitly to every backend;
- :mod:`~reftlens.runtime.plan` — resolution (positions → rows, per-batch disjointness);
- :mod:`~reftlens.runtime.kernel` — the gather → Φ → scatter kernel every backend calls;
- :mod:`~reftlens.runtime.tl_backend` — the TransformerLens backend (hook points);
- :mod:`~reftlens.runtime.hf_backend` — the plain-transformers backend (forward hooks on modules);
- :mod:`~reftlens.runtime.replay` and :mod:`~reftlens.runtime.sweep` — many variants of one run
  in batched forwards, replaying only the blocks and positions an edit can change (a sweep
  delegates to a whole-forward or a block-replay executor);
- :mod:`~reftlens.runtime.compat` — every upstream workaround, dated and explained.
"""

from reftlens.runtime.kernel import site_hook
from reftlens.runtime.plan import Plan, Site, SitePlan, check_disjoint, flat_index, hook_name_for, resolve
from reftlens.runtime.tl_backend import attach, bind, detach, execute, gather_sources, hooked

make_hook = site_hook  # the name the first build used

__all__ = [
    "Plan",
    "Site",
    "SitePlan",
    "resolve",
    "check_disjoint",
    "flat_index",
    "hook_name_for",
    "site_hook",
    "bind",
    "attach",
    "detach",
    "execute",
    "gather_sources",
    "hooked",
]
