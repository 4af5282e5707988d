"""Bounded configs: size, depth and alias expansion are measured before OmegaConf sees the YAML.

The bombs are refused in CPU time measured with ``time.process_time`` (the limit asserted, 1 s,
is hundreds of times what the check takes: a few milliseconds); OmegaConf alone took minutes
and gigabytes on the 6-level bomb.
"""
from __future__ import annotations

import time

import pytest
from badinput_cases.config import GOOD, alias_bomb, interpolation_bomb, nested

from regfw.cli.main import main
from regfw.config.schema import load_config, load_raw
from regfw.config.yaml_limits import MAX_BYTES, MAX_DEPTH, MAX_NODES, check_interpolations, check_yaml
from regfw.errors import ConfigError

#: The CPU time a refusal may take (the check itself takes milliseconds).
REFUSAL_S = 1.0


@pytest.mark.parametrize("levels", [6, 8, 20])
def test_an_alias_bomb_is_refused_in_well_under_a_second_naming_file_and_limit(tmp_path, capsys, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    assert len(path.read_bytes()) < 200 + 60 * levels  # a few hundred bytes standing for 9**levels nodes
    start = time.process_time()
    code = main(["plan", str(path)])
    elapsed = time.process_time() - start
    assert elapsed < REFUSAL_S, elapsed
    assert code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"regfw plan: error: config file {str(path)!r}, line 7: the document expands to more "
                           f"than {MAX_NODES} nodes (the alias *a3 alone stands for ")


def test_the_expanded_count_is_exact_and_a_few_aliases_load(tmp_path):
    text = ("defaults: &opt {name: sgd, lr: 0.1, momentum: 0.9}\n"
            "a: *opt\nb: [*opt, *opt]\n")
    shape = check_yaml(text, "t")
    # top mapping 1; 3 keys; the anchored mapping: 1 + 3 keys + 3 values = 7, three times more by alias; the list 1
    assert shape.nodes == 1 + 3 + 7 + 7 + 1 + 7 + 7
    assert shape.depth == 4  # levels of nodes: the top mapping, the list, the aliased mapping, its values
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "optimizer: &opt {name: sgd, lr: 0.05, momentum: 0.9}\n"
                           "uncertainty: {samples: &n 4, seed: *n}\n")
    cfg = load_config(path, ["trainer.max_epochs=1"])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.uncertainty.samples, cfg.uncertainty.seed) == ("sgd", 0.05, 4, 4)


