"""Bad-input cases of ``regularizers.weight_decay.prior`` (Gal & Ghahramani's prior): a missing tau, the
prior beside a strength or the decoupled mode, and no single dropout rate to compute it from."""
from __future__ import annotations

from pathlib import Path

BASE = """\
data: {name: diabetes, batch_size: 64}
model: {init_args: {hidden: [8]}}
uncertainty: {samples: 3, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""


def cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    two_rates = tmp / "prior_two_rates.yaml"
    two_rates.write_text(BASE + "regularizers:\n  dropout: {input: 0.1, hidden: 0.2}\n"
                                "  weight_decay: {prior: {tau: 0.5}}\n")
    one_rate = tmp / "prior_one_rate.yaml"
    one_rate.write_text(BASE + "regularizers:\n  dropout: {input: 0.1, hidden: 0.1}\n"
                               "  weight_decay: {prior: {tau: 0.5}}\n")
    no_tau = tmp / "prior_no_tau.yaml"
    no_tau.write_text(BASE + "regularizers:\n  dropout: {hidden: 0.1}\n  weight_decay: {prior: {length_scale: 0.01}}\n")
    out: list[tuple[list[str], str]] = []
    for command in ("fit", "plan"):
        out += [
            ([command, str(no_tau)], "regularizers.weight_decay.prior.tau: missing"),
            ([command, str(one_rate), "regularizers.weight_decay.strength=0.1"],
             "regularizers.weight_decay.strength: got 0.1 together with prior"),
            ([command, str(one_rate), "regularizers.weight_decay.mode=decoupled"],
             "regularizers.weight_decay.mode: got 'decoupled' together with prior"),
            ([command, str(two_rates)], "regularizers.weight_decay.prior.dropout: null, and regularizers.dropout has "
                                        "input 0.1 and hidden 0.2"),
        ]
    return out
