"""`tunelab export RUN --format gguf|ollama [--quant ...] -o DIR`: write, read back, compare.

For each quantisation type one `<name>-<quant>.gguf` is written from the merged fp32 model, then
read back with transformers' GGUF reader (models.gguf.read_gguf: config, tokenizer, de-quantised
tensors) and compared with the source on the run's own prompts (export.check): logits, greedy
continuations, tokenization, and that the chat template and end-of-turn token came through.
`--format ollama` adds a Modelfile (export.ollama) whose template is rendered back and compared
with the training render. Everything is written in a temporary folder and moved into DIR only
when every check passed; on a failed check DIR keeps only the reports.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tunelab.errors import InputError
from tunelab.export.check import ExportMismatch, check_and_save
from tunelab.export.merge import empty_output
from tunelab.export.source import load_merged, locate, training_prompts

FORMATS = ("gguf", "ollama")


def export_run(path: str | Path, out: str | Path, fmt: str = "gguf", quants: list[str] | tuple = ("f16",),
               *, system: str | None = None, corrupt=None, llama_cpp: str = "auto") -> dict:
    """Export `path` (run dir, model or adapter folder) to `out`; returns the files and their checks.

    `llama_cpp`: "auto" also runs each file in real llama.cpp when it is installed (export.llamacpp),
    "on" requires it (InputError when it is not installed), "off" skips it.
    `corrupt`: a test hook applied to each read-back model before the comparison.
    """
    from tunelab.export.gguf_writer import QUANTS

    if fmt not in FORMATS:
        raise InputError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}", field="--format")
    quants = list(dict.fromkeys(quants or ["f16"]))
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        raise InputError(f"unknown quantisation '{bad[0]}'; choose from {', '.join(QUANTS)}", field="--quant")
    if llama_cpp not in ("auto", "on", "off"):
        raise InputError(f"--llama-cpp must be auto, on or off, not '{llama_cpp}'", field="--llama-cpp")
    if llama_cpp == "on":
        from tunelab.export.llamacpp import available

        if available():
            raise InputError(f"--llama-cpp on: {available()}", field="--llama-cpp")
    if fmt == "ollama" and len(quants) != 1:
        raise InputError("--format ollama takes one --quant (the Modelfile names one GGUF)", field="--quant")
    out = Path(out)
    src = locate(path)
    empty_output(out)
    model, tokenizer = load_merged(src)
    name = (src.run_dir or src.folder).resolve().name
    prompts = training_prompts(src, tokenizer)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = []
    try:
        for quant in quants:
            files.append(_export_one(model, tokenizer, tmp / f"{name}-{quant}.gguf", quant, prompts, name, corrupt,
                                     llama_cpp))
        if fmt == "ollama":
            files[0]["modelfile"] = _write_modelfile(tmp, files[0], tokenizer, model, src)
    except ExportMismatch:
        _keep_reports(tmp, out)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    for f in files:
        for key in ("file", "report", "modelfile"):
            if f.get(key):
                f[key] = str(out / Path(f[key]).name)
    return {"source": str(src.folder), "format": fmt, "output": str(out), "files": files}


def _export_one(model, tokenizer, path: Path, quant: str, prompts: list[str], name: str, corrupt,
                llama_cpp: str = "auto") -> dict:
    from tunelab.export.gguf_writer import write_gguf
    from tunelab.models.gguf import end_of_turn_id, read_gguf

    written = write_gguf(model, tokenizer, path, quant, name=name)
    back, back_tok = read_gguf(path)
    if corrupt is not None:
        corrupt(back)
    report_path = path.with_suffix(".check.json")
    metadata = {"chat_template_equal": back_tok.chat_template == tokenizer.chat_template,
                "end_of_turn_equal": end_of_turn_id(back_tok) == end_of_turn_id(tokenizer)}
    report = check_and_save(model, back, tokenizer, prompts, quant, report_path, output_tokenizer=back_tok)
    report.update(metadata)
    if not all(metadata.values()):
        report["passed"] = False
        report["problems"] = [f"{k} is false" for k, v in metadata.items() if not v]
        report_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
        raise ExportMismatch(f"the GGUF metadata lost the chat template or end-of-turn token (details in {report_path})")
    report["llama_cpp"] = _run_llamacpp(model, tokenizer, prompts, report, path, llama_cpp)
    report["passed"] = report["llama_cpp"].get("passed", True)
    report_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    if not report["passed"]:
        raise ExportMismatch(f"real llama.cpp runs the file differently: {'; '.join(report['llama_cpp']['problems'])} "
                             f"(details in {report_path})")
    return {**written, "report": str(report_path), "check": report}


def _run_llamacpp(model, tokenizer, prompts, report: dict, path: Path, mode: str) -> dict:
    """compare_llamacpp when llama.cpp is installed (and not switched off); else why it did not run. A file
    llama.cpp refuses to load is a failed check, with llama.cpp's own message."""
    from tunelab.export.check import compare_llamacpp
    from tunelab.export.llamacpp import available

    why = "switched off (--llama-cpp off)" if mode == "off" else available()
    if why:
        return {"ran": False, "why": why}
    try:
        return compare_llamacpp(model, tokenizer, prompts, report, path)
    except RuntimeError as e:
        return {"ran": True, "passed": False, "problems": [str(e)]}


def _write_modelfile(folder: Path, gguf_info: dict, tokenizer, model, src) -> str:
    from tunelab.export.ollama import MODELFILE, build_modelfile, check_modelfile

    from tunelab.export.gguf_writer import adds_bos

    add_bos = adds_bos(tokenizer)
    num_ctx = _training_context(src) or model.config.max_position_embeddings
    mf = build_modelfile(tokenizer, Path(gguf_info["file"]).name, add_bos=add_bos, num_ctx=num_ctx,
                         generation_config=getattr(model, "generation_config", None))
    text = mf.text()
    (folder / MODELFILE).write_text(text, encoding="utf-8")
    result = check_modelfile(text, tokenizer, add_bos)
    (folder / "Modelfile.check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    if not result["passed"]:
        raise ExportMismatch("the Modelfile renders conversations differently from training "
                             f"({result['renders_equal']}/{result['conversations']} equal)")
    gguf_info["modelfile_check"] = result
    return str(folder / MODELFILE)


def _training_context(src) -> int | None:
    import yaml

    cfg_path = src.run_dir / "config.yaml" if src.run_dir is not None else None
    if cfg_path is None or not cfg_path.is_file():
        return None
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    return (cfg.get("model") or {}).get("max_length")


def _keep_reports(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.glob("*.json"):
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
