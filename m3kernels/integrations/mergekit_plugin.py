"""mergekit plugin: m3kernels' fused methods as mergekit 0.1.5 merge methods.

Every method of our registry (:mod:`m3kernels.merge.registry`) becomes a mergekit
``GroupMergeMethod`` named ``m3k_<name>`` (``m3k_ties``, ``m3k_dare_ties``, ``m3k_linear``, …),
with the parameters our config takes (``weight``, ``density``, ``drop_rate``, ``normalize``,
``rescale``, ``lambda``, …) plus M³'s ``mix_ratio`` (per model) and ``mixup_alpha``. mergekit
hands a method the base and all N models of one tensor at once, which is what
:func:`m3kernels.api.merge_tensors` takes: stage A and the fused stage B run on that group.
With ``replace=True`` our methods also take the place of mergekit's own of the same names
(``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, …), so an unchanged
config runs on our kernels, with our semantics (docs/MERGEKIT_METHODS.md §2 lists where they
differ from mergekit's).

mergekit 0.1.5 has no plugin entry point, so the plugin is activated one of two ways:

* the command, the arguments of ``mergekit-yaml`` plus our own::

      python -m m3kernels.integrations.mergekit_plugin CONFIG OUT [--m3k-seed N] [--m3k-replace] [mergekit options]

  (registers, then runs mergekit's own ``mergekit-yaml`` command: its planner, loader and writer);
* from Python, before ``mergekit.merge.run_merge``: ``from m3kernels.integrations import
  mergekit_plugin; mergekit_plugin.register(seed=0, replace=False)``.

mergekit passes no seed to a method: the DARE stream is keyed by the plugin's seed (``--m3k-seed``,
default 0, as our config's ``seed``) and the tensor's name, so a DARE merge through the plugin is
the bytes of ``m3kernels merge`` of the same config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

PREFIX = "m3k_"
_state: dict = {"seed": 0, "registered": {}, "replaced": {}}


def _mergekit():
    try:
        from mergekit.merge_methods import base as mk_base
        from mergekit.merge_methods import registry as mk_registry
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the m3kernels mergekit plugin needs mergekit 0.1.5 in this environment "
            f"(pip install mergekit==0.1.5): {exc}"
        ) from None
    return mk_base, mk_registry


def _value_type(param, registry_mod):
    """The Python type mergekit validates a value against (a kind we do not know: anything, left
    to our own checks in ``make_recipe``)."""
    kinds = {"number": float, "fraction": float, "bool": bool, "rescale": bool | str, "int": int}
    t = kinds.get(param.kind, Any)
    if t is Any:
        return Any
    return (t | None) if param.default is None or param.default == registry_mod.REQUIRED else t


def method_spec(method, mk_base):
    """mergekit's ``MergeMethodSpec`` for one of our methods (names and defaults of our config)."""
    from m3kernels.merge import registry as reg

    base_aware = method.needs_base or method.program.uses_base  # required, or used when given
    per_model = mk_base.ParameterScope.NON_BASE if base_aware else mk_base.ParameterScope.INPUT
    params = []
    for p in method.params:
        if not p.config:
            continue
        scope = per_model if p.scope == reg.PER_MODEL else mk_base.ParameterScope.SHARED
        kw = {}
        if p.default == reg.REQUIRED:
            kw["default"] = None  # our make_recipe names what is missing (e.g. density or drop_rate)
        else:  # a config's default where it differs from the API's (mergekit's density 1, L1 rescale)
            kw["default"] = p.default if p.config_default is None else p.config_default
        params.append(mk_base.ParameterSpec(p.name, _value_type(p, reg), scope, description=p.doc, **kw))
    names = {p.name for p in params}
    if "mix_ratio" not in names:
        params.append(mk_base.ParameterSpec("mix_ratio", float | None, per_model, default=None))
    if "mixup_alpha" not in names:
        params.append(
            mk_base.ParameterSpec("mixup_alpha", float | None, mk_base.ParameterScope.SHARED, default=None)
        )
    if method.needs_base:
        policy = mk_base.BasePolicy.REQUIRED
    elif base_aware:
        policy = mk_base.BasePolicy.OPTIONAL
    else:
        policy = mk_base.BasePolicy.IGNORED
    contract = mk_base.InputContract(base=policy)
    return mk_base.MergeMethodSpec(
        name=PREFIX + method.name,
        parameters=tuple(params),
        contract=contract,
        pretty_name=f"m3kernels {method.name}",
        reference_url=method.reference,
    )


def _make_class(mk_base):
    @dataclass(frozen=True, eq=False)
    class M3KernelsMethod(mk_base.GroupMergeMethod):
        """One m3kernels method as a mergekit group method (one tensor, base + N models)."""

        method_name: str
        spec: Any

        def merge_group(self, group, /, **parameters):
            return merge_group(self.method_name, group, parameters)

    return M3KernelsMethod


