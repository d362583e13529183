"""Export a trained classifier, with what it needs to be used, as ONNX or a ``torch.export`` program.

The exported model takes images as ``predict`` has them after decoding (``shards.reader.decode_to_chw``
with the checkpoint's window, channels and frames), stacked to one batch:

    images   N x C x H x W   uint8 (8-bit input spec) or float32 in [0, 1] (16-bit: windowed grey rows)

and does what predict's pipeline and model actors do next: the resize to S x S
(``pipeline.resize``: bilinear, antialiased, in float32), the rounding to uint8 or to 16 bits
that predict's batches carry, and the normalisation ``(u - mean) / std`` of the input spec. It returns

    probabilities  N x K   ``softmax(logits / T)``, T the run's ``calibration.json`` temperature
                           (``ray_jobs.classifier.calibration``; T = 1 when there is none)
    logits         N x K   with ``logits=True``

N, H and W are dynamic. The metadata (``metadata()``: class names, input spec, image size,
temperature and where it came from, output kind, medbalance version) goes into the ONNX file's
``metadata_props`` (each key; the whole as JSON under ``medbalance``), and into a
``torch.export`` archive's ``extra_files`` as ``medbalance.json``.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from medbalance import __version__
from medbalance.errors import ConfigError
from ray_jobs.classifier.calibration import describe, run_temperature
from ray_jobs.classifier.pipeline import UINT16_MAX, InputSpec, resize
from ray_jobs.runtime.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from shards import storage

FORMATS = ("onnx", "torch-export")
METADATA_FILE = "medbalance.json"  # the torch.export archive's extra file
ONNX_OPSET = 18  # the first with Resize(antialias=1)


class ExportedClassifier(torch.nn.Module):
    """Decoded images -> probabilities (or logits): predict's preparation, the model and the temperature.

    Args:
        model: the classifier in eval mode (N x C x S x S float -> N x K logits).
        spec: the checkpoint's InputSpec (channels, depth, mean/std).
        image_size: S.
        temperature: T, or None for softmax(logits).
        logits: return the logits (the temperature is then not applied).
    """

    def __init__(self, model: torch.nn.Module, spec: InputSpec, image_size: int, temperature: float | None,
                 logits: bool = False):
        super().__init__()
        self.model, self.image_size, self.depth, self.return_logits = model, image_size, spec.depth, logits
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """N x C x H x W uint8 (or float in [0, 1] at depth 16) -> N x C x S x S float32, normalised
        exactly as predict's batches are (``pipeline.preprocess_batch`` then ``pipeline.normalize``)."""
        sized = resize(images, self.image_size, skip_same_size=False)
        if self.depth == 16:  # predict carries round(u * 65535) - 32768 as int16; normalize adds 32768 back
            unit = torch.round(sized.float().clamp(0.0, 1.0) * UINT16_MAX) / UINT16_MAX
        else:
            unit = sized.float() / 255.0
        return (unit - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.prepare(images)).float()
        if self.return_logits:
            return logits
        return torch.softmax(logits / self.temperature, dim=1)


def metadata(state: dict, checkpoint: str, temperature: float | None, source: str, logits: bool) -> dict:
    """What a user of the exported file needs besides the graph (all JSON-serialisable)."""
    spec = InputSpec.from_dict(state.get("input"))
    return {"class_names": list(state["class_names"]), "input_spec": spec.to_dict(),
            "image_size": int(state["config"]["data"]["image_size"]),
            "input_dtype": "uint8" if spec.depth == 8 else "float32 in [0, 1]",
            "input_layout": "N x C x H x W", "output": "logits" if logits else "probabilities",
            "temperature": temperature, "temperature_source": source,
            "model": state["config"]["model"], "checkpoint": checkpoint, "medbalance_version": __version__}


def example_images(spec: InputSpec, image_size: int, batch: int = 2) -> torch.Tensor:
    """A batch of the exported input's dtype (batch x C x (S+3) x (S+5)), to trace with."""
    shape = (batch, spec.channels, image_size + 3, image_size + 5)
    if spec.depth == 16:
        return torch.rand(shape, generator=torch.Generator().manual_seed(0))
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _dynamic_shapes() -> tuple:
    dim = torch.export.Dim.DYNAMIC
    return ({0: dim, 2: dim, 3: dim},)


def _save_onnx(module: ExportedClassifier, example: torch.Tensor, meta: dict, local: str) -> None:
    """torch's ONNX exporter (dynamo), then the metadata into ``metadata_props``."""
    import onnx

    program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=_dynamic_shapes(),
                                input_names=["images"], output_names=[meta["output"]],
                                opset_version=ONNX_OPSET, verbose=False)
    program.save(local)
    model = onnx.load(local)
    props = {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}
    props["medbalance"] = json.dumps(meta)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, local)


def _save_torch_export(module: ExportedClassifier, example: torch.Tensor, meta: dict, local: str) -> None:
    """``torch.export.export`` then ``torch.export.save`` with ``medbalance.json`` in ``extra_files``."""
    program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_shapes(), strict=False)
    torch.export.save(program, local, extra_files={METADATA_FILE: json.dumps(meta)})


def export_model(checkpoint: str, fmt: str, out: str, *, logits: bool = False, calibration: bool = True) -> dict:
    """Export ``checkpoint`` (a checkpoint or a run folder) to ``out`` (local or ``s3://``, written
    atomically); returns the metadata written with it.

    Raises:
        ConfigError: an unknown format, an unusable checkpoint or calibration.json, or ``out`` a folder.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; use one of {FORMATS}")
    checkpoint = resolve_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    temperature, source = run_temperature(checkpoint, calibration)
    print(describe(temperature, source) + (" (not applied: --logits)" if logits and temperature else ""))
    out_fs, out_path = storage.resolve(out)
    if storage.exists(out_fs, out_path, out) and out_fs.get_file_info(out_path).type.name == "Directory":
        raise ConfigError(f"--out {out} is a folder; name the file to write, e.g. {storage.join(out, 'model.onnx')}")
    spec = InputSpec.from_dict(state.get("input"))
    meta = metadata(state, checkpoint, temperature, source, logits)
    module = ExportedClassifier(model_from_checkpoint(state), spec, meta["image_size"], temperature, logits).eval()
    example = example_images(spec, meta["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.onnx" if fmt == "onnx" else "model.pt2")
        with torch.no_grad():
            (_save_onnx if fmt == "onnx" else _save_torch_export)(module, example, meta, local)
        with open(local, "rb") as f:
            storage.write_bytes_atomic(out_fs, out_path, f.read(), out)
    return meta


def read_torch_export(path: str) -> tuple[torch.export.ExportedProgram, dict]:
    """A ``torch.export`` archive written by :func:`export_model` and its metadata."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program, json.loads(extra[METADATA_FILE])
