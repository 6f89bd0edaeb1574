"""``tunesmith recommend``: the methods that fit a memory budget, ranked by short pilot runs.

1. every candidate method is estimated (planning/estimate.py) for the run's model, batch and
   sequence length on the target device; one whose predicted peak exceeds the budget is left out,
   with its estimate as the reason;
2. the others train a short pilot each through the ``compare`` machinery (same data, seed and
   steps; each at its own default learning rate), each given an equal share of ``--time``;
3. they are ranked by the pilot's task metric (accuracy higher is better, eval loss lower), ties by
   the estimated peak, and the report (``recommend.md``, ``recommend.json``) gives each its reasons.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig, parse_bytes
from ..errors import ConfigError
from . import compare as compare_mod
from .estimate import estimate, gib

LOWER_IS_BETTER = {"eval_loss"}


def parse_time(value: str | None) -> float | None:
    """``90s``, ``30m``, ``1h`` or a number of seconds."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    v = value.strip().lower()
    try:
        return float(v[:-1]) * units[v[-1]] if v[-1] in units else float(v)
    except (ValueError, IndexError):
        raise ConfigError(f"--time {value!r}: write e.g. 1h, 30m or 600s") from None


def recommend(base: RunConfig, methods: list[str], budget: str, out: Path, *, device: str | None = None,
              time_s: float | None = None, say=print) -> dict:
    limit = parse_bytes(budget, "--budget")
    if not limit:
        raise ConfigError(f"--budget {budget!r}: give a size, e.g. 24GiB")
    fitting, excluded, peaks = [], [], {}
    for name in methods:
        cfg = RunConfig.model_validate({**base.model_dump(mode="json"), "method": {"name": name}})
        try:
            est = estimate(cfg, device=device)
        except Exception as e:  # noqa: BLE001 - a method that cannot apply to this model: its reason
            excluded.append({"method": name, "reason": f"cannot estimate: {e}"})
            continue
        peaks[name] = est.peak
        if est.peak > limit:
            excluded.append({"method": name, "reason": f"estimated peak {gib(est.peak)} exceeds the budget {budget}"})
        else:
            fitting.append(name)
    say(f"{len(fitting)} of {len(methods)} methods fit {budget}: {', '.join(fitting) or 'none'}")
    timeout = time_s / len(fitting) if time_s and fitting else None
    rows = compare_mod.compare(base, fitting, out / "pilots", timeout_s=timeout, say=say) if fitting else []

    def key(r):
        sign = 1 if r.metric_name in LOWER_IS_BETTER else -1
        return (r.status != "completed", sign * (r.metric if r.metric is not None else float("inf")), peaks[r.method])

    ranked = []
    for i, r in enumerate(sorted(rows, key=key), 1):
        if r.status == "completed":
            why = (f"estimated peak {gib(peaks[r.method])} of {budget}; pilot {r.metric_name} {r.metric:.4f} "
                   f"with {r.trainable_pct:.3f}% trainable, {r.train_time_s:.0f} s of training, "
                   f"measured peak {r.peak_memory_gib:.2f} GiB")
        else:
            why = f"pilot failed: {r.error}"
        ranked.append({"rank": i, "method": r.method, "status": r.status, "metric_name": r.metric_name,
                       "metric": r.metric, "estimated_peak_gib": peaks[r.method] / 2**30, "reason": why})
    report = {"budget": budget, "time_s": time_s, "ranked": ranked, "excluded": excluded}
    out.mkdir(parents=True, exist_ok=True)
    (out / "recommend.json").write_text(json.dumps(report, indent=2))
    (out / "recommend.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# Recommended methods for a {report['budget']} budget", "", "| rank | method | why |", "|---|---|---|"]
    lines += [f"| {r['rank']} | `{r['method']}` | {r['reason']} |" for r in report["ranked"]]
    if report["excluded"]:
        lines += ["", "Left out:", ""] + [f"- `{e['method']}`: {e['reason']}" for e in report["excluded"]]
    return "\n".join(lines) + "\n"
