"""Sharded training (distributed.strategy fsdp / zero1 / zero2 / zero3) on 2 CPU processes (gloo):
the same steps as one process over the same examples, every process holding its share of the
model states, the sharded checkpoint consolidating to the weights that were trained, the CLI end to
end, and the refusals. One torchrun launch trains every strategy on both tasks; its results are
shared by the tests below."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import sentiment_rows, tiny_bert_folder, write_jsonl

pytestmark = pytest.mark.multiprocess

STRATEGIES = ["fsdp", "zero1", "zero2", "zero3"]

# A few optimizer steps through tunelab's own setup and loop. Under torchrun each strategy trains
# with its real replicas (setup shards the model / starts DeepSpeed), writes its checkpoint shards and
# consolidates them on rank 0; alone (the reference) the same function trains one process whose
# window holds the same micro-batches (grad_accum x 2).
SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from tunelab.config import Config
    from tunelab.distributed import ALONE, init_from_env
    from tunelab.distributed.sharded import full_weights
    from tunelab.run import prepare_task, setup
    from tunelab.train.early_stop import BestTracker
    from tunelab.train.loop import LoopState, train_loop

    class Rows:
        def __init__(self): self.rows = []
        def log(self, row): self.rows.append(row)
        def save(self, state, tracker, is_best, metrics): pass
        def stop_requested(self): return False

    def train(raw, group, out=None):
        cfg = Config.model_validate(raw)
        r = setup(cfg, group.world_size, group)
        if out is not None:  # preference, full: the reference log-probs, computed through the shards
            out.mkdir(parents=True, exist_ok=True)
            prepare_task(r, out, group)
        for m in r.model.modules():  # no dropout: the same function on one process and on two
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        io = Rows()
        start = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad} \
            if r.sharding is None else None
        replicas = r.sharding.replicas if r.sharding is not None else None
        state = train_loop(r.model, r.optimizer, r.scheduler, r.task, r.settings, LoopState(world_size=group.world_size),
                           BestTracker(r.task.metric, r.task.mode), io, r.autocast, replicas)
        losses = [row["loss"] for row in io.rows if "loss" in row]
        norms = [row["grad_norm"] for row in io.rows if "loss" in row]
        if r.sharding is None:
            weights = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
            if out is not None and cfg.method in ("lora", "qlora"):  # final/'s adapter, as one process saves it
                r.task.save_final(r.model, out / "adapter")
            return {"weights": weights, "start": start, "losses": losses, "norms": norms, "samples": state.samples,
                    "trainable": r.trainable}
        r.sharding.replicas.save_shards(out / "shards", r.optimizer)
        r.sharding.gather_held()
        group.barrier()
        if group.is_main:
            if cfg.method in ("lora", "qlora"):  # final/'s adapter, as a sharded run saves it: rank 0's skeleton + shards
                r.task.save_final(r.sharding.plain_model(out), out / "adapter")
            return {"weights": full_weights(out), "losses": losses, "norms": norms, "samples": state.samples,
                    "held": r.sharding.ranks, "trainable": r.trainable}

    if __name__ == "__main__":
        group = init_from_env()
        cases = json.loads(Path(sys.argv[1]).read_text())
        for name, raw in cases.items():
            out = Path(sys.argv[2]) / name
            result = train(raw, group, out)
            if group.is_main:
                torch.save(result, out / "result.pt")
        group.close()
''')


def case_configs(tmp_path: Path, bert: Path, llama: Path) -> dict[str, dict]:
    from tiny_models import conversations, preference_pairs

    write_jsonl(tmp_path / "cls.jsonl", sentiment_rows(24, seed=1))
    write_jsonl(tmp_path / "chat.jsonl", conversations(24))
    write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(16))
    common = {"schedule": {"name": "constant", "warmup_steps": 0}, "early_stopping": {"enabled": False},
              "train": {"batch_size": 2, "grad_accum": 2, "max_steps": 3, "log_every": 1, "seed": 3,
                        "eval_before": False}}
    cls = {**common, "task": "classification", "model": {"name": str(bert), "max_length": 32},
           "data": {"train": str(tmp_path / "cls.jsonl"), "eval_split": 0.0},
           "optim": {"lr": 3e-3, "head_lr_multiplier": 1.0}}
    chat = {**common, "task": "chat", "model": {"name": str(llama), "max_length": 64},
            "data": {"train": str(tmp_path / "chat.jsonl"), "eval_split": 0.0, "packing": True},
            "optim": {"lr": 3e-3}, "train": {**common["train"], "batch_size": 1, "max_steps": 2}}
    lora = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    qlora = {**lora, "method": "qlora"}
    chat_gc = {**chat, **lora, "train": {**chat["train"], "gradient_checkpointing": True}}
    # DPO: full (the reference log-probs computed once through the shards) and LoRA (the adapter switched off)
    pref = {**common, "task": "preference", "model": {"name": str(llama), "max_length": 64},
            "data": {"train": str(tmp_path / "pairs.jsonl"), "eval_split": 0.0}, "optim": {"lr": 3e-3},
            "preference": {"loss": "dpo", "beta": 0.5}, "train": {**common["train"], "max_steps": 2}}
    cases = {}
    for strategy in STRATEGIES:
        for task, raw in (("cls", cls), ("chat", chat)):
            cases[f"{task}-{strategy}"] = {**raw, "distributed": {"strategy": strategy}}
    # LoRA under fsdp and zero3; gradient checkpointing + PEFT + ZeRO-3 (a known crash of the peers)
    for name, raw, strategy in (("cls+lora", {**cls, **lora}, "fsdp"), ("cls+lora", {**cls, **lora}, "zero3"),
                                ("chat+lora+gc", chat_gc, "zero3"), ("chat+qlora", {**chat, **qlora}, "fsdp"),
                                *((name, raw, s) for name, raw in (("pref", pref), ("pref+lora", {**pref, **lora}))
                                  for s in ("fsdp", "zero3"))):
        cases[f"{name}-{strategy}"] = {**raw, "distributed": {"strategy": strategy}}
    return cases


def no_dropout_bert(path: Path) -> Path:
    tiny_bert_folder(path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def torchrun(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Every strategy x task trained by 2 processes in one launch, and the one-process references."""
    from tiny_models import tiny_llama_folder

    tmp = tmp_path_factory.mktemp("sharding")
    cases = case_configs(tmp, no_dropout_bert(tmp / "bert"), tiny_llama_folder(tmp / "llama"))
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "script.py").write_text(SCRIPT)
    res = torchrun(str(tmp / "script.py"), str(tmp / "cases.json"), str(tmp))
    assert res.returncode == 0, res.stderr[-4000:]
    train = runpy.run_path(str(tmp / "script.py"))["train"]
    from tunelab.distributed import ALONE

    refs = {}
    for name in cases:
        task = name.rsplit("-", 1)[0]
        if task in refs:
            continue
        raw = dict(cases[name])
        raw.pop("distributed")
        raw["train"] = {**raw["train"], "grad_accum": 2 * raw["train"]["grad_accum"]}  # the same window, alone
        (tmp / f"ref-{task}").mkdir()
        refs[task] = train(raw, ALONE, tmp / f"ref-{task}")
    results = {name: torch.load(tmp / name / "result.pt", weights_only=False) for name in cases}
    return {"results": results, "refs": refs, "tmp": tmp}


