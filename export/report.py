"""The verification report: export_report.json + export_report.md (a markdown table)."""
from __future__ import annotations

import os

from ekg_tf.utils.io import atomic_write_json, atomic_write_text


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    lines = [f"# Export report: {report['model_name']} version {report['version']}", "",
             f"Status: **{report['status']}**. Input contract `{report['contract']}`, "
             f"BN folded: {report['fold_batch_norm']}. Differences are against the slim Keras "
             f"model on {report['verify_images']} real images; latency = median of "
             f"{report['latency_runs']} runs (ms); threads: {report['threads']}.", ""]
    if report.get("macs_ratio") is not None:
        lines += [f"MACs ratio (pruned/dense): {report['macs_ratio']:.4f}; "
                  f"params ratio: {report.get('params_ratio', float('nan')):.4f}", ""]
    lines += ["| artifact | status | size (KB) | max abs diff | max rel diff | top-1 agree | "
              "top-1 acc | ms b1 | ms b32 | tolerance |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in report["artifacts"]:
        lat = a.get("latency_ms") or {}
        tol = ", ".join(f"{k}={v}" for k, v in (a.get("tolerance") or {}).items()) or "reference"
        size = None if a.get("size_bytes") is None else a["size_bytes"] / 1024
        lines.append(
            f"| {a['name']} | {a['status']} | {_fmt(size, '.1f')} | "
            f"{_fmt(a.get('max_abs_diff'), '.2e')} | {_fmt(a.get('max_rel_diff'), '.2e')} | "
            f"{_fmt(a.get('top1_agreement'), '.4f')} | {_fmt(a.get('top1_accuracy'), '.4f')} | "
            f"{_fmt(lat.get('batch1'), '.2f')} | {_fmt(lat.get('batch32'), '.2f')} | {tol} |")
    dense = report.get("dense_latency_ms")
    if dense:
        pruned = {a["name"]: a.get("latency_ms") or {} for a in report["artifacts"]}
        lines += ["", "Dense vs pruned latency (ms, median):", "",
                  "| runtime | dense b1 | pruned b1 | ratio b1 | dense b32 | pruned b32 | "
                  "ratio b32 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, d in dense.items():
            p = pruned.get(name, {})
            r1 = p.get("batch1") / d["batch1"] if p.get("batch1") else None
            r32 = p.get("batch32") / d["batch32"] if p.get("batch32") else None
            lines.append(f"| {name} | {d['batch1']:.2f} | {_fmt(p.get('batch1'), '.2f')} | "
                         f"{_fmt(r1, '.3f')} | {d['batch32']:.2f} | "
                         f"{_fmt(p.get('batch32'), '.2f')} | {_fmt(r32, '.3f')} |")
    lines += _predicted_lines(report)
    settings = report.get("runtime_settings")
    if settings:
        lines += ["", "Runtime settings: " + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items() if k != "runtime")
            for name, d in settings.items())]
    failed = [a for a in report["artifacts"] if a["status"] != "ok"]
    if failed:
        lines += ["", "Failed:"] + [f"- {a['name']}: {'; '.join(a['reasons'])}" for a in failed]
    return "\n".join(lines) + "\n"


def _predicted_lines(report: dict) -> list:
    """Predicted (ekg_tf.latency tables) beside measured latency, per runtime and batch."""
    predicted = report.get("predicted_latency_ms") or {}
    if not predicted:
        return []
    measured = {a["name"]: a.get("latency_ms") or {} for a in report["artifacts"]}
    dense = report.get("dense_latency_ms") or {}
    lines = ["", "Predicted (latency model) vs measured latency (ms):", "",
             "| runtime | batch | predicted | measured | error | dense predicted | "
             "dense measured |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, per_batch in predicted.items():
        for batch, p in per_batch.items():
            m = measured.get(name, {}).get(batch)
            err = None if not m else p["predicted_ms"] / m - 1.0
            lines.append(f"| {name} | {batch[5:]} | {p['predicted_ms']:.3f} | {_fmt(m, '.3f')} | "
                         f"{_fmt(None if err is None else 100 * err, '+.1f')}% | "
                         f"{p['dense_ms']:.3f} | {_fmt(dense.get(name, {}).get(batch), '.3f')} |")
    return lines


def write(report: dict, directory: str, also: str | None = None) -> list[str]:
    """Writes export_report.json/.md into `directory` (and `also`, the latest copy)."""
    paths = []
    for d in [directory] + ([also] if also else []):
        os.makedirs(d, exist_ok=True)
        atomic_write_json(os.path.join(d, "export_report.json"), report)
        atomic_write_text(os.path.join(d, "export_report.md"), markdown(report))
        paths += [os.path.join(d, "export_report.json"), os.path.join(d, "export_report.md")]
    return paths
