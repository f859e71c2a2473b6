"""A small CPU training job logging through the itwinai logger API into a local journal.

Runs alone (`python scripts/train_example.py`) or distributed
(`torchrun --nproc_per_node=2 scripts/train_example.py`, gloo backend). Every rank logs
(log_on_workers=-1) per-batch metrics every `--log-freq` batches, epoch metrics,
hyperparameters, a figure, an image, a checkpoint artifact and the model. Nothing touches the
network: `itwinai-sync` replays the journal later.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from itwinai_journal.loggers import (
    LoggersCollection,
    MLFlowLogger,
    TensorBoardLogger,
    WandBLogger,
)


def synthetic_data(n: int = 2048, seed: int = 0) -> TensorDataset:
    """A two-class problem generated in memory, so the example needs no download."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, generator=g)
    y = (x @ w > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--savedir", default="mllogs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--log-freq", type=int, default=5)
    parser.add_argument("--experiment", default="itwinai-sync-demo")
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)

    data = synthetic_data()
    sampler = DistributedSampler(data, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler,
                        shuffle=sampler is None)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    logger = LoggersCollection([
        MLFlowLogger(savedir=args.savedir, experiment_name=args.experiment,
                     run_name="demo", run_description="itwinai-sync example training",
                     log_freq=args.log_freq, log_on_workers=-1),
        TensorBoardLogger(savedir=args.savedir, log_freq=args.log_freq, log_on_workers=-1),
        WandBLogger(savedir=args.savedir, project_name=args.experiment,
                    log_freq=args.log_freq, log_on_workers=-1),
    ])
    with logger.start_logging(rank=rank):
        logger.save_hyperparameters({"lr": args.lr, "batch_size": args.batch_size,
                                     "epochs": args.epochs, "optimizer": "SGD"})
        step = 0
        losses = []
        for epoch in range(args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            correct = total = 0
            epoch_loss = 0.0
            for batch_idx, (x, y) in enumerate(loader):
                optimizer.zero_grad()
                out = model(x)
                loss = loss_fn(out, y)
                loss.backward()
                optimizer.step()
                logger.log(loss.detach(), "train_loss", step=step, batch_idx=batch_idx)
                correct += int((out.argmax(1) == y).sum())
                total += len(y)
                epoch_loss += loss.item()
                step += 1
            losses.append(epoch_loss / len(loader))
            logger.log(losses[-1], "epoch_loss", step=epoch)
            logger.log(correct / total, "epoch_accuracy", step=epoch)

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot(losses, marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        logger.log(fig, "loss_curve", kind="figure")
        plt.close(fig)
        weights = next(model.parameters()).detach()
        image = (weights - weights.min()) / (weights.max() - weights.min() + 1e-12)
        logger.log(image.unsqueeze(0), "first_layer_weights", kind="image")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "checkpoint.pt")
            torch.save({"model": model.state_dict(), "epoch": args.epochs}, ckpt)
            logger.log(ckpt, "checkpoints", kind="artifact")
        module = model.module if distributed else model
        logger.log(module, "model", kind="model")
    if distributed:
        dist.destroy_process_group()
    if rank == 0:
        print(f"logged run {logger.run_id} into {args.savedir}/")


if __name__ == "__main__":
    main()
