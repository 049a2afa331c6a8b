"""The run report of an ekg-prune workdir: `report.md` + `report.json` (+ PNGs, TensorBoard).

Everything comes from what the stages wrote (their records and outputs), so the report
of a resumed or partly re-run workdir is the same as that of an uninterrupted run:
baseline vs pruned top-1, params and MACs, latency per format (dense beside pruned),
the kept width of every gate group (table + the search's plot), the search trajectory,
the fine-tuning curve, the export verification table, seconds per stage, the exact
config, package versions and the git revision.
"""
from __future__ import annotations

import json
import os
import subprocess

from ekg_tf.utils.io import atomic_write_json, atomic_write_text

PACKAGES = ("tensorflow", "keras", "numpy", "ml-collections", "tf2onnx", "onnx", "onnxruntime",
            "ai-edge-litert", "tensorflow-serving-api", "scikit-learn")


def package_versions() -> dict:
    from importlib import metadata
    import ekg_tf
    out = {"ekg_tf": ekg_tf.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str:
    """The source tree's commit (+ '-dirty' with local changes), or why there is none."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _rel(workdir, path):
    return os.path.relpath(path, workdir) if path and os.path.exists(path) else None


# ----------------------------------------------------------------------------- the numbers
def summarize(workdir: str, records: dict, config=None) -> dict:
    """The report's numbers from the stage records and outputs."""
    res = {name: r.get("result", {}) for name, r in records.items()}
    train, search, finetune = res.get("train", {}), res.get("search", {}), res.get("finetune", {})
    export = res.get("export", {}).get("report") or {}
    out = {"workdir": workdir, "stages": {n: {"status": r["status"],
                                              "seconds": round(float(r["seconds"]), 1)}
                                          for n, r in records.items()}}
    # Baseline: the network the search started from (trained here, or model.init).
    out["baseline_top1"] = search.get("baseline_test_top1", train.get("top1"))
    out["pruned_top1_before_finetune"] = finetune.get("top1_before",
                                                      search.get("test_top1_bn_recalibrated"))
    keras_artifact = next((a for a in export.get("artifacts", []) if a["name"] == "keras"), {})
    out["pruned_top1"] = keras_artifact.get("top1_accuracy", finetune.get("top1"))
    out["finetune_last_top1"], out["finetune_best_top1"] = (finetune.get("top1"),
                                                            finetune.get("best_top1"))
    if finetune:
        out["macs"], out["params"] = finetune["macs"], finetune["params"]
        out["dense_macs"] = round(finetune["macs"] / finetune["macs_ratio"])
        out["dense_params"] = round(finetune["params"] / finetune["params_ratio"])
    if export:
        out.update(macs=export.get("macs"), dense_macs=export.get("dense_macs"),
                   params=export.get("params", out.get("params")),
                   dense_params=export.get("dense_params", out.get("dense_params")))
    if out.get("macs") and out.get("dense_macs"):
        out["macs_ratio"] = out["macs"] / out["dense_macs"]
    else:
        out["macs_ratio"] = search.get("macs_ratio")
    if out.get("params") and out.get("dense_params"):
        out["params_ratio"] = out["params"] / out["dense_params"]
    else:
        out["params_ratio"] = search.get("params_ratio")
    out["exports"] = {a["name"]: a["status"] for a in export.get("artifacts", [])}
    out["export_status"] = export.get("status")
    out["latency_ms"] = latency_table(export)
    out["kept_width"] = kept_width(workdir)
    slim_path = keras_artifact.get("path") or finetune.get("last")
    out["layer_width"] = per_layer_widths(config, workdir, slim_path) if config else []
    out["search"] = {k: search.get(k) for k in ("steps", "search_seconds", "target_ratio",
                                                 "val_top1", "memory_bank_teachers")}
    out["finetune_history"] = [{"epoch": h.get("epoch"), "top1": h.get("top1")}
                               for h in _finetune_history(workdir, finetune)]
    return out


def latency_table(export: dict) -> list:
    """Per runtime: dense and pruned median ms at batch 1 and 32."""
    dense = export.get("dense_latency_ms") or {}
    rows = []
    for a in export.get("artifacts", []):
        lat = a.get("latency_ms") or {}
        d = dense.get(a["name"], {})
        rows.append({"artifact": a["name"], "pruned_b1": lat.get("batch1"),
                     "pruned_b32": lat.get("batch32"), "dense_b1": d.get("batch1"),
                     "dense_b32": d.get("batch32")})
    return rows


def _weighted_layers(model) -> dict:
    """{name: output channels} of the layers with a kernel (conv, depthwise, dense), nested
    models included, in graph order."""
    from ekg_tf.graph.keras_compat import all_layers
    out = {}
    for layer in all_layers(model):
        if getattr(layer, "kernel", None) is not None or hasattr(layer, "depthwise_kernel"):
            out[layer.name] = int(layer.output.shape[-1])
    return out


def per_layer_widths(config, workdir: str, slim_path: str | None) -> list:
    """Output channels of every conv/dense layer: unpruned vs the pruned model's."""
    import keras
    from ekg_tf.models.sources import model_from_config
    if not slim_path or not os.path.exists(slim_path):
        return []
    dense = _weighted_layers(model_from_config(config, load_init=False))
    slim = _weighted_layers(keras.models.load_model(slim_path, compile=False, safe_mode=True))
    return [{"layer": name, "channels": c, "kept": slim[name]}
            for name, c in dense.items() if name in slim]


def kept_width(workdir: str) -> list:
    spec = _read_json(os.path.join(workdir, "search", "subnet.json"))
    if not spec:
        return []
    return [{"group": name, "channels": g["channels"], "kept": g["kept"]}
            for name, g in spec["groups"].items()]


def _finetune_history(workdir, finetune):
    state = _read_json(os.path.join(workdir, "finetune", "finetune_state.json")) or {}
    before = _read_json(os.path.join(workdir, "finetune", "before.json"))
    return ([before] if before else []) + state.get("history", []) if finetune else []


# ----------------------------------------------------------------------------- the plots
def plots(workdir: str, summary: dict) -> dict:
    """The report's own PNGs (accuracy vs MACs, dense vs pruned latency) and links to
    the stages' PNGs."""
    from ekg_tf.utils.plots import save_bar_plot, save_points_plot
    out = {}
    points = {}
    if summary.get("baseline_top1") is not None:
        points["unpruned"] = (1.0, summary["baseline_top1"])
    if summary.get("pruned_top1_before_finetune") is not None and summary.get("macs_ratio"):
        points["pruned, before fine-tuning"] = (summary["macs_ratio"],
                                                summary["pruned_top1_before_finetune"])
    if summary.get("pruned_top1") is not None and summary.get("macs_ratio"):
        points["pruned + fine-tuned"] = (summary["macs_ratio"], summary["pruned_top1"])
    if points:
        path = os.path.join(workdir, "report_accuracy_vs_macs.png")
        save_points_plot(path, points, "MACs ratio (pruned / unpruned)", "test top-1",
                         "Accuracy vs MACs")
        out["accuracy_vs_macs"] = path
    rows = [r for r in summary["latency_ms"] if r["dense_b1"] is not None]
    if rows:
        path = os.path.join(workdir, "report_latency.png")
        save_bar_plot(path, [r["artifact"] for r in rows],
                      {"dense b1": [r["dense_b1"] for r in rows],
                       "pruned b1": [r["pruned_b1"] for r in rows],
                       "dense b32 / 10": [r["dense_b32"] / 10 for r in rows],
                       "pruned b32 / 10": [r["pruned_b32"] / 10 for r in rows]},
                      "median latency (ms)", "Dense vs pruned latency per runtime")
        out["latency"] = path
    layers = summary.get("layer_width") or []
    if layers:
        path = os.path.join(workdir, "report_layer_width.png")
        save_bar_plot(path, [r["layer"] for r in layers],
                      {"unpruned": [r["channels"] for r in layers],
                       "kept": [r["kept"] for r in layers]},
                      "output channels", "Kept width per layer")
        out["layer_width"] = path
    for key, rel in (("kept_width", "search/kept_width.png"),
                     ("search_macs", "search/macs_ratio.png"),
                     ("search_objective", "search/objective.png"),
                     ("finetune_curve", "finetune/accuracy_per_epoch.png"),
                     ("train_curve", "train/accuracy_per_epoch.png")):
        if os.path.exists(os.path.join(workdir, rel)):
            out[key] = os.path.join(workdir, rel)
    return out


# ----------------------------------------------------------------------------- markdown
def _f(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def markdown(summary: dict, png: dict, config_text: str, export_md: str, versions: dict,
             revision: str) -> str:
    w = summary["workdir"]

    def img(key, alt):
        return [f"![{alt}]({_rel(w, png[key])})", ""] if key in png else []

    s = summary
    lines = [f"# EKG pruning report: {w}", "",
             "| | unpruned | pruned | ratio |", "|---|---:|---:|---:|",
             f"| test top-1 | {_f(s.get('baseline_top1'))} | {_f(s.get('pruned_top1'))} | |",
             f"| MACs | {_f(s.get('dense_macs'), ',')} | {_f(s.get('macs'), ',')} | "
             f"{_f(s.get('macs_ratio'))} |",
             f"| params | {_f(s.get('dense_params'), ',')} | {_f(s.get('params'), ',')} | "
             f"{_f(s.get('params_ratio'))} |", "",
             f"Pruned top-1 before fine-tuning (BN re-estimated on training images): "
             f"{_f(s.get('pruned_top1_before_finetune'))}; after fine-tuning: last epoch "
             f"{_f(s.get('finetune_last_top1'))}, best epoch {_f(s.get('finetune_best_top1'))}. "
             "The pruned top-1 above is the exported model's on the verification images.", ""]
    lines += img("accuracy_vs_macs", "accuracy vs MACs")
    if s["latency_ms"]:
        lines += ["## Latency (median ms)", "",
                  "| runtime | dense b1 | pruned b1 | ratio b1 | dense b32 | pruned b32 | ratio b32 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["latency_ms"]:
            r1 = r["pruned_b1"] / r["dense_b1"] if r["dense_b1"] and r["pruned_b1"] else None
            r32 = r["pruned_b32"] / r["dense_b32"] if r["dense_b32"] and r["pruned_b32"] else None
            lines.append(f"| {r['artifact']} | {_f(r['dense_b1'], '.2f')} | "
                         f"{_f(r['pruned_b1'], '.2f')} | {_f(r1, '.3f')} | "
                         f"{_f(r['dense_b32'], '.2f')} | {_f(r['pruned_b32'], '.2f')} | "
                         f"{_f(r32, '.3f')} |")
        lines.append("")
        lines += img("latency", "latency")
    if s.get("layer_width"):
        lines += ["## Kept width per layer", "", "| layer | channels | kept | kept % |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['channels']} | {r['kept']} | "
                  f"{100 * r['kept'] / r['channels']:.0f} |" for r in s["layer_width"]]
        lines.append("")
        lines += img("layer_width", "kept width per layer")
    if s["kept_width"]:
        lines += ["## Kept width per gate group", "", "| group | channels | kept | kept % |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {g['group']} | {g['channels']} | {g['kept']} | "
                  f"{100 * g['kept'] / g['channels']:.0f} |" for g in s["kept_width"]]
        lines.append("")
        lines += img("kept_width", "kept width")
    if s["search"].get("steps") is not None:
        sr = s["search"]
        lines += ["## Search trajectory", "",
                  f"{sr['steps']} steps to MACs ratio {_f(s.get('macs_ratio'))} (target "
                  f"{sr['target_ratio']}), {_f(sr['search_seconds'], '.1f')} s; memory-bank "
                  f"teachers: history steps {sr['memory_bank_teachers']}.", ""]
        lines += img("search_macs", "MACs ratio per step") + img("search_objective",
                                                                  "objective per step")
    if s["finetune_history"]:
        lines += ["## Fine-tuning", "", "| epoch | test top-1 |", "|---:|---:|"]
        lines += [f"| {_f(h['epoch'], '.2f')} | {_f(h['top1'])} |" for h in s["finetune_history"]]
        lines.append("")
        lines += img("finetune_curve", "fine-tuning curve")
    if export_md:
        body = export_md.split("\n", 2)[2] if export_md.startswith("# ") else export_md
        lines += ["## Export verification", "", body.strip(), ""]
    lines += ["## Seconds per stage", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {n} | {r['status']} | {r['seconds']:.1f} |" for n, r in s["stages"].items()]
    lines += ["", "## Environment", "", f"git revision: `{revision}`", "",
              "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v or '-'} |" for k, v in versions.items()]
    lines += ["", "## Config", "", "```", config_text.strip(), "```", ""]
    return "\n".join(lines)


def write_report(config, workdir: str, records: dict, stages_run) -> dict:
    """Writes `report.md`, `report.json`, the report PNGs and TensorBoard scalars."""
    import tensorflow as tf
    summary = summarize(workdir, records, config)
    png = plots(workdir, summary)
    export_md = ""
    export_report = (records.get("export", {}).get("result", {}) or {}).get("report")
    if export_report:
        from ekg_tf.export.report import markdown as export_markdown
        export_md = export_markdown(export_report)
    versions, revision = package_versions(), git_revision()
    config_text = config.to_json_best_effort(indent=1, sort_keys=True)
    text = markdown(summary, png, config_text, export_md, versions, revision)
    report = {**{k: v for k, v in summary.items() if k != "finetune_history"},
              "finetune_history": summary["finetune_history"], "stages_run": list(stages_run),
              "plots": {k: _rel(workdir, p) for k, p in png.items()},
              "versions": versions, "git_revision": revision,
              "config": json.loads(config_text)}
    atomic_write_json(os.path.join(workdir, "report.json"), report)
    atomic_write_text(os.path.join(workdir, "report.md"), text)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", "report"))
    with writer.as_default():
        for key in ("baseline_top1", "pruned_top1", "pruned_top1_before_finetune", "macs_ratio",
                    "params_ratio"):
            if summary.get(key) is not None:
                tf.summary.scalar(f"report/{key}", summary[key], step=0)
        for name, r in summary["stages"].items():
            tf.summary.scalar(f"seconds/{name}", r["seconds"], step=0)
        tf.summary.text("report", text, step=0)
    writer.close()
    report["report_md"] = os.path.join(workdir, "report.md")
    return report
