"""The centralised reference: every client's training data pooled, one adapter trained on all of it.

Not a federated method but the upper reference the federated ones are measured against: what one adapter
learns when the raw data of every client may be gathered in one place. Heads stay per client (label spaces
differ): a pooled mini-batch mixes samples of several clients, the adapter sees all of them, and each
sample's loss goes through its own client's head, so one optimiser step updates the adapter and the heads
of every client present in the batch.

It fits the method interface for what a client carries and how it is scored (the adapter plays the part
of the global adapter, each client keeps its head), but its training loop walks the pooled data instead of
one client's: `pooled = True` tells a driver so (the in-process engine runs it with
`feddat.federation.pooled`; the Flower engine refuses it: nothing is federated).
"""

from __future__ import annotations

import torch

from feddat.algorithms.base import LocalConfig, Method
from feddat.algorithms.losses import task_loss
from feddat.models.adapters import AdaptedModel
from feddat.models.vl import AnswerHead, pooled_features


class CentralisedAdapter(Method):
    name = "centralised-adapter"
    summary = ("upper reference, not federated: all clients' training data pooled, one adapter trained on all "
               "of it, a head per client")
    adapters = ("global",)
    trained = ("global",)
    shared = "global"       # the pooled adapter, held where the data are pooled; it is never sent
    predict_view = "student"
    pooled = True

    def pooled_param_groups(self, model: AdaptedModel, heads: list[AnswerHead], cfg: LocalConfig) -> list[dict]:
        """The adapter at `lr_adapter`, every client's head at `lr_head`: one optimiser over all of them."""
        return [{"params": [p for h in heads for p in h.parameters()], "lr": cfg.lr_head, "base_lr": cfg.lr_head},
                {"params": list(model.adapter_parameters("global")), "lr": cfg.lr_adapter,
                 "base_lr": cfg.lr_adapter}]

    def pooled_step(self, model: AdaptedModel, heads: list[AnswerHead], parts: dict[int, dict],
                    opt: torch.optim.Optimizer) -> dict[str, float]:
        """One pooled mini-batch, given as each client's part ({index into `heads`: batch}): features of every
        sample through the shared adapter, each sample's task loss through its own client's head, weighted
        by the clients' shares of the batch so that the loss is the mean over the batch's samples."""
        model.set_view("student")
        n = sum(len(b["labels"]) for b in parts.values())
        loss = 0.0
        for c, batch in parts.items():
            loss = loss + task_loss(heads[c](pooled_features(model, batch)), batch["labels"]) * (len(batch["labels"]) / n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}
