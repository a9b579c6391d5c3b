"""The built-in suite and model: SNI-shaped, deterministic, offline."""
from collections import Counter

from transformers import AutoConfig, AutoTokenizer

from profit_ds.data.builtin import builtin_tasks
from profit_ds.model.builtin import BUILTIN_DIR


def test_suite_has_8_categories_of_3_tasks_with_definitions():
    tasks = builtin_tasks(instances_per_task=5)
    per_category = Counter(t.category for t in tasks)
    assert len(per_category) == 8 and set(per_category.values()) == {3}
    for t in tasks:
        assert t.definition and t.definition.endswith(".")
        assert t.positive_examples and t.positive_examples[0]["output"]
        assert len(t.instances) == 5
        assert all(i.outputs and all(o.strip() for o in i.outputs) for i in t.instances)
    assert len({t.name for t in tasks}) == 24


def test_suite_is_deterministic_and_extends_without_changing_earlier_instances():
    small = builtin_tasks(instances_per_task=5)
    large = builtin_tasks(instances_per_task=8)
    assert [t.instances for t in small] == [t.instances[:5] for t in large]
    other = builtin_tasks(instances_per_task=5, seed=777)
    assert [t.instances for t in small] != [t.instances for t in other]


def test_tasks_of_a_category_share_the_definition_but_not_the_convention():
    tasks = builtin_tasks(instances_per_task=40)
    by_category = {}
    for t in tasks:
        by_category.setdefault(t.category, []).append(t)
    for group in by_category.values():
        assert len({t.definition for t in group}) == 1
        outputs = [{o for i in t.instances for o in i.outputs} for t in group]
        assert outputs[0] != outputs[1] and outputs[1] != outputs[2]


def test_program_execution_outputs_are_correct():
    for t in builtin_tasks(instances_per_task=20):
        if t.category != "Program Execution":
            continue
        for inst in t.instances:
            xs = [int(x) for x in inst.input.strip("[]").split(", ")]
            expected = {"first_two": ", ".join(map(str, xs[:2])),
                        "last_two": ", ".join(map(str, xs[-2:])),
                        "max": str(max(xs))}[t.name.rsplit("execution_", 1)[1]]
            assert inst.outputs == (expected,)


def test_shipped_model_and_tokenizer_load_offline():
    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR)
    cfg = AutoConfig.from_pretrained(BUILTIN_DIR)
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok)
    text = "Definition: Classify the news sentence into its topic.\nOutput: sports"
    assert tok.decode(tok(text)["input_ids"]) == text
    # every word of the suite is a single token (short sequences for a CPU model)
    assert len(tok(" positive")["input_ids"]) == 1
