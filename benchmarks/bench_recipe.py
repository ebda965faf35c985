"""Training throughput of the Lightning recipe against a plain PyTorch loop, same model and data.

    python benchmarks/bench_recipe.py --steps 40 --json runs/bench_recipe.json

Both train the LanguageModel of recipes/train_lm.py on the pydoc character data for the same
number of steps (after warm-up steps that are not timed) and report characters per second; the
ratio recipe/plain should be at least 0.9. The two alternate ``--repeats`` times (so that drift
of a shared machine hits both alike) and the medians are compared.
"""

import argparse
import json
import statistics
import time

import lightning as L
import torch

from seqnorm.lightning import CharLMDataModule, LanguageModel


class Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start = warmup, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()


def make(args):
    torch.manual_seed(0)
    dm = CharLMDataModule(batch_size=args.batch_size, bptt=args.bptt)
    dm.setup()
    model = LanguageModel(dm.vocab, norm=args.norm, hidden_size=args.hidden_size, embedding_dim=32)
    return dm, model


def recipe(args) -> float:
    dm, model = make(args)
    timer = Timer(args.warmup)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, dm)
    return time.perf_counter() - timer.start


def plain(args) -> float:
    dm, model = make(args)
    opt = model.configure_optimizers()
    model.train()
    for i, batch in enumerate(dm.train_dataloader()):
        if i == args.warmup:
            start = time.perf_counter()
        if i == args.warmup + args.steps:
            break
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def _loss(model, batch):
    x, y = batch[:, :-1], batch[:, 1:]
    state = getattr(model, "_bench_state", None)
    logits, state = model(x, state)
    model._bench_state = tuple(s.detach() for s in state)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bptt", type=int, default=100)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--norm", default="layer")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    chars = args.steps * args.batch_size * args.bptt
    times = {"plain": [], "recipe": []}
    for _ in range(args.repeats):
        times["plain"].append(plain(args))
        times["recipe"].append(recipe(args))
    t_plain, t_recipe = statistics.median(times["plain"]), statistics.median(times["recipe"])
    result = {
        "plain_chars_per_s": chars / t_plain,
        "recipe_chars_per_s": chars / t_recipe,
        "ratio": t_plain / t_recipe,
        "seconds": times,
        **vars(args),
    }
    print(
        f"plain loop {result['plain_chars_per_s']:.0f} chars/s, recipe {result['recipe_chars_per_s']:.0f} "
        f"chars/s, recipe/plain = {result['ratio']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
