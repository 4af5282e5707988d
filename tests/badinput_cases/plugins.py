"""Bad-input cases of plugin and regularizer selection: qualified names ``DIST:NAME`` that select
nothing, their empty or extra parts, one regularizer selected twice under two names, and settings
under a qualified key. Only the installed plugins (the built-ins) are here; the cases that need
extra plugins (a shared name, a later built-in) are in ``tests/registry/test_plugin_names.py``."""
from __future__ import annotations

from pathlib import Path

BASE = """\
data: {train_fraction: 0.1, batch_size: 64}
model: {init_args: {hidden: [8]}}
uncertainty: {samples: 3, plots: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}
"""


def cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    good = str(tmp / "c.yaml")  # selects dropout
    bare = tmp / "plugins_none.yaml"  # selects nothing
    bare.write_text(BASE)
    (tmp / "plugins_unknown_dist.yaml").write_text(BASE + "regularizers:\n  regfw-rdrop:rdrop: {alpha: 1}\n")
    (tmp / "plugins_twice.yaml").write_text(BASE + "regularizers:\n  regfw:weight_decay: {}\n  weight_decay: {}\n")
    (tmp / "plugins_empty.yaml").write_text(BASE + "regularizers:\n  'regfw:': {}\n")
    none = str(bare)
    out: list[tuple[list[str], str]] = []
    for command in ("fit", "plan"):
        out += [
            # a misspelled name in a qualified name: the names that distribution provides, the closest first
            ([command, none, "regularizers.regfw:dropuot={}"], "regularizers.regfw:dropuot"),
            ([command, none, "regularizers.regfw:Dropout={}"], "Did you mean 'regfw:dropout'?"),
            # a distribution that is not installed (a plugin the config was written with)
            ([command, str(tmp / "plugins_unknown_dist.yaml")], "no installed plugin distribution is called "
                                                                "'regfw-rdrop'"),
            ([command, none, "regularizers.regfv:dropout={}"], "'dropout' is installed as regfw:dropout"),
            # empty and extra parts
            ([command, str(tmp / "plugins_empty.yaml")], "'regfw:' has an empty name"),
            ([command, none, "regularizers.:dropout={}"], "':dropout' has an empty distribution"),
            ([command, none, "regularizers.regfw:regfw:dropout={}"], "'regfw:regfw:dropout' has more than one ':'"),
            # one regularizer under its bare and its qualified name
            ([command, good, "regularizers.regfw:dropout={}"], "'regfw:dropout' and 'dropout' both select"),
            ([command, str(tmp / "plugins_twice.yaml")], "'weight_decay' and 'regfw:weight_decay' both select"),
        ]
    out += [
        # an entry-point (plugin) name that registers other regularizers is not a regularizer name
        (["fit", none, "regularizers.regfw:recurrent_dropout={}"], "distribution 'regfw' provides no regularizer "
                                                                   "'recurrent_dropout'"),
        # a distribution name where a regularizer name goes
        (["plan", none, "regularizers.regfw={}"], "unknown regularizer 'regfw'"),
        # settings under a qualified key: checked and named under that key
        (["fit", none, "regularizers.regfw:dropout.hiden=0.2"], "regularizers.regfw:dropout.hiden"),
        (["fit", none, "regularizers.regfw:dropout.hidden=2.0"], "regularizers.regfw:dropout.hidden"),
        (["plan", none, "regularizers.regfw:dropout=3"], "regularizers.regfw:dropout"),
        (["fit", none, "regularizers.regfw:weight_decay.strength=-1"], "regularizers.regfw:weight_decay.strength"),
        # the distribution in another spelling still resolves, so its misspelled name is named as written
        (["plan", none, "regularizers.REGFW:dropuot={}"], "regularizers.REGFW:dropuot"),
        (["fit", none, "regularizers.Regfw:dropout.hidden=nope"], "regularizers.Regfw:dropout.hidden"),
    ]
    return out
