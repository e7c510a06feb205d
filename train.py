"""Train with a YAML recipe (SEQ, SFT, DPO, GRPO). The same run as `astrai train`.

Works unchanged under every launcher:
    python train.py --config configs/train/seq-tiny.yaml [--devices 2 --strategy ddp] [KEY=VALUE ...]
    fabric run --strategy=ddp --devices=2 --accelerator=cpu train.py --config ...
    lightning run model --strategy=ddp --devices=2 train.py --config ...   (after `make setup`)
    torchrun --nproc-per-node=2 train.py --config ...
    torchrun --nnodes=2 --node-rank=R --nproc-per-node=8 --rdzv-endpoint=HOST:PORT train.py ...  (multi-node)
Under a launcher the Trainer takes its world (devices x nodes) from the launcher's variables.
"""
import sys

from astrai_train.objectives.runner import main

if __name__ == "__main__":
    sys.exit(main())