def test_a_bomb_just_under_the_node_limit_loads_and_just_over_is_refused():
    width = 10
    rows = [f"l0: &l0 [{', '.join(['1'] * width)}]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]"
                                                        for i in (1, 2)]
    ok = "\n".join(rows) + "\n"
    assert check_yaml(ok, "t").nodes == 1 + 3 + 11 + 111 + 1111  # 1237: well under the limit
    over = ok + "l3: [" + ", ".join(["*l2"] * (MAX_NODES // 1111)) + "]\n"
    with pytest.raises(ConfigError, match=rf"t, line 4: the document expands to more than {MAX_NODES} nodes"):
        check_yaml(over, "t")


@pytest.mark.parametrize("mapping", [False, True], ids=["list", "mapping"])
def test_1000_levels_are_refused_naming_depth(tmp_path, mapping):
    path = tmp_path / "deep.yaml"
    path.write_text(nested(1000, mapping))
    start = time.process_time()
    with pytest.raises(ConfigError, match=rf"deep.yaml', line 3: nesting deeper than {MAX_DEPTH} levels"):
        load_raw(path)
    assert time.process_time() - start < REFUSAL_S
    path.write_text(nested(MAX_DEPTH - 4, mapping))  # top, data, init_args, the levels, the value: the limit
    assert load_raw(path)["data"]["init_args"]["deep"]
    path.write_text(nested(MAX_DEPTH - 3, mapping))  # one more
    with pytest.raises(ConfigError, match="nesting deeper"):
        load_raw(path)


def test_depth_counts_through_aliases():
    deep = "{a: " * 20 + "1" + "}" * 20
    text = f"x: &x {deep}\ny: {'{b: ' * 20}*x{'}' * 20}\n"
    with pytest.raises(ConfigError, match=rf"nesting deeper than {MAX_DEPTH} levels through the alias \*x"):
        check_yaml(text, "t")


def test_a_huge_file_is_refused_naming_its_size_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:  # sparse: 1 GiB of zeros that are never read
        f.truncate(2**30)
    start = time.process_time()
    with pytest.raises(ConfigError) as err:
        load_raw(path)
    assert time.process_time() - start < REFUSAL_S
    assert str(err.value) == (f"config file {str(path)!r}: {2**30} bytes, more than the {MAX_BYTES} bytes (256 KiB) a "
                              f"config may have (one is a few kilobytes); pass the config file, not a data file.")


def test_utf16_and_utf8_with_a_byte_order_mark_load_like_utf8(tmp_path):
    for encoding in ("utf-16", "utf-8-sig", "utf-32"):
        path = tmp_path / f"{encoding}.yaml"
        path.write_bytes(GOOD.encode(encoding))
        assert load_raw(path)["regularizers"] == {"dropout": {"hidden": 0.2}}


def test_a_resume_config_in_a_run_directory_is_measured_too(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(alias_bomb(8))
    assert main(["fit", str(run / "config.yaml"), "--resume", "--run-dir", str(run)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "config.yaml', line 7: the document expands to more than" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_broken_interpolation_names_key_line_and_form_not_the_footer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "optimizer:\n  name: sgd\n  lr: ${optimizer.\n")
    with pytest.raises(ConfigError) as err:
        load_raw(path)
    text = str(err.value)
    assert text.startswith(f"config file {str(path)!r}, line 6: optimizer.lr: the interpolation '${{optimizer.' is "
                           f"malformed (no viable alternative at input '${{optimizer.'); write ${{section.key}}")
    assert "object_type" not in text and "\n" not in text


@pytest.mark.parametrize("strings", [False, True], ids=["lists", "strings"])
@pytest.mark.parametrize("levels", [6, 8, 20])
def test_an_interpolation_bomb_is_refused_before_omegaconf_resolves_it(tmp_path, strings, levels):
    path = tmp_path / "ibomb.yaml"
    path.write_text(interpolation_bomb(levels, strings=strings))
    start = time.process_time()
    with pytest.raises(ConfigError) as err:
        load_raw(path)
    assert time.process_time() - start < REFUSAL_S  # OmegaConf: 2 s at 4 levels of lists, 12 s at 5 of strings
    # the first key past a limit is named: l4 (9**5 + ... = 66430 nodes), s5 (9**5 * 9 characters and more)
    key, what = ("s5", "characters") if strings else ("l4", "66430 nodes")
    assert f"ibomb.yaml', line {3 + int(key[1:])}: data.init_args.{key}: its ${{...}} interpolations resolve to" \
           in str(err.value) and what in str(err.value)


def test_interpolations_are_measured_exactly_and_ordinary_ones_resolve(tmp_path):
    tree = {"a": [1, 2, 3], "b": {"x": "${a}", "y": "${.x}", "z": "n=${a}", "e": "${oc.select:a,0}"}}
    check_interpolations(tree, "t")  # well under the limits
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "optimizer: {name: sgd, lr: 0.05, momentum: '${optimizer.lr}'}\n"
                           "uncertainty: {samples: 4, seed: '${uncertainty.samples}'}\n")
    cfg = load_config(path, ["trainer.max_epochs=1"])
    assert (cfg.optimizer.momentum, cfg.uncertainty.seed) == (0.05, 4)
    wide = {"a": list(range(99)), "b": ["${a}"] * (MAX_NODES // 100)}  # b: 1 + 100 x 100 = 10001 nodes
    with pytest.raises(ConfigError, match=r"^t: b: its \$\{\.\.\.\} interpolations resolve to 10001 nodes"):
        check_interpolations(wide, "t")
    wide["b"] = wide["b"][:-1]  # 9901 nodes in b, 10001 in all
    with pytest.raises(ConfigError, match=r"^t: its"):
        check_interpolations(wide, "t")


def test_an_interpolation_chain_longer_than_the_depth_limit_is_refused():
    tree = {"c0": 1, **{f"c{i}": f"${{c{i - 1}}}" for i in range(1, MAX_DEPTH + 2)}}
    with pytest.raises(ConfigError, match=rf"t: c{MAX_DEPTH + 1}: interpolations chained more than {MAX_DEPTH} deep"):
        check_interpolations(tree, "t")
    del tree[f"c{MAX_DEPTH + 1}"]
    check_interpolations(tree, "t")


def test_a_bomb_given_to_a_real_process_is_one_line_and_exit_2_in_about_the_start_up_time(tmp_path, run_cli):
    """The whole command, interpreter start-up and imports included, as a user runs it: the child's
    CPU time stays under 2 s (start-up without torch is about 0.3 s; expanding the bomb: minutes)."""
    import resource

    (tmp_path / "bomb.yaml").write_text(alias_bomb(8))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_cli("fit", "bomb.yaml", "trainer.max_epochs=1")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "regfw fit: error: config file 'bomb.yaml', line 7: the document expands to more than 10000 nodes (the alias "
        "*a3 alone stands for 7381 nodes), the limit for a config (one has a few hundred); remove the aliases that "
        "repeat large lists or mappings, or split the file."]
    assert cpu < 2.0, cpu
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]
