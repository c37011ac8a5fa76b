"""The `tunelab` command: one typer app; each verb is a thin call into the library.

Exit codes: 0 done; 2 bad input (one line naming file, line and field, no traceback unless
--debug); 1 an internal error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
import typer.core

from tunelab.errors import InputError, RunFailure

class OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (an unknown flag, `--nproc 0`, a missing argument) as one line and exit 2, like
    every other input error, instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = typer.core._click  # typer vendors its own click; its exceptions are these
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)

        def usage_error(message: str, code: int) -> None:
            click.echo(f"error: {message}", err=True)
            if "--json" in argv:  # the verb never ran, so its own --json handling cannot say it
                click.echo(json.dumps({"error": {"kind": "usage", "message": message, "exit_code": code}}))
            sys.exit(code)

        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(2)
        except click.exceptions.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            usage_error(f"{' '.join(e.format_message().split())}{where}", e.exit_code)
        except click.exceptions.ClickException as e:
            usage_error(" ".join(e.format_message().split()), e.exit_code)
        except typer.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, cls=OneLineUsageErrors,
                  help="Fine-tune pre-trained language models on your own data.")
data_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Check and clean data files before training.")
app.add_typer(data_app, name="data")

_state = {"debug": False}


def _show_version(value: bool) -> None:
    if value:
        from tunelab.model_card import versions

        v = versions()
        typer.echo(f"tunelab {v.pop('tunelab', '?')} (" + ", ".join(f"{k} {x}" for k, x in v.items()) + ")")
        raise typer.Exit(0)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for every error."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="Print tunelab's version (and its libraries') and exit.")):
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("tunelab").setLevel(logging.INFO)


def _rank_prefix() -> str:
    """'[rank N] ' in a training process other than rank 0 (under torchrun), else ''."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def _guard(fn, *args, **kwargs):
    """Run a verb; turn InputError into exit 2 and anything unexpected into exit 1."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        if _state["debug"]:
            traceback.print_exc()
        if not _rank_prefix():  # every process reads the same input: rank 0 says it once
            typer.echo(f"error: {e.one_line()}", err=True)
            _json_error("input", e.message, 2, file=e.file, line=e.line, field=e.field, where=e.where)
        raise typer.Exit(2)
    except RunFailure as e:
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"{_rank_prefix()}error: {e}", err=True)
        _json_error("failure", str(e), 1)
        raise typer.Exit(1)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:
        if _state["debug"]:
            traceback.print_exc()
        what = " ".join(str(e).split())[:300]  # one line, whatever the exception held
        typer.echo(f"{_rank_prefix()}internal error: {type(e).__name__}: {what} (rerun with --debug for the traceback; "
                   "please report it)", err=True)
        _json_error("internal", f"{type(e).__name__}: {e}", 1)
        raise typer.Exit(1)


def _json_requested() -> bool:
    """Whether the running verb was given --json (its `as_json` parameter)."""
    from typer._click.globals import get_current_context  # typer vendors click

    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def _json_error(kind: str, message: str, code: int, **where) -> None:
    """Under --json an error is also one JSON object on stdout (a script reads stdout; a person, stderr):
    {"error": {"kind": input|failure|internal, "message", "exit_code", "file", "line", "field"}}."""
    if not _json_requested() or _rank_prefix():
        return
    where = {k: v for k, v in where.items() if v is not None}
    typer.echo(json.dumps({"error": {"kind": kind, "message": " ".join(str(message).split()), "exit_code": code, **where}}))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_before_after(summary: dict, err: bool = False) -> None:
    before, final = summary.get("before") or {}, summary.get("final") or {}
    if not final:
        return
    typer.echo(f"{'metric':<12} {'before':>10} {'after':>10}", err=err)
    for key in ("loss", "accuracy", "macro_f1", "perplexity", "token_accuracy"):
        if key in final:
            typer.echo(f"{key:<12} {_fmt(before.get('eval_' + key, '-')):>10} {_fmt(final[key]):>10}", err=err)


def _final_line(summary: dict) -> str:
    """The run's last words: status, speed, memory, what became of each logger, where things are."""
    run_dir = summary["run_dir"]
    failed = {k: v for k, v in (summary.get("loggers") or {}).items() if v != "ok"}
    loggers = ("; loggers " + ", ".join(f"{k} {v}" for k, v in summary["loggers"].items())) if summary.get("loggers") else ""
    line = (f"{summary['status']} in {summary.get('wall_seconds') or 0:.0f}s: "
            f"{summary.get('samples_per_second') or 0:.1f} samples/s, peak memory {summary.get('peak_memory_mb') or 0:.0f} MB"
            f"{loggers}\n  model  {run_dir}/final\n  report {run_dir}/report.html")
    return line + ("\n  warning: a logger failed, so its tracking is incomplete (metrics.jsonl has every row)" if failed else "")


