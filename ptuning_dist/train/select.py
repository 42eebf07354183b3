"""Best-on-dev selection and early stopping, per prompt group.

The paper trains each relation's prompt on its own and keeps the one that scores best on dev. A
run of G groups does the same in one job: after every evaluation on ``data.eval_split`` each group
is scored on its own rows (LAMA: its relation's P@1; a task: its ``select_metric``; the one
``shared`` group: the run's headline), and a group that beats its best so far has its encoder
weights copied to the host. At the end the best copies are put back, so the exported table, the
written encoder and the test-split evaluation are each group's best dev step (``eval.json``'s
``selected`` says which step and score). ``train.patience`` stops the run after that many
evaluations in a row in which no group improved.

Costs: one host copy of the encoders' weights (only groups that improved are copied); the scores
come from the evaluation's own results (already on the host: evaluation is not in the step path).
"""
from __future__ import annotations

from ptuning_dist.prompt.groups import SHARED, PromptGroups


def headline_score(res: dict, metric="accuracy") -> float:
    """The one number of an evaluation: LAMA's macro P@1, several tasks' mean, else ``metric``."""
    if "p@1_macro" in res:
        return res["p@1_macro"]
    if "per_task" in res:
        return res["macro"]
    return res[metric]


class Selection:
    def __init__(self, groups: PromptGroups, select_metric):
        """``select_metric``: the task's (several tasks: a dict, task name -> its metric)."""
        self.groups, self.metric = groups, select_metric
        self.best: dict[str, float] = {}
        self.best_step: dict[str, int] = {}
        self.states: dict[int, dict] = {}  # group index -> its encoder's weights at its best step (CPU)
        self.stale = 0  # evaluations in a row in which no group improved

    def scores(self, res: dict) -> dict[str, float]:
        """Each group's score in one evaluation's results."""
        names = self.groups.names
        if names == (SHARED,):
            return {SHARED: headline_score(res, self.metric)}
        if "p@1_per_relation" in res:  # LAMA: a group is a relation (one without dev rows has no score)
            return {g: res["p@1_per_relation"][g] for g in names if g in res["p@1_per_relation"]}
        if "per_task" in res:  # several tasks: a group is a task, scored by its own metric
            return {g: res["per_task"][g][self.metric[g]] for g in names if g in res["per_task"]}
        assert len(names) == 1, names  # a classification run is one task
        return {names[0]: res[self.metric]}

    def update(self, step: int, res: dict, encoder) -> bool:
        """Record an evaluation; copy the weights of every group that improved. True if any did."""
        improved = False
        for name, score in self.scores(res).items():
            if name in self.best and score <= self.best[name]:
                continue
            self.best[name], self.best_step[name] = score, step
            g = self.groups.index(name)
            if encoder is not None:  # pipeline stages after the first hold no encoder
                self.states[g] = {k: v.detach().cpu().clone() for k, v in encoder.encoders[g].state_dict().items()}
            improved = True
        self.stale = 0 if improved else self.stale + 1
        return improved

    def restore(self, encoder) -> None:
        """Put each group's best weights back into the encoder (groups never scored keep theirs)."""
        if encoder is None:
            return
        for g, state in self.states.items():
            encoder.encoders[g].load_state_dict(state)

    def summary(self) -> dict:
        return {n: {"step": self.best_step[n], "score": self.best[n]} for n in self.groups.names if n in self.best}

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "states": self.states, "stale": self.stale}

    def load_state(self, state: dict) -> None:
        self.best, self.best_step = dict(state["best"]), dict(state["best_step"])
        self.states, self.stale = dict(state["states"]), state["stale"]