def merge_group(method_name: str, group, parameters: dict):
    """Merge one mergekit tensor group with ``merge_tensors`` (inputs already in the merge dtype)."""
    from m3kernels.api import merge_tensors
    from m3kernels.merge import registry as reg

    method = reg.get_method(method_name)
    if method.needs_base or method.program.uses_base:  # required, or used when given
        base = group.base.tensor if group.base is not None else None
        entries = group.non_base
        if not entries:
            return base
    else:  # like mergekit's linear and karcher: the base, when an input, is one more model
        base, entries = None, group.entries
    kwargs: dict = {}
    for p in method.params:
        if not p.config or not p.api or p.name not in parameters:
            continue
        value = parameters[p.name]
        if p.scope == reg.PER_MODEL:
            value = [value[e.id] for e in entries]
            if all(v is None for v in value):
                continue
        elif value is None:
            continue
        if p.name == "rescale" and method.dare:  # as in our config: true is mergekit's L1 rescale
            from m3kernels.checkpoint.config import config_rescale

            value = config_rescale(method, value)
        kwargs[p.api] = value
    ratios = [parameters["mix_ratio"][e.id] for e in entries] if "mix_ratio" in parameters else []
    if any(r is not None for r in ratios):
        kwargs["mix_ratios"] = [1.0 if r is None else r for r in ratios]
    if parameters.get("mixup_alpha") is not None:
        kwargs["mixup_alpha"] = parameters["mixup_alpha"]
    return merge_tensors(
        base,
        [e.tensor for e in entries],
        method=method.name,
        seed=_state["seed"],
        name=group.metadata.name or "",
        **kwargs,
    )


def register(seed: int = 0, replace: bool = False) -> list[str]:
    """Register ``m3k_<name>`` for every m3kernels method but the data-aware ones (fisher,
    regmean: mergekit has no way to hand a method their statistics) (and, with ``replace``, put
    ours in place of mergekit's methods of the same names). Idempotent; returns the names now served by us."""
    from m3kernels.merge import registry as reg

    mk_base, mk_registry = _mergekit()
    _state["seed"] = int(seed)
    cls = _make_class(mk_base)
    names = []
    for method in reg.METHODS.values():
        if method.family == "data_aware":  # fisher, regmean: their statistics are no mergekit input
            continue
        key = PREFIX + method.name
        if key not in mk_registry._METHODS:
            obj = cls(method_name=method.name, spec=method_spec(method, mk_base))
            mk_registry.register(obj)
            _state["registered"][key] = obj
        names.append(key)
        if replace and method.name in mk_registry._METHODS and method.name not in _state["replaced"]:
            own = mk_registry._METHODS[method.name]
            spec = method_spec(method, mk_base)
            spec = type(spec)(**{**spec.__dict__, "name": method.name})
            _state["replaced"][method.name] = own
            mk_registry._METHODS[method.name] = cls(method_name=method.name, spec=spec)
        if method.name in _state["replaced"]:
            names.append(method.name)
    return names


def unregister() -> None:
    """Remove our methods and put back mergekit's own."""
    _, mk_registry = _mergekit()
    for key in list(_state["registered"]):
        mk_registry._METHODS.pop(key, None)
        del _state["registered"][key]
    for name, own in list(_state["replaced"].items()):
        mk_registry._METHODS[name] = own
        del _state["replaced"][name]


def main(argv: list[str] | None = None) -> int:
    """``mergekit-yaml`` with our methods registered: ``--m3k-seed N`` and ``--m3k-replace`` are
    ours, every other argument goes to mergekit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    seed, replace, rest = 0, False, []
    it = iter(argv)
    for a in it:
        if a == "--m3k-replace":
            replace = True
        elif a == "--m3k-seed" or a.startswith("--m3k-seed="):
            v = a.split("=", 1)[1] if "=" in a else next(it, None)
            if v is None or not v.isdigit():
                print("--m3k-seed needs a non-negative integer", file=sys.stderr)
                return 2
            seed = int(v)
        else:
            rest.append(a)
    if "--help" in rest or "-h" in rest:
        print(
            "m3kernels options (before or after mergekit's):\n"
            "  --m3k-seed N     seed of the DARE stream (default 0)\n"
            "  --m3k-replace    our methods also under mergekit's own names (ties, linear, ...)\n"
            f"methods added: {PREFIX}<name> for every m3kernels method\n"
        )
    register(seed=seed, replace=replace)
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    try:
        mergekit_yaml.main(args=rest, prog_name="m3kernels-mergekit-yaml", standalone_mode=False)
    except SystemExit as exc:  # click's --help and usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors are ClickException
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(exc, "exit_code", 1))
    return 0


__all__ = ["register", "unregister", "main", "merge_group", "method_spec", "PREFIX"]

if __name__ == "__main__":
    sys.exit(main())
