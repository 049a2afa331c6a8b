"""The export's choices (formats, TFLite modes, input contracts, int8 calibrations) and
the checks of a job's inputs.

Nothing here imports TensorFlow, so `ekg-export` refuses a bad flag, a missing search
result or a missing file in well under a second, before the heavy imports.
"""
from __future__ import annotations

import dataclasses
import os

from ekg_tf.errors import UserError

FORMATS = ("saved_model", "tflite", "onnx")
QUANT_MODES = ("none", "float16", "dynamic", "int8")       # TFLite
CONTRACTS = ("images", "images_uint8", "image_bytes")      # the SavedModel's input
CALIBRATIONS = ("mse", "minmax")                           # int8 activation ranges


def split(value) -> list[str]:
    """'a, b' or ['a', ' b'] -> ['a', 'b']."""
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v.strip()]


def check_formats(formats) -> list[str]:
    formats = split(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UserError(f"unknown export format(s) {bad}; choose from {FORMATS}")
    if not formats:
        raise UserError(f"no export format given; choose from {FORMATS}")
    return formats


def check_modes(modes) -> list[str]:
    modes = split(modes)
    bad = [m for m in modes if m not in QUANT_MODES]
    if bad:
        raise UserError(f"unknown quantization mode(s) {bad}; choose from {QUANT_MODES}")
    return modes


def check_contract(contract: str) -> str:
    if contract not in CONTRACTS:
        raise UserError(f"unknown export.input_contract {contract!r}; choose one of {CONTRACTS}")
    return contract


def check_calibration(name: str) -> str:
    if name not in CALIBRATIONS:
        raise UserError(f"unknown int8 calibration {name!r}; choose from {CALIBRATIONS}")
    return name


@dataclasses.dataclass
class ExportInputs:
    """What to export, checked before any heavy work."""
    formats: list
    modes: list            # TFLite quantization modes
    subnet_path: str
    representative_path: str
    export_dir: str


def check_inputs(config, workdir, formats=None, quantize=None, subnet=None, export_dir=None,
                 representative_data=None) -> ExportInputs:
    """The export job's inputs (arguments over `config.export`), or a UserError naming
    what to fix."""
    ecfg = config.export
    formats = check_formats(formats or ecfg.formats)
    modes = check_modes(quantize or ecfg.quantize) if "tflite" in formats else []
    check_contract(ecfg.input_contract)
    check_calibration(ecfg.int8_calibration)
    subnet_path = subnet or os.path.join(workdir, "search", "subnet.json")
    if not os.path.exists(subnet_path):
        raise UserError(f"no search result at {subnet_path}: run ekg-search first "
                        "(or pass --subnet=path/to/subnet.json)")
    rep_path = representative_data or ecfg.representative_path
    if rep_path and not os.path.exists(rep_path):
        raise UserError(f"representative dataset {rep_path!r} does not exist "
                        "(an .npz with uint8 training images 'x')")
    return ExportInputs(formats, modes, subnet_path, rep_path,
                        export_dir or os.path.join(workdir, "export"))