def _already_done(out: Path, as_json: bool) -> bool:
    """`--resume auto` on a run that already finished: say so (summary.json's object under --json), exit 0."""
    try:
        summary = json.loads((Path(out) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("status") not in ("completed", "early_stopped"):
        return False  # a damaged summary.json: the resume itself says so
    if not (Path(out) / "report.html").exists():
        return False  # stopped between summary.json and its report: run_training writes the report
    typer.echo(f"{out} already finished ({summary['status']}, {summary.get('steps')} steps); nothing to resume",
               err=as_json)
    if as_json:
        typer.echo(json.dumps(summary))
    return True


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set optim.lr=1e-4 (repeatable)."),
    output_dir: Optional[Path] = typer.Option(None, "--output", "-o", "--output-dir",
                                              help="Run dir (default runs/<config>-<time>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest intact checkpoint in the run dir) or a checkpoint folder."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar or step lines."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes training together (DDP; one per GPU, or CPU "
                              "processes): relaunches under torchrun. train.batch_size is per process."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json's object at the end (stdout); the "
                                 "human lines go to stderr."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines training together (torchrun's rendezvous); "
                               "run the same command on each with its --node-rank; --nproc is per machine."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's rank among --nnodes (0 writes the run dir)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Host name or address of node 0 (--nnodes > 1)."),
    master_port: int = typer.Option(29500, "--master-port", min=1, max=65535, help="A free port on node 0."),
):
    """Fine-tune a model; writes config.yaml, metrics.jsonl, checkpoints/, final/, summary.json, report.html."""

    def go():
        from tunelab.config import load_config, locate_key

        cfg = load_config(config, set_)  # before importing torch: a bad config fails at once
        _start_on_allocator(cfg, config, set_)
        if resume == "auto" and output_dir is not None and _already_done(output_dir, as_json):
            return  # a requeued job whose run finished: nothing to do, and not a failure
        under_torchrun = "WORLD_SIZE" in os.environ
        if under_torchrun and nproc > 1 and nproc != int(os.environ["WORLD_SIZE"]):
            raise InputError(f"--nproc {nproc} but torchrun started {os.environ['WORLD_SIZE']} processes; "
                             "give one or the other")
        from tunelab.run import run_training

        try:
            if (nproc > 1 or nnodes > 1) and not under_torchrun:
                nodes = _nodes(nnodes, node_rank, master_addr, master_port)
                raise typer.Exit(_relaunch(cfg, config, set_, output_dir, resume, no_progress, nproc, nodes))
            # under --json stdout holds the JSON alone: whatever a library prints meanwhile goes to stderr
            with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                summary = run_training(cfg, output_dir, config_path=config, resume=resume,
                                       show_progress=not no_progress)
        except InputError as e:
            if e.file is not None or not e.field:
                raise
            # a config value that only the library could judge (model.name, checkpoint.metric): point at its key
            raise InputError(e.message, field=e.field, **locate_key(config, e.field, set_)) from None
        status = summary["status"]
        if summary.get("rank"):  # a process other than rank 0 under torchrun: rank 0 reports
            raise typer.Exit({"interrupted": 130, "diverged": 1}.get(status, 0))
        run_dir = summary["run_dir"]
        if as_json:  # summary.json's object on stdout; the human lines below go to stderr
            typer.echo(json.dumps(summary))
        if status == "interrupted":
            world = summary.get("world_size", 1)
            typer.echo(f"stopped at step {summary['steps']}; checkpoint saved. Resume with:\n"
                       f"  tunelab train {config} --output-dir {run_dir} --resume auto"
                       f"{f' --nproc {world}' if world > 1 else ''}", err=True)
            raise typer.Exit(130)
        if status == "diverged":
            typer.echo(_diverged_line(summary), err=True)
            raise typer.Exit(1)
        _print_before_after(summary, err=as_json)
        typer.echo(_final_line(summary), err=as_json)

    _guard(go)


def _diverged_line(summary: dict) -> str:
    """What a diverged run says: the rows behind the NaN/Inf steps, and a checkpoint only if one exists."""
    examples = summary.get("nonfinite_examples") or []
    rows = f"; the non-finite steps came from {', '.join(examples[:6])}{' ...' if len(examples) > 6 else ''}" if examples else ""
    ckpt = summary.get("last_good_checkpoint")
    kept = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint was saved before the fault"
    return (f"training diverged: {summary['skipped_steps']} steps had NaN/Inf loss or gradients{rows} "
            f"(check those rows; else lower optim.lr or use precision fp32); {kept}")


def _nodes(nnodes: int, node_rank: int, master_addr: Optional[str], master_port: int):
    """The multi-node rendezvous of `tunelab train --nnodes M`, checked before any process starts; None alone."""
    from tunelab.distributed.launch import Nodes

    if nnodes == 1:
        return None
    if master_addr is None:
        raise InputError("--nnodes > 1 needs --master-addr (node 0's host name or address, the same on every node)")
    if node_rank >= nnodes:
        raise InputError(f"--node-rank {node_rank} is not below --nnodes {nnodes}: give each machine 0 .. {nnodes - 1}")
    return Nodes(nnodes, node_rank, master_addr, master_port)


def _relaunch(cfg, config: Path, set_: list[str], output_dir: Optional[Path], resume: Optional[str],
              no_progress: bool, nproc: int, nodes=None) -> int:
    """`tunelab train ... --nproc N`: the same command as N processes under torchrun; their exit code.

    Everything that can be judged here is, before any process starts: the config, --nproc against
    the machine, options that do not work with several processes. The output dir is fixed here so
    that every process writes the same one.
    """
    from tunelab.compose import check_distributed
    from tunelab.distributed.launch import check_nproc, launch
    from tunelab.run_dir import default_output_dir

    check_nproc(nproc)
    check_distributed(cfg, nproc * (nodes.nnodes if nodes else 1))
    out = output_dir or default_output_dir(config)
    # no --nproc for the workers: torchrun's own parser would take it for its --nproc-per-node
    args = ["train", str(config), *[a for item in set_ for a in ("--set", item)], "--output-dir", str(out)]
    args += (["--resume", resume] if resume else []) + (["--no-progress"] if no_progress else [])
    args += ["--json"] if _json_requested() else []  # rank 0 prints summary.json's object
    return launch(nproc, (["--debug"] if _state["debug"] else []) + args, debug=_state["debug"], nodes=nodes)


@app.command()
def plan(
    config: Optional[Path] = typer.Argument(None, help="YAML config file (the one you would train with); "
                                            "optional with --model."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.batch_size=4 (repeatable)."),
    measure_steps: int = typer.Option(3, "--measure-steps", min=0,
                                      help="Real optimizer steps to time (after one warm-up); 0 = no timing."),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", min=0,
                                                   help="Price per machine-hour here; per device-hour with --gpu."),
    no_suggestions: bool = typer.Option(False, "--no-suggestions", help="Skip the what-if estimates of memory levers."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Plan for `tunelab train --nproc N` (data-parallel processes)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    # planning for hardware you do not have, from the model's config.json alone (README: Planning)
    model: Optional[str] = typer.Option(None, "--model", help="NAME, model DIR or config.json: plan from the "
                                        "architecture alone (meta device: no weights, no tokenizer)."),
    method: Optional[str] = typer.Option(None, "--method", help="full | lora | qlora."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", min=1),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="a,b,c (module names), auto, all-linear; "
                                               "q,v = the slices of a fused c_attn."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Tokens per sequence (model.max_length)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Micro-batch per device."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", min=1),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16."),
    weights_dtype: Optional[str] = typer.Option(None, "--weights-dtype", help="fp32 (default) | bf16: "
                                                "train.weights_dtype (bf16 weights and gradients; ddp only)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    attention: Optional[str] = typer.Option(None, "--attention", help="sdpa (default) | flash | eager."),
    tokens: Optional[float] = typer.Option(None, "--tokens", min=1, help="Training tokens, all epochs (time, cost)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="A10G, L4, RTX4090, A100-40GB, A100-80GB, H100, "
                                      "H100-PCIe, H200, B200, MI300X."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=0.1, help="GB per device (other devices)."),
    gpu_tflops: Optional[float] = typer.Option(None, "--gpu-tflops", min=0.001, help="Dense bf16 TFLOPS per device."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="Devices per node."),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="ddp | fsdp | zero1 | zero2 | zero3."),
    offload: bool = typer.Option(False, "--offload", help="Optimizer state (and master weights) in host memory."),
    mfu: Optional[float] = typer.Option(None, "--mfu", min=0.001, max=1.0, help="Model FLOPs utilisation (default 0.4)."),
    interconnect: Optional[str] = typer.Option(None, "--interconnect", help="Link the collectives cross: nvlink3, "
                                               "nvlink4, nvlink5, infinity-fabric, pcie3/4/5, infiniband, ethernet, "
                                               "gloo-loopback (default: the GPU's own; infiniband across nodes)."),
    link_bandwidth: Optional[float] = typer.Option(None, "--link-bandwidth", min=0.001,
                                                   help="GB/s per device and direction (overrides the link's)."),
    comm_overlap: Optional[float] = typer.Option(None, "--comm-overlap", min=0.0, max=1.0,
                                                 help="Share of communication hidden behind computation (default 0)."),
    tokens_saved: Optional[int] = typer.Option(None, "--prompting-tokens-saved", min=1,
                                               help="Prompt tokens per request a fine-tune makes unnecessary."),
    price_in: Optional[float] = typer.Option(None, "--price-in", min=0, help="Prompting: price per 1M input tokens."),
    price_out: Optional[float] = typer.Option(None, "--price-out", min=0, help="Prompting: price per 1M output tokens."),
    requests: Optional[int] = typer.Option(None, "--requests", min=1, help="Requests to compare the two at."),
):
    """Peak memory, steps, FLOPs, time and cost before you train; with --model / --gpu: memory per device,
    sharding, time and cost on hardware you do not have, ranked configurations and the command to run."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "set_", "measure_steps", "no_suggestions",
                                                            "nproc", "as_json")}

    def go():
        from tunelab.config import load_config
        from tunelab.plan import hardware_plan
        from tunelab.plan.report import hardware_lines, plan_lines

        if config is None and model is None:
            raise InputError("give a CONFIG.yaml, or --model NAME|DIR|CONFIG_JSON", field="config")
        overrides = list(set_) + (hardware_plan.shape_overrides(flags) if config is not None else [])
        cfg = load_config(config, overrides) if config is not None else None
        on_hardware = hardware_plan.wants_hardware_plan(flags)
        if cfg is not None and measure_steps and not on_hardware:
            _start_on_allocator(cfg, config, overrides)  # the measured steps' peak is then the run's
        if on_hardware:
            spec = hardware_plan.spec_from(flags, cfg, str(config) if config else None)
            if spec.tokens is None and cfg is not None:
                spec.tokens = hardware_plan.tokens_from_config(cfg)
            breakeven = hardware_plan.break_even_args(flags)
            result = hardware_plan.build(spec, breakeven, explicit_method=cfg is not None or method is not None)
            typer.echo(json.dumps(result) if as_json else "\n".join(hardware_lines(result)))
            return
        from tunelab.plan.planner import make_plan

        from tunelab.defaults import default_lines, resolved_defaults

        result = make_plan(cfg, measure_steps=measure_steps, price_per_hour=price_per_hour,
                           suggestions=not no_suggestions, nproc=nproc, interconnect=interconnect,
                           link_gb_per_s=link_bandwidth, overlap=comm_overlap)
        result["defaults"] = resolved_defaults(cfg)  # the keys tunelab chose because the config left them unset
        typer.echo(json.dumps(result) if as_json else "\n".join(plan_lines(result) + default_lines(result["defaults"])))

    _guard(go)


@app.command("eval")
def eval_(
    model_dir: Path = typer.Argument(..., help="A run dir (its final/) or a saved model folder: classifier, "
                                     "causal LM or chat model (a LoRA adapter folder too)."),
    data: Path = typer.Option(..., "--data", help="Classifier: a labelled file (csv/tsv/jsonl/json/parquet). "
                              "Causal LM / chat: conversations (any chat format) or plain text."),
    text_column: str = typer.Option("text", help="Classifier: the column holding the text."),
    label_column: str = typer.Option("label", help="Classifier: the column holding the label."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Default 64 (classifier), 8 (causal LM)."),
    max_length: Optional[int] = typer.Option(None, min=1, help="Default 128 (classifier), 512 (causal LM)."),
    n: int = typer.Option(16, "--n", min=0, help="Causal LM: prompts to generate replies for (0 = no generation)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Causal LM: reply budget."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="Causal LM: the sampled replies' temperature."),
    seed: int = typer.Option(0, "--seed", help="Causal LM: the sampled replies' seed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Classifier: loss, accuracy, macro-F1, per class, confusion matrix. Causal LM / chat: loss, perplexity
    and token accuracy on the supervised tokens (the training masks), and generation measures on the file's
    prompts (greedy and sampled: stop rate, lengths, distinct-1/2, cross-prompt similarity, repetition,
    template leakage, chrF and ROUGE-L against the reference answers)."""

    def go():
        from tunelab.evaluate.saved_lm import check_fits, model_kind, resolve_model_dir

        folder = resolve_model_dir(model_dir)
        kind = model_kind(folder)
        check_fits(folder, kind, data, label_column)
        if kind == "causal_lm":
            from tunelab.config import GenerateEvalConfig
            from tunelab.evaluate.saved_lm import evaluate_saved_lm, lm_eval_lines

            settings = GenerateEvalConfig(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            out = evaluate_saved_lm(folder, data, max_length=max_length or 512, batch_size=batch_size or 8,
                                    settings=settings)
            typer.echo(json.dumps(out) if as_json else "\n".join(lm_eval_lines(out)))
            return
        from tunelab.evaluate.saved_model import evaluate_saved_classifier

        metrics = evaluate_saved_classifier(folder, data, text_column=text_column, label_column=label_column,
                                            batch_size=batch_size or 64, max_length=max_length or 128)
        if as_json:
            typer.echo(json.dumps(metrics))
            return
        typer.echo(f"rows {metrics['rows']}  loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  "
                   f"macro-F1 {metrics['macro_f1']:.4f}")
        for name, m in metrics["per_class"].items():
            typer.echo(f"  {name:<16} precision {m['precision']:.3f}  recall {m['recall']:.3f}  support {m['support']}")

    _guard(go)


def _token_counter(name: Optional[str]):
    """Tokens per text with the tokenizer of a model (embedded name, folder or hub id); None = off."""
    if name is None:
        return None
    from tunelab.models.load import load_tokenizer
    from tunelab.models.registry import resolve_model

    try:
        tok = load_tokenizer(resolve_model(name))
    except InputError as e:
        raise InputError(e.message, file=e.file, field="--tokenizer") from None
    return lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def _report_lines(report: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict) and key == "eval":
            lines += [f"{indent}eval:"] + _report_lines(value, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return lines


def _clean_lines(report: dict) -> list[str]:
    lines = [f"kept {report['kept']} of {report['rows']} rows of {report['file']} -> {report['out']} ({report['out_format']})"]
    for reason, n in report["dropped"].items():
        lines.append(f"  {reason:<17} {n:>6}  e.g. {', '.join(report['examples'][reason][:3])}")
    if "eval" in report:
        lines += ["eval: " + _clean_lines(report["eval"])[0]] + _clean_lines(report["eval"])[1:]
    return lines


_TASK_HELP = "classification, chat or text; auto = from the first record's keys ('label' -> classification)."
_NEAR_HELP = "Also drop near-duplicates: word-3-gram Jaccard >= this (e.g. 0.8; MinHash-proposed, exactly checked)."


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="Data file to validate (classification, chat or plain text)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="An eval file: checked too, and for leakage from FILE."),
    task: str = typer.Option("auto", "--task", help=_TASK_HELP),
    text_column: str = typer.Option("text", help="Classification: the column holding the text."),
    label_column: str = typer.Option("label", help="Classification: the column holding the label."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="A model whose tokenizer counts tokens (lengths, assistant token share)."),
    near_dup: Optional[float] = typer.Option(None, "--near-dup", help=_NEAR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Validate a data file as training would read it; report rows, labels or chat turns, lengths,
    duplicates, label conflicts, leakage into --eval, and what `data clean` would drop.

    Exit 2 at the first row training would refuse (empty text, empty or missing assistant turn),
    with how many such rows there are; `data clean` drops them."""

    def go():
        from tunelab.data.check import check_files
        from tunelab.data.curate import Filters

        report = check_files(file, eval_file=eval_file, task=task, text_column=text_column, label_column=label_column,
                             filters=Filters(near_duplicate=near_dup), count_tokens=_token_counter(tokenizer))
        typer.echo(json.dumps(report) if as_json else "\n".join(_report_lines(report)))

    _guard(go)


@data_app.command("clean")
def data_clean(
    file: Path = typer.Argument(..., help="Data file to clean (classification, chat or plain text)."),
    out: Path = typer.Option(..., "--output", "-o", "--out", help="Where the kept rows go. Its suffix picks the format "
                             "(.jsonl .json .csv .tsv .parquet; .txt for plain text); give FILE's suffix to keep "
                             "its format. Rows are written as read, every column. Never FILE itself."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="An eval file: cleaned by the same rules, minus rows "
                                             "whose text (or conversation) is in FILE (leakage)."),
    eval_out: Optional[Path] = typer.Option(None, "--eval-out", help="Where the kept eval rows go (needed with --eval)."),
    task: str = typer.Option("auto", "--task", help=_TASK_HELP),
    text_column: str = typer.Option("text", help="Classification: the column holding the text."),
    label_column: str = typer.Option("label", help="Classification: the column holding the label."),
    min_chars: Optional[int] = typer.Option(None, "--min-chars", help="Drop rows with fewer characters (chat: all message text)."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Drop rows with more characters."),
    min_tokens: Optional[int] = typer.Option(None, "--min-tokens", help="Drop rows with fewer tokens (needs --tokenizer)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Drop rows with more tokens (needs --tokenizer)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="A model whose tokenizer counts tokens (embedded name or folder)."),
    near_dup: Optional[float] = typer.Option(None, "--near-dup", help=_NEAR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Drop empty rows, rows out of the length bounds, label conflicts (every copy), duplicates
    after normalisation (NFKC, whitespace, case; the first copy stays) and, with --eval, eval rows
    leaked from FILE; write the rest atomically. Counts per reason with file:line examples."""

    def go():
        from tunelab.data.clean import clean_files
        from tunelab.data.curate import Filters

        filters = Filters(min_chars=min_chars, max_chars=max_chars, min_tokens=min_tokens, max_tokens=max_tokens,
                          near_duplicate=near_dup)
        report = clean_files(file, out, eval_file=eval_file, eval_out=eval_out, task=task, text_column=text_column,
                             label_column=label_column, filters=filters, count_tokens=_token_counter(tokenizer))
        typer.echo(json.dumps(report) if as_json else "\n".join(_clean_lines(report)))

    _guard(go)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="A causal-LM folder or a run dir (its final/)."),
    prompt: str = typer.Option(..., "--prompt", help="The user's message."),
    system: Optional[str] = typer.Option(None, "--system", help="An optional system message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """One assistant reply, rendered with the model's saved chat template; stops at the end of the turn."""

    def go():
        from tunelab.evaluate.generate import generate_reply
        from tunelab.evaluate.saved_lm import require_causal_lm, resolve_model_dir
        from tunelab.models.saved import load_saved_causal_lm

        folder = resolve_model_dir(model_dir)
        require_causal_lm(folder, "generate")
        model, tok = load_saved_causal_lm(folder)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out = generate_reply(model, tok, messages, max_new_tokens=max_new_tokens, temperature=temperature)
        typer.echo(json.dumps(out) if as_json else out["reply"])

    _guard(go)


@app.command()
def chat(
    model_dir: Path = typer.Argument(..., help="A causal-LM folder or a run dir (its final/)."),
    system: Optional[str] = typer.Option(None, "--system", help="An optional system message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
):
    """A terminal chat: one line per user turn, history kept; /exit or end of input quits."""

    def go():
        from tunelab.evaluate.generate import generate_reply
        from tunelab.evaluate.saved_lm import require_causal_lm, resolve_model_dir
        from tunelab.models.saved import load_saved_causal_lm

        folder = resolve_model_dir(model_dir)
        require_causal_lm(folder, "chat")
        model, tok = load_saved_causal_lm(folder)
        history = [{"role": "system", "content": system}] if system else []
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                typer.echo("you> ", nl=False)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            out = generate_reply(model, tok, history, max_new_tokens=max_new_tokens, temperature=temperature)
            history.append({"role": "assistant", "content": out["reply"]})
            typer.echo(f"assistant> {out['reply']}")

    _guard(go)


@app.command()
def drift(
    model_or_run: Path = typer.Argument(..., help="A run dir (its final/), a model folder or a LoRA adapter folder."),
    base: Optional[str] = typer.Option(None, "--base", help="The base model (embedded name, folder or hub id); "
                                       "default: the run's model.name or the adapter's base."),
    top: int = typer.Option(10, "--top", min=1, help="How many most-changed layers to list."),
    threshold: float = typer.Option(0.1, "--threshold", min=0.0, help="Flag layers whose relative change exceeds it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Weight drift against the base: relative change, cosine and |dW| per tensor and layer; new tensors; flags."""

    def go():
        from tunelab.analysis.drift import format_drift, weight_drift

        out = weight_drift(model_or_run, base, top=top, threshold=threshold)
        typer.echo(json.dumps(out) if as_json else format_drift(out))

    _guard(go)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A finished run dir (holds summary.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """(Re)write RUN_DIR/report.html, with a weight-drift section when the base is available locally."""

    def go():
        from tunelab.analysis.report import rewrite_report

        out = rewrite_report(run_dir)
        if as_json:
            typer.echo(json.dumps(out))
            return
        typer.echo(f"wrote {out['report']} ({', '.join(out['sections'])})")
        if out["drift_skipped"]:
            typer.echo(f"drift not included: {out['drift_skipped']}")

    _guard(go)


from tunelab.cli_export import register as _register_export  # noqa: E402  (merge, export, push)

_register_export(app, _guard)


from tunelab.cli_runs import register as _register_runs  # noqa: E402  (compare, config, init)

_register_runs(app, _guard)

from tunelab.cli_lr import register as _register_lr  # noqa: E402  (lr-find)

_register_lr(app, _guard)

from tunelab.cli_cache import register as _register_cache  # noqa: E402  (cache ls, cache clear)

_register_cache(app, _guard)


def _start_on_allocator(cfg, config: Path | None, overrides: list[str]) -> None:
    """Re-execute this process on the malloc the config's train.host_allocator names (the real
    `tunelab` program only: the allocator binds at process start). `train` runs on it; `plan` measures
    its steps on it, so the measured peak is the one the run will have (glibc keeps a step's freed
    activations as fragmented heap: a DPO LoRA step peaked 4.9 GB on glibc, 3.1 GB on tcmalloc). A
    named allocator the machine lacks is an input error at its config line."""
    if not _AS_PROGRAM:
        return
    from tunelab.config import locate_key
    from tunelab.host_allocator import reexec

    try:
        reexec(cfg.train.host_allocator)
    except LookupError as e:
        raise InputError(str(e), field="train.host_allocator",
                         **locate_key(config, "train.host_allocator", overrides)) from None


_AS_PROGRAM = False  # set by main(): the real `tunelab` process, which may re-execute itself (not CliRunner)


def main() -> None:
    global _AS_PROGRAM
    _AS_PROGRAM = True
    app()


if __name__ == "__main__":
    main()
