"""Bad-input cases of config files and overrides: bounded YAML (size, depth, alias expansion),
encodings, keys, interpolations and YAML's own mistakes. Each is one line naming the file or
override and the key or line, exit 2, before OmegaConf expands anything."""
from __future__ import annotations

from pathlib import Path

from regfw.config.yaml_limits import MAX_BYTES

GOOD = "data: {train_fraction: 0.1}\nmodel: {init_args: {hidden: [8]}}\nregularizers: {dropout: {hidden: 0.2}}\n"


def alias_bomb(levels: int, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: about
    ``width ** (levels + 1)`` nodes once expanded, in a few hundred bytes."""
    rows = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "data:\n  init_args:\n" + "".join(f"    {row}\n" for row in rows)


def nested(levels: int, mapping: bool) -> str:
    """A value nested ``levels`` deep: ``[[[...]]]`` or ``{a: {a: ...}}``."""
    inner = "{a: " * levels + "1" + "}" * levels if mapping else "[" * levels + "1" + "]" * levels
    return f"data:\n  init_args:\n    deep: {inner}\n"


def _write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    out: list[tuple[list[str], str]] = []
    for levels in (6, 8, 20):
        bomb = _write(tmp, f"bomb{levels}.yaml", alias_bomb(levels))
        out.append((["plan", bomb], "expands to more than 10000 nodes"))
    out.append((["fit", _write(tmp, "deep-list.yaml", nested(1000, False))], "nesting deeper than 32 levels"))
    out.append((["fit", _write(tmp, "deep-map.yaml", nested(1000, True))], "nesting deeper than 32 levels"))
    huge = "# " + "x" * (MAX_BYTES + 10) + "\n" + GOOD
    out.append((["fit", _write(tmp, "huge.yaml", huge)], f"more than the {MAX_BYTES} bytes"))
    out.append((["fit", _write(tmp, "interp.yaml", GOOD + "optimizer:\n  lr: ${optimizer.\n")],
                "line 5: optimizer.lr: the interpolation '${optimizer.' is malformed"))
    out.append((["fit", _write(tmp, "dup.yaml", GOOD + "seed: 1\nseed: 2\n")], "line 5, column 1: found duplicate key"))
    out.append((["fit", _write(tmp, "alias-key.yaml", "data: {name: &k digits}\n*k : 1\n")], "a key that is an alias"))
    out.append((["fit", _write(tmp, "list-key.yaml", GOOD + "? [seed, run]\n: 1\n")], "line 4: a key that is a list"))
    out.append((["fit", _write(tmp, "int-key.yaml", GOOD + "7: 1\n")], "7: unknown top-level section"))
    out.append((["fit", _write(tmp, "binary.yaml", bytes(range(256)) * 4)], "binary.yaml' is not UTF-8 text"))
    out.append((["fit", _write(tmp, "utf16.yaml", GOOD.encode("utf-16-le"))], "utf16.yaml' holds NUL characters"))
    out.append((["fit", _write(tmp, "latin1.yaml", (GOOD + "run: {name: caf\u00e9}\n").encode("latin-1"))],
                "latin1.yaml' is not UTF-8 text"))
    (tmp / "folder.yaml").mkdir(exist_ok=True)
    out.append((["fit", str(tmp / "folder.yaml")], "folder.yaml' is a directory"))
    out.append((["fit", _write(tmp, "longkey.yaml", GOOD + "k" * 300 + ": 1\n")], "line 4: a key of 300 characters"))
    out.append((["fit", _write(tmp, "twodocs.yaml", GOOD + "---\nseed: 3\n")], "a second YAML document"))
    out.append((["fit", _write(tmp, "toplist.yaml", "- data\n- model\n")], "expected a mapping of sections"))
    out.append((["fit", _write(tmp, "undefined.yaml", GOOD + "seed: *nowhere\n")],
                "line 4: the alias *nowhere names no anchor"))
    out.append((["fit", _write(tmp, "tab.yaml", "data:\n\tname: digits\n")], "is not valid YAML at line 2"))
    out.append((["fit", _write(tmp, "env.yaml", GOOD + "run: {name: '${oc.env:REGFW_SURELY_UNSET_12345}'}\n")],
                "run.name: "))
    out.append((["fit", _write(tmp, "null-key.yaml", GOOD + "~: 1\n")], "line 4: a key that is null (~)"))
    out.append((["fit", _write(tmp, "bell.yaml", GOOD + "run: {name: 'a\x07b'}\n")],
                "line 4, column 15: the character '\\x07' (#x0007) is not allowed"))
    out.append((["fit", _write(tmp, "python-tag.yaml", GOOD + "seed: !!python/object/apply:os.system [ls]\n")],
                "line 4, column 7: could not determine a constructor for the tag"))
    good = _write(tmp, "good-for-overrides.yaml", GOOD)
    out.append((["fit", good, "seed=*x"], "override 'seed=*x': the alias *x names no anchor"))
    flow_bomb = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
                "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"
    out.append((["fit", good, f"data.init_args.x={flow_bomb}"], "expands to more than 10000 nodes"))
    out.append((["fit", good, "data.init_args.x=" + "[" * 500 + "]" * 500], "nesting deeper than 32 levels"))
    out.append((["fit", good, "optimizer.lr=${optimizer."], "the interpolation '${optimizer.' is malformed"))
    out.append((["fit", good, "k" * 300 + ".x=1"], "a key of 302 characters"))
    out.append((["fit", good, "data.init_args.x=" + "1" * (MAX_BYTES + 1)], f"more than the {MAX_BYTES} bytes"))
    return out + interpolation_cases(tmp)


def interpolation_bomb(levels: int, width: int = 9, strings: bool = False) -> str:
    """Like :func:`alias_bomb` with ``${...}`` references: lists of ``width`` references to the
    level before, or strings that concatenate them (resolved by OmegaConf, not by YAML)."""
    key = "data.init_args"
    if strings:
        rows = ["s0: lollollol"]
        rows += [f"s{i}: '{('${' + key + f'.s{i - 1}' + '}') * width}'" for i in range(1, levels + 1)]
    else:
        rows = [f"l0: [{', '.join(['lol'] * width)}]"]
        rows += [f"l{i}: [{', '.join([repr('${' + key + f'.l{i - 1}' + '}')] * width)}]" for i in range(1, levels + 1)]
    return "data:\n  init_args:\n" + "".join(f"    {row}\n" for row in rows)


def interpolation_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """Interpolation bombs and chains, in a file and in an override."""
    chain = "data:\n  init_args:\n    c0: 1\n" + "".join(f"    c{i}: '${{data.init_args.c{i - 1}}}'\n"
                                                       for i in range(1, 200))
    good = _write(tmp, "good-for-interpolations.yaml", GOOD)
    return [
        (["plan", _write(tmp, "ibomb.yaml", interpolation_bomb(8))], "line 7: data.init_args.l4: its ${...} "
                                                                      "interpolations resolve to 66430 nodes"),
        (["plan", _write(tmp, "sbomb.yaml", interpolation_bomb(8, strings=True))], "line 8: data.init_args.s5: its "
                                                                                   "${...} interpolations resolve to"),
        (["plan", _write(tmp, "chain.yaml", chain)], "interpolations chained more than 32 deep"),
        (["plan", good, "data.init_args.a=[1,2,3,4,5,6,7,8,9,10]",
          *(f"data.init_args.{b}=[{', '.join([repr('${data.init_args.' + a + '}')] * 4)}]"
            for a, b in zip("abcdef", "bcdefg", strict=True))],
         "data.init_args.f: its ${...} interpolations resolve to 11605 nodes"),
    ]
