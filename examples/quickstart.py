"""Train each normalization for a few steps at batch size 1 and print the losses.

python examples/quickstart.py
"""

import torch

import seqnorm


def main(steps: int = 60) -> None:
    for cls in (seqnorm.LSTM, seqnorm.GRU):
        for norm in seqnorm.NORMS:
            torch.manual_seed(0)
            rnn = cls(1, 32, norm=norm, groups=4 if norm == "group" else 1)
            head = torch.nn.Linear(32, 1)
            opt = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.1)
            batch = 1 if norm != "batch" else 8  # batch norm has no statistics at batch size 1
            losses = []
            for _ in range(steps):
                x = torch.randn(20, batch, 1)
                out, _ = rnn(x)
                loss = torch.nn.functional.mse_loss(head(out[1:]), x[:-1])  # recall the last input
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            k = steps // 4
            print(
                f"{cls.__name__:4} norm={norm:5} batch={batch}: loss {sum(losses[:k]) / k:.3f} -> "
                f"{sum(losses[-k:]) / k:.3f}"
            )


if __name__ == "__main__":
    main()