def max_diff(a: dict, b: dict) -> float:
    """Over b's tensors; a may also name a tied one twice (the consolidated state dict's lm_head.weight)."""
    assert set(b) <= set(a), set(b) - set(a)
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("task,strategy", [(t, s) for t in ("cls", "chat") for s in STRATEGIES]
                         + [("cls+lora", "fsdp"), ("cls+lora", "zero3"), ("chat+lora+gc", "zero3"), ("chat+qlora", "fsdp")]
                         + [(t, s) for t in ("pref", "pref+lora") for s in ("fsdp", "zero3")])
@pytest.mark.parity
def test_two_sharded_processes_train_like_one_process(sharded, strategy, task):
    """Same global batch, fp32, AdamW: the loss curve, the gradient norms and the final weights of 2
    sharded processes equal one process's. Tolerance: the gradient sums run in another order (per
    process, then across processes), which changes the last bits of each gradient, and Adam's
    division by sqrt(v) amplifies that for near-zero gradients. Measured: weights within 1.5e-6 (zero3,
    chat; 1e-7 to 2e-7 elsewhere) after steps that moved them by 6e-3 to 9e-3; losses bit-equal. The
    bound, 1e-5, is about 1/600 of the movement, so a wrong gradient (a missed reduction, a micro-batch
    counted twice or lost, a wrong divisor) fails it by orders of magnitude."""
    got, ref = sharded["results"][f"{task}-{strategy}"], sharded["refs"][task]
    assert got["samples"] == ref["samples"] > 0  # every example once: no overlap, none lost
    assert len(got["losses"]) == len(ref["losses"]) >= 2
    # DPO's later losses read the moved weights through a sum of log-ratios over every answer token, scaled
    # by beta: the last-bit weight differences above reach them as ~1e-6 relative (zero3, measured 1.0e-6)
    loss_tol = 1e-5 if task.startswith("pref") else 1e-6
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) <= loss_tol * abs(b), (got["losses"], ref["losses"])
    for a, b in zip(got["norms"], ref["norms"]):
        assert abs(a - b) <= 1e-5 * abs(b), (got["norms"], ref["norms"])
    diff = max_diff(got["weights"], ref["weights"])
    assert diff <= 1e-5, diff
    assert max_diff(ref["weights"], ref["start"]) > 5e-3  # the steps moved the weights far beyond the bound


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parity
def test_sharded_dpo_computes_the_reference_once_through_the_shards(sharded, strategy):
    """Full DPO: the reference log-probs of every pair, computed by the 2 processes whose weights are in
    pieces (each forward gathers what its process lacks), equal the single process's, written once by
    rank 0 (the run dir's reference_logps.safetensors); the LoRA runs need none (adapter off)."""
    from safetensors.torch import load_file

    tmp = sharded["tmp"]
    got, ref = (load_file(str(tmp / d / "reference_logps.safetensors")) for d in (f"pref-{strategy}", "ref-pref"))
    assert got.keys() == ref.keys() == {"train", "eval"} and got["train"].shape == (16, 2)
    assert (got["train"] < 0).all()  # summed log-probs of real answers, not a zero placeholder
    assert (got["train"] - ref["train"]).abs().max().item() <= 1e-5
    assert not (tmp / f"pref+lora-{strategy}" / "reference_logps.safetensors").exists()
    losses = sharded["results"][f"pref-{strategy}"]["losses"]
    assert abs(losses[0] - 0.6931472) <= 1e-5 and abs(losses[1] - losses[0]) > 1e-4  # policy = reference, then moved


