"""Data-parallel training is the same computation as one process with the whole batch: 2 CPU processes (torchrun,
gloo) x batch 2 for 3 steps end with identical weights on both ranks (bit for bit), and within 1e-5 of 1 process
x batch 4 (measured: 6e-7, where the weights moved 3e-4 from the base).

Not bit-exact across the two layouts: the gradient of 4 samples is summed in a different order (two means of 2,
all-reduced, vs one mean of 4), so it differs in the last float32 bits, and Adam passes that on. For the same
reason the tiny U-Net is rebuilt with 8 GroupNorm groups instead of 32: with one channel per group, a per-channel
bias in front of a GroupNorm has an exactly zero gradient, so Adam steps it by normalized rounding noise (lr-sized:
3e-5 after 3 steps at lr 1e-4) whatever the trainer does; with 4 channels per group every parameter has a real
gradient."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.nn.unet import UNetModel
from ldm.train.config import TrainConfig
from ldm.train.trainer import Trainer
from test_checkpoints import randomize, tiny_pipeline
from test_trainer import make_images

REPO = Path(__file__).resolve().parent.parent
WORKER = """
import json, os, sys
from safetensors.torch import save_file
from ldm.train.config import TrainConfig
from ldm.train.trainer import Trainer
trainer = Trainer(TrainConfig.from_dict(json.loads(sys.argv[1])))
trainer.train()
rank = os.environ["RANK"]  # train() has ended the process group by now
weights = {k: v.contiguous() for k, v in trainer.params.state_dict().items()}
save_file(weights, sys.argv[2] + f"/rank{rank}.safetensors")
save_file({k: v.contiguous() for k, v in trainer.ema.shadow.items()}, sys.argv[2] + f"/ema{rank}.safetensors")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    pipe = tiny_pipeline(1)
    pipe.unet = randomize(UNetModel(dataclasses.replace(pipe.unet.config, num_groups=8)), 1)
    pipe.save_pretrained(tmp_path / "base")
    common = dict(data_dir=str(make_images(tmp_path / "data")), base_model=str(tmp_path / "base"), resolution=32,
                  max_steps=3, checkpoint_every=100, learning_rate=1e-4, ema_decay=0.9, caption_dropout=0.5,
                  crop="random", random_flip=True, seed=3)
    two = TrainConfig(output_dir=str(tmp_path / "two"), batch_size=2, **common)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          str(tmp_path / "worker.py"), json.dumps(two.to_dict()), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("data: 8 images") == 1  # the main process alone reports

    one = Trainer(TrainConfig(output_dir=str(tmp_path / "one"), batch_size=4, **common))
    one.train()
    base = load_file(tmp_path / "base" / "unet" / "model.safetensors")
    for kind, single in (("rank", one.params.state_dict()), ("ema", one.ema.shadow)):
        rank0, rank1 = load_file(tmp_path / f"{kind}0.safetensors"), load_file(tmp_path / f"{kind}1.safetensors")
        assert rank0.keys() == rank1.keys() == single.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), kind  # DDP keeps the replicas identical
        worst = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
        moved = max((single[k] - base[k[len("unet."):]]).abs().max().item() for k in single)
        assert worst < 1e-5 < moved, (kind, worst, moved)
    # the logged loss is the global batch's in both layouts
    logs = [[float(r.split(",")[1]) for r in (tmp_path / run / "log.csv").read_text().splitlines()[1:]]
            for run in ("two", "one")]
    assert len(logs[0]) == 3 and max(abs(a - b) for a, b in zip(*logs)) < 1e-5, logs
    assert (tmp_path / "two" / "checkpoints" / "step-3" / "rng-1.pt").is_file()
