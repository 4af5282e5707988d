"""The ``concrete_dropout`` regularizer: dropout whose per-layer rate is learned.

Gal, Hron and Kendall, "Concrete Dropout", NeurIPS 2017. Each inserted
:class:`regfw.layers.ConcreteDropout` holds its rate as a parameter ``p = sigmoid(p_logit)``,
trained with the weights through a relaxed Bernoulli mask (temperature 0.1). What makes the
learned rate a sensible one is the variational objective: the loss plus, for each layer, the KL
term of :func:`regfw.layers.concrete_regularizer` with

* ``weight_scale = l^2 / (2 N)`` on the weights the dropped units feed (the next Linear layer's,
  or the first layer's for input dropout; ``l`` is the prior length-scale, ``length_scale``), and
* ``dropout_scale = 1 / N`` on ``K (p log p + (1 - p) log(1 - p))``, ``K`` the units dropped,

where N is the training-set size the plan knows (``PlanContext.n_examples``): the pull towards
p = 0.5 fades as 1/N, so small data sets learn high rates and large ones low rates. Both scales
assume the loss is a mean negative log-likelihood (``cross_entropy``, ``gaussian_nll``); for
``mse`` set ``tau``, the noise precision, since ``mse = (2 / tau) NLL`` and the scales are then
multiplied by ``2 / tau``.

Rates given (or from the rate table) are the initial values. The learned rates are logged every
epoch (``concrete_dropout/rate/<layer>``) and printed when the fit ends; Monte Carlo dropout
samples the layers like any other. Family ``dropout``, kinds ``input`` and ``hidden``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from regfw.extend import (
    HIDDEN,
    INPUT,
    ConfigError,
    InjectingRegularizer,
    InjectionConfig,
    PlanContext,
    PlanItem,
    hookimpl,
    model_map,
    nonneg,
    positive,
    rate,
)
from regfw.layers import ConcreteDropout, concrete_regularizer


@dataclass
class ConcreteDropoutConfig(InjectionConfig):
    """Initial rates per kind, the relaxation temperature and the prior behind the KL term."""

    input: float | None = rate(doc="initial rate on the model input (table: 0.1-0.2)")
    hidden: float | None = rate(doc="initial rate after hidden Linear layers (table: 0.3-0.5)")
    #: Temperature of the relaxed Bernoulli mask (0.1 in the paper).
    temperature: float = positive(0.1, doc="relaxed Bernoulli temperature")
    #: Prior length-scale l of the weights (1e-4 in the authors' regression code).
    length_scale: float = nonneg(1e-4, doc="prior length-scale of the weights")
    #: For ``loss: mse`` only: the noise precision tau (mse = (2 / tau) NLL); null for NLL losses.
    tau: float | None = positive(None, doc="noise precision for the mse loss")
    #: The training-set size N; null takes it from the data (the plan's N).
    n_examples: int | None = positive(None, doc="training-set size N (null: from the data)")

    def __post_init__(self) -> None:
        if self.schedule.active:
            raise ValueError(f"schedule: got kind {self.schedule.kind!r}, but concrete dropout learns its rates and a "
                             f"schedule would overwrite them; remove `schedule`")


class ConcreteDropoutRegularizer(InjectingRegularizer):
    """Concrete dropout on the input and after hidden layers, with the KL term as a penalty."""

    name = "concrete_dropout"
    family = "dropout"
    description = "Concrete dropout: per-layer rates learned with the weights (relaxed Bernoulli, KL from N)"
    Config = ConcreteDropoutConfig
    kinds = (INPUT, HIDDEN)
    #: Its rates are parameters: ``adaptive_dropout`` on the same kinds is refused.
    learns_rates = True

    def __init__(self, config: object = None) -> None:
        super().__init__(config)
        self.n: int | None = None
        self.sites: list[tuple[str, str | None]] = []  # (layer path, path of the layer whose weights it feeds)

    def scales(self) -> tuple[float, float]:
        """``(weight_scale, dropout_scale)`` of :func:`regfw.layers.concrete_regularizer` for this N."""
        if not self.n:
            raise ConfigError(f"regularizers.{self.name}: the training-set size N is unknown, and the KL term is "
                              f"divided by it; set regularizers.{self.name}.n_examples or pass n_examples= to "
                              f"RegularizedModule")
        c = self.config
        factor = 1.0 if c.tau is None else 2.0 / c.tau
        return factor * c.length_scale ** 2 / (2.0 * self.n), factor / self.n

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        mm = model_map(model, ctx)
        self.n = self.config.n_examples or ctx.n_examples
        weight_scale, dropout_scale = self.scales()
        rows = super().plan(model, ctx)
        for row in rows:
            if row.action not in ("before", "after"):
                continue
            anchor = row.anchor or ""
            feeds = anchor if row.action == "before" else mm.flow.next(anchor)
            module = mm.module(feeds) if feeds is not None else None
            if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                feeds = None
            row.options["feeds"] = feeds
            row.reason += (f"; initial rate, learned (N={self.n}: weight reg {weight_scale:.3g}, dropout reg "
                           f"{dropout_scale:.3g}" + (f", on {feeds}.weight)" if feeds else ", no weight term)"))
        return rows

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return ConcreteDropout(rate, temperature=self.config.temperature)

    def apply(self, model: nn.Module, items: list[PlanItem]) -> None:
        super().apply(model, items)
        self.sites = []
        for item in items:
            if item.action not in ("before", "after"):
                continue
            host = model.get_submodule(item.anchor) if item.anchor else model
            for name, child in host.named_children():
                if isinstance(child, ConcreteDropout):
                    path = f"{item.anchor}.{name}" if item.anchor else name
                    self.sites.append((path, item.options.get("feeds")))
        if not self.sites and items:
            warnings.warn(f"{self.name}: no layer was inserted, so no rate is learned", stacklevel=2)

    def layers(self, model: nn.Module) -> list[tuple[str, ConcreteDropout]]:
        """The inserted layers, by path."""
        out = []
        for path, _ in self.sites:
            layer = model.get_submodule(path)
            assert isinstance(layer, ConcreteDropout)
            out.append((path, layer))
        return out

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """The sum of every layer's KL term (divided by N), added to each training step's loss."""
        if not self.sites:
            return None
        weight_scale, dropout_scale = self.scales()
        total = None
        layers = dict(self.layers(model))
        for path, feeds in self.sites:
            layer = layers[path]
            weight_sq = torch.zeros(())
            if feeds is not None:
                for param in model.get_submodule(feeds).parameters(recurse=False):
                    weight_sq = weight_sq + param.pow(2).sum()
            term = concrete_regularizer(layer.rate(), weight_sq, layer.input_dim, weight_scale, dropout_scale)
            total = term if total is None else total + term
        return total

    def callbacks(self) -> list:
        from regfw.extend import LearnedRatesCallback

        return [LearnedRatesCallback(self.name, self.learned_rates)]

    def learned_rates(self, model: nn.Module) -> dict[str, float]:
        """The current rate of every inserted layer, by path."""
        return {path: layer.p for path, layer in self.layers(model)}

    def check(self, config: object) -> None:
        loss = getattr(getattr(config, "model", None), "loss", None)
        if loss == "mse" and self.config.tau is None:
            raise ConfigError(f"regularizers.{self.name}.tau: the loss is mse, which is (2 / tau) times the Gaussian "
                              f"negative log-likelihood, so the KL term needs the noise precision tau; set it (e.g. "
                              f"1 / noise variance) or use model.loss: gaussian_nll")


@hookimpl
def regfw_register_regularizers(register):
    register(ConcreteDropoutRegularizer)