@pytest.mark.parametrize("task,strategy", [("cls+lora", "fsdp"), ("cls+lora", "zero3"), ("chat+lora+gc", "zero3"),
                                           ("chat+qlora", "fsdp")])
@pytest.mark.parity
def test_saved_adapter_of_two_sharded_processes_equals_one_process_adapter(sharded, task, strategy):
    """final/'s adapter_model.safetensors as a sharded run writes it (rank 0's skeleton filled from the
    consolidated shards) against the one a single process writes after the same steps: the same keys,
    every tensor non-empty and within the weights bound of the parity test (1e-5, same reasoning), and
    both load with peft onto the base model and give the same logits (within 1e-4: 1e-5 weight
    differences through a 2-layer model)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tmp = sharded["tmp"]
    got_dir, ref_dir = tmp / f"{task}-{strategy}" / "adapter", tmp / f"ref-{task}" / "adapter"
    got, ref = (load_file(str(d / "adapter_model.safetensors")) for d in (got_dir, ref_dir))
    assert got.keys() == ref.keys() and any("lora_A" in k for k in got) and any("lora_B" in k for k in got)
    assert all(t.numel() > 0 for t in got.values())  # the peers' ZeRO-3 failure: empty or partial tensors
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    if task.startswith("cls"):
        auto, base, batch = AutoModelForSequenceClassification, tmp / "bert", {"input_ids": torch.tensor([[2, 10, 11, 12, 3]])}
    else:
        auto, base, batch = AutoModelForCausalLM, tmp / "llama", {"input_ids": torch.tensor([[1, 5, 6, 7, 8]])}
    logits = []
    for folder in (got_dir, ref_dir):
        model = PeftModel.from_pretrained(auto.from_pretrained(base), folder).eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
    untouched = auto.from_pretrained(base).eval()
    with torch.no_grad():  # the adapter is on: the steps changed the outputs far beyond that bound
        assert (untouched(**batch).logits - logits[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("strategy,shares", [
    # (params, grads, optimizer state) each process holds, as a share of the whole (ZeRO paper, N = 2)
    ("fsdp", (0.5, 0.5, 0.5)),
    ("zero1", (1.0, 1.0, 0.5)),  # gradients whole while they accumulate, reduced to the share at the step
    ("zero2", (1.0, 0.5, 0.5)),
    ("zero3", (0.5, 0.5, 0.5)),
])
@pytest.mark.parity
def test_each_process_holds_its_share_of_the_model_states(sharded, strategy, shares):
    """Read from the tensors each process holds (local shards, ZeRO's partitions), against the whole:
    P fp32 weights, P gradients, and AdamW's 2P moments (+ ZeRO's fp32 master copy: 3P)."""
    got = sharded["results"][f"cls-{strategy}"]
    p = 4 * got["trainable"]  # bytes of one fp32 copy of the trainable parameters
    whole = (p, p, (2 if strategy == "fsdp" else 3) * p)
    assert [r["rank"] for r in got["held"]] == [0, 1]
    for row in got["held"]:
        held = (row["param_bytes"], row["grad_bytes"], row["optimizer_bytes"])
        for h, w, share in zip(held, whole, shares):
            assert abs(h / w - share) < 0.02, (strategy, held, whole)  # padding of flat partitions: < 2%


# --- the CLI end to end: tunelab train --nproc 2 with distributed.strategy fsdp ------------------

def e2e_config(folder: Path) -> Path:
    bert = no_dropout_bert(folder / "bert")
    write_jsonl(folder / "train.jsonl", sentiment_rows(24, seed=1))
    write_jsonl(folder / "eval.jsonl", sentiment_rows(8, seed=2))
    cfg = {"model": {"name": str(bert), "max_length": 32},
           "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl")},
           "optim": {"lr": 3e-3, "head_lr_multiplier": 1.0}, "schedule": {"name": "constant", "warmup_steps": 0},
           # 3 steps an epoch (2 processes x 4 examples), 2 epochs; an evaluation and a checkpoint every 2 steps
           "train": {"epochs": 2, "batch_size": 4, "seed": 3, "log_every": 1, "eval_every": 2},
           "checkpoint": {"final": "last", "keep_last": 2}, "early_stopping": {"enabled": False},
           "distributed": {"strategy": "fsdp"}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One uninterrupted `tunelab train --nproc 2` fsdp run, shared by the tests below."""
    from test_distributed import start

    folder = tmp_path_factory.mktemp("fsdp_e2e")
    config = e2e_config(folder)
    proc = start(config, folder / "run", "--nproc", "2")
    stdout, stderr = proc.communicate(timeout=400)
    return {"config": config, "out": folder / "run", "code": proc.returncode, "stdout": stdout, "stderr": stderr,
            "bert": folder / "bert"}


