#!/usr/bin/env bash
# Launch `fit` or `eval` (Lightning DDP) on one or many nodes with torchrun. `build` and `predict` run once, on Ray
# (they refuse to start as several ranks): one machine needs no launcher, SLURM uses data_build/launch/ray_slurm.sbatch.
#   single node, 8 GPUs:   data_build/launch/torchrun.sh fit --config configs/fit/realsyn15m_vitb32.yaml
#   multi-node: run the same line on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set, e.g.
#     NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 data_build/launch/torchrun.sh fit --config ... data.batch_size=128
# Devices per node and node count reach Lightning from torchrun's environment (trainer.devices=auto).
set -euo pipefail
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
exec torchrun \
  --nproc_per_node "$NPROC_PER_NODE" \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  -m realsyn_pl "$@"
