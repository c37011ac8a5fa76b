"""No distributed timeout from data work (issue 11): under torchrun each machine's first process fills
the encoded-data cache before it joins the process group, so the other ranks, waiting in the
rendezvous meanwhile, only read it (they never tokenize), and no rank waits in a collective while
another tokenizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl

pytestmark = pytest.mark.multiprocess

# Each rank records, in order, every cache entry it builds (StoreWriter: the tokenizing side of the
# cache) and the moment it joins the process group; then trains one step through tunelab's own run.
SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch.distributed as dist
    from tunelab.data import cache

    events = []
    build, join = cache.StoreWriter.__init__, dist.init_process_group

    def counted_build(self, *args, **kwargs):
        events.append("build")
        build(self, *args, **kwargs)

    def counted_join(*args, **kwargs):
        events.append("join")
        return join(*args, **kwargs)

    cache.StoreWriter.__init__, dist.init_process_group = counted_build, counted_join
    from tunelab.config import load_config
    from tunelab.run import run_training

    rank = os.environ["RANK"]
    summary = run_training(load_config(sys.argv[1]), sys.argv[2], show_progress=False)
    Path(sys.argv[3], f"rank{rank}.json").write_text(json.dumps({"events": events, "status": summary["status"]}))
''')


@pytest.mark.e2e
def test_only_the_first_rank_tokenizes_and_before_the_group_starts(tmp_path):
    from tiny_models import conversations, tiny_llama_folder

    write_jsonl(tmp_path / "chat.jsonl", conversations(16))
    cfg = {"task": "chat", "model": {"name": str(tiny_llama_folder(tmp_path / "llama")), "max_length": 64},
           "data": {"train": str(tmp_path / "chat.jsonl"), "eval_split": 0.25},
           "train": {"max_steps": 1, "batch_size": 2, "eval_before": False}, "early_stopping": {"enabled": False}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "TUNELAB_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "script.py"), str(config), str(tmp_path / "run"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["status"] for r in ranks] == ["completed", "completed"]
    first, other = ranks[0]["events"], ranks[1]["events"]
    assert first.count("build") >= 1 and first[-1] == "join" and first.count("join") == 1  # built, then joined
    assert other == ["join"]  # the other rank only read what the first one built
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == first.count("build")  # and the run itself (rank 0's setup) built nothing more