@pytest.mark.e2e
def test_fsdp_cli_run_writes_one_run_dir_and_a_consolidated_final(fsdp_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from test_distributed import row_keys, rows_of
    from tunelab.distributed.sharded import full_weights

    out = fsdp_run["out"]
    assert fsdp_run["code"] == 0, fsdp_run["stderr"][-3000:]
    assert fsdp_run["stdout"].count("completed in") == 1  # rank 0 alone reports
    keys = row_keys(out)
    assert len(keys) == len(set(keys))  # nothing logged twice
    rows = rows_of(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    # every 2 steps and at each epoch's end (3 steps an epoch)
    assert [r["step"] for r in rows if "eval_loss" in r and not r.get("before_training")] == [2, 3, 4, 6]
    assert [r["samples"] for r in rows if "loss" in r][-1] == 2 * 24  # every example once per epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["global_batch_size"] == 8
    assert summary["sharding"]["strategy"] == "fsdp" and [r["rank"] for r in summary["sharding"]["ranks"]] == [0, 1]
    last = out / "checkpoints" / "step-000006"
    from tunelab.train.checkpoint import verify

    assert verify(last) is None and (last / "shards" / ".metadata").is_file()
    assert not (last / "weights.safetensors").exists()  # the weights are in the shards, one file per process
    assert len(list((last / "shards").glob("*.distcp"))) == 2
    # final/ is a plain HF folder, loaded in one process; its logits are the trained weights' logits
    final = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    trained = AutoModelForSequenceClassification.from_pretrained(fsdp_run["bert"]).eval()
    base = {k: v.clone() for k, v in trained.state_dict().items()}
    missing, unexpected = trained.load_state_dict(full_weights(last), strict=False)
    assert not unexpected
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 21, 3, 0]])
    with torch.no_grad():
        assert torch.equal(final(input_ids=ids).logits, trained(input_ids=ids).logits)
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert max((weights[k] - base[k]).abs().max().item() for k in weights if k in base) > 1e-3  # it trained
    assert summary["final"]["accuracy"] == pytest.approx(rows[-1]["eval_accuracy"])


