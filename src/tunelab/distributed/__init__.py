"""Training on several processes: launch (torchrun) and wrap (DDP).

group.py   where a process stands (rank, world size) and the collectives the run needs
ddp.py     DataParallel (the loop's Replicas, train.protocols, for one of several processes);
           DDP wrapping; rank-0-only run dir writes
reshard.py resume with another --nproc, or across one process / ddp / fsdp
fsdp.py, zero.py, sharded.py  distributed.strategy fsdp / zero1-3
launch.py  `tunelab train --nproc N`: relaunch under torchrun, keep the exit-code contract
"""

from tunelab.distributed.ddp import DataParallel, SharedRunIO, check_supported, replicas_for, wrap_ddp
from tunelab.distributed.group import ALONE, Group, init_from_env

__all__ = ["ALONE", "DataParallel", "Group", "SharedRunIO", "check_supported", "init_from_env", "replicas_for", "wrap_ddp"]
