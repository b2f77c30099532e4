"""`<command> --help` shows what each key means (the comment beside it in the schema), and a malformed element of
eval's `datasets` list is one line naming the keys an element takes, with an example."""
from dataclasses import dataclass, field
from typing import List

import pytest

from realsyn_pl.cli import main
from realsyn_pl.config_help import describe, field_comments

ALLOWED = ("key, dataset, root, tasks, metric, split, train_split, val_split, val_proportion, template_key, "
           "annotation_file, classnames")
EXAMPLE = "e.g. {key: food101, dataset: wds/food101, root: data/eval/food101, tasks: [zeroshot_classification, "


@dataclass
class _Base:
    # above the field,
    # in two lines
    alpha: int = 1  # and beside it

    # separated by a blank line: not alpha's, not beta's either

    beta: str = "b"
    gamma: List[int] = field(
        default_factory=lambda: [1, 2])  # beside the field's last line
    delta: float = 0.5  # type: ignore[assignment]


@dataclass
class _Child(_Base):
    epsilon: bool = True  # a field of the subclass


def test_field_comments_are_read_from_the_source_above_and_beside_each_field():
    assert field_comments(_Child) == {
        "alpha": ("above the field,", "in two lines", "and beside it"),
        "gamma": ("beside the field's last line",),
        "epsilon": ("a field of the subclass",),
    }


def test_describe_lists_key_default_and_comment():
    assert describe(_Child).splitlines() == [
        "  alpha=1", "      above the field,", "      in two lines", "      and beside it",
        "  beta=b",
        "  gamma=[1, 2]", "      beside the field's last line",
        "  delta=0.5",
        "  epsilon=true", "      a field of the subclass",
    ]


def _after(lines: list[str], key_line: str) -> str:
    return lines[lines.index(key_line) + 1].strip()


def test_command_help_shows_each_keys_comment(capsys):
    assert main(["fit", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _after(lines, "  data.batch_size=256") == "per device"
    assert _after(lines, "  model.pretrained=null").startswith("open_clip pretrained tag (needs the hub) or a local")
    assert _after(lines, "  data.train[].urls=???  (required)").startswith("Brace-expanded shard list")


def test_eval_help_documents_the_datasets_element(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "datasets=[{key: food101, dataset: wds/food101" in out
    assert _after(lines, "  datasets[].key=???  (required)").startswith("Short name: the report column")
    assert _after(lines, "  datasets[].tasks=[zeroshot_classification]") == (
        "Any of zeroshot_classification, zeroshot_retrieval, linear_probe.")
    assert _after(lines, "  progress_s=30.0") == "seconds between progress lines when the output is not a terminal"


@pytest.mark.parametrize("override", [
    "datasets=[food101]",  # a name where a mapping belongs
    "datasets=[{name: food101}]",  # an unknown key
    "datasets=[{key: food101, task: [linear_probe]}]",  # a misspelled key
    "datasets=food101",  # not a list at all
    "datasets=[{key: food101, tasks: linear_probe}]",  # a list-valued key given a string
])
def test_a_malformed_datasets_element_is_one_line_with_the_allowed_keys(override, capsys):
    assert main(["eval", "--print-config", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert f"A datasets element takes the keys {ALLOWED}; {EXAMPLE}" in err


def test_a_malformed_datasets_element_in_a_preset_is_reported_the_same_way(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("datasets:\n  - key: food101\n    dataset_name: food101\n")
    assert main(["eval", "--print-config", "--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Key 'dataset_name' not in 'EvalDataset'") and err.count("\n") == 1
    assert ALLOWED in err


def test_setting_one_element_suggests_that_lists_own_example(capsys):
    assert main(["eval", "--print-config", "datasets.0.key=food101"]) == 2
    err = capsys.readouterr().err
    assert "a list is set whole, e.g. datasets=[{key: food101, dataset: wds/food101" in err