@pytest.mark.e2e
def test_fsdp_sigkill_then_resume_is_bit_identical(fsdp_run, tmp_path):
    """Every process SIGKILLed after the step-2 checkpoint; --resume auto ends at the same weights and log."""
    import os
    import signal

    from test_distributed import descendants, row_keys, rows_of, same_weights, start, wait_for_step

    out = tmp_path / "killed"
    proc = start(fsdp_run["config"], out, "--nproc", "2")
    wait_for_step(proc, out, 3, timeout=300)
    for pid in descendants(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.communicate()
    assert not (out / "final").exists()
    proc = start(fsdp_run["config"], out, "--nproc", "2", "--resume", "auto")
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr
    assert same_weights(out, fsdp_run["out"])
    assert row_keys(out) == row_keys(fsdp_run["out"])
    assert [r.get("loss") for r in rows_of(out)] == [r.get("loss") for r in rows_of(fsdp_run["out"])]


# --- refusals, at load time -------------------------------------------------------------------------

@pytest.mark.parametrize("sets,words", [
    (["distributed.cpu_offload=true"], "distributed.cpu_offload needs a sharded strategy"),
    (["distributed.strategy=zero2", "distributed.reshard_after_forward=false"], "applies to strategy fsdp only"),
    (["distributed.strategy=fsdp", "train.precision=fp16"], "use train.precision bf16"),
    (["distributed.strategy=zero3", "regularization.l2sp=0.1"], "regularization.l2sp"),
    (["distributed.strategy=zero3", "method=qlora"], "method qlora is not supported with distributed.strategy zero3"),
    (["distributed.strategy=fsdp3"], "distributed.strategy"),
])
@pytest.mark.e2e
def test_unsupported_combinations_are_refused_before_any_process_starts(toy_classification, tmp_path, sets, words):
    import os

    from typer.testing import CliRunner

    from tunelab.cli import app

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores for --nproc 2")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(toy_classification["config"]))
    args = ["train", str(config), "-o", str(tmp_path / "run"), "--nproc", "2"]
    res = CliRunner().invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 2 and words in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parity
def test_two_nodes_of_one_process_match_two_processes_on_one_node(fsdp_run, tmp_path):
    """torchrun's rendezvous across 'machines': two `tunelab train --nnodes 2` commands (node ranks 0
    and 1, one process each, localhost) train exactly what `--nproc 2` on one node trained."""
    import os
    import socket

    from test_distributed import row_keys, same_weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "two_nodes"
    # one thread per process, as `--nproc 2` gives each on 2 cores: another thread count sums in another order
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2))}
    cmd = [sys.executable, "-m", "tunelab.cli", "train", str(fsdp_run["config"]), "-o", str(out), "--no-progress",
           "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for rank in (0, 1)]
    results = [p.communicate(timeout=400) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in results]
    assert results[0][0].count("completed in") == 1 and "completed in" not in results[1][0]  # node 0 reports
    assert same_weights(out, fsdp_run["out"])
    assert row_keys(out) == row_keys(fsdp_run["out"])


@pytest.mark.parametrize("args,words", [
    (["--nnodes", "2"], "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank 2 is not below --nnodes 2"),
])
@pytest.mark.e2e
def test_bad_multi_node_flags_are_refused(toy_classification, tmp_path, args, words):
    from typer.testing import CliRunner

    from tunelab.cli import app

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(toy_classification["config"]))
    res = CliRunner().invoke(app, ["train", str(config), "-o", str(tmp_path / "run"), *args])
    assert res.exit_code == 2 and words in res.output, res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_final_adapter_from_a_sharded_checkpoint_is_whole(tiny_bert, tmp_path):
    """The peers' ZeRO-3 failure: an empty or partial adapter file. final/ is saved from rank 0's
    skeleton filled with the consolidated weights: every adapter tensor is there, with those values."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from tunelab.distributed.sharded import fill_skeleton, skeleton_of

    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    skeleton = skeleton_of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in skeleton.named_parameters() if p.is_meta} == trainable  # only these cost nothing
    torch.manual_seed(1)
    trained = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    fill_skeleton(skeleton, trained)
    skeleton.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora = {n for n in trained if "lora_" in n}
    assert len(lora) == 8 and all(torch.numel(v) > 0 for v in saved.values())
    for name in lora:  # peft drops the adapter name from the saved keys
        assert torch.equal(saved[name.replace(".default", "")], trained[name]), name
    with pytest.raises(RuntimeError, match="lacks"):  # a partial consolidation is an error, never a partial file
        fill_skeleton(skeleton_of(model), {k: v for k, v in trained.items() if "value" not in k})
