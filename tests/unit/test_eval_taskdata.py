"""The original evaluation files become exactly the rows lm-eval's hub datasets hold, and lm-eval's own task
definitions build the expected requests from them."""

from __future__ import annotations

import pytest

from dolly_langchain.evaluation import harness
from dolly_langchain.evaluation.taskdata import MissingTaskFile, TaskDataError, load_docs
from eval_helpers import write_eval_dir


@pytest.fixture()
def eval_dir(tmp_path):
    return write_eval_dir(tmp_path / "eval")


def test_openbookqa_rows_match_the_hub_fields(eval_dir):
    docs = load_docs("openbookqa", eval_dir)
    assert docs[0] == {
        "id": "Q1", "question_stem": "The sun is a",
        "choices": {"text": ["star", "planet", "moon", "comet"], "label": ["A", "B", "C", "D"]}, "answerKey": "A",
    }
    assert len(docs) == 3


def test_arc_keeps_numeric_and_five_way_labels_as_released(eval_dir):
    docs = load_docs("arc_easy", eval_dir)
    assert docs[1] == {"id": "Q2", "question": "What do plants need to grow?",
                       "choices": {"text": ["sunlight", "darkness", "salt"], "label": ["1", "2", "3"]},
                       "answerKey": "1"}
    assert docs[2]["choices"]["label"] == ["A", "B", "C", "D", "E"]
    assert [d["id"] for d in load_docs("arc_challenge", eval_dir)] == ["Q4", "Q3", "Q2", "Q1"]


def test_winogrande_answer_comes_from_the_labels_file_as_a_string(eval_dir):
    assert load_docs("winogrande", eval_dir) == [
        {"sentence": "The cup fell off the table because _ was too close to the edge.", "option1": "the cup",
         "option2": "the table", "answer": "1"},
        {"sentence": "Anna gave Maria a gift because _ was having a birthday.", "option1": "Anna",
         "option2": "Maria", "answer": "2"},
    ]


def test_winogrande_labels_that_disagree_are_refused(eval_dir):
    (eval_dir / "winogrande/dev-labels.lst").write_text("2\n2\n")
    with pytest.raises(TaskDataError, match="disagrees with .*dev-labels.lst"):
        load_docs("winogrande", eval_dir)


def test_piqa_label_is_an_int_from_the_labels_file_and_id_is_dropped(eval_dir):
    assert load_docs("piqa", eval_dir) == [
        {"goal": "To dry wet shoes", "sol1": "stuff them with newspaper", "sol2": "fill them with water", "label": 0},
        {"goal": "To cut paper", "sol1": "use a spoon", "sol2": "use scissors", "label": 1},
    ]


def test_piqa_label_count_must_match_the_records(eval_dir):
    (eval_dir / "piqa/valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskDataError, match="1 labels but .*valid.jsonl has 2 records"):
        load_docs("piqa", eval_dir)


def test_boolq_bool_label_becomes_int(eval_dir):
    docs = load_docs("boolq", eval_dir)
    assert [(d["idx"], d["label"]) for d in docs] == [(0, 1), (1, 0)]
    assert set(docs[0]) == {"question", "passage", "idx", "label"}
    assert all(type(d["label"]) is int for d in docs)


def test_hellaswag_keeps_every_field_and_stores_label_as_a_string(eval_dir):
    doc = load_docs("hellaswag", eval_dir)[0]
    assert doc["label"] == "3"
    assert set(doc) == {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
                        "split_type", "label"}
    assert doc["endings"][3] == "starts pulling up roofing on a roof."


def test_hellaswag_file_is_also_found_at_the_top_of_the_directory(tmp_path, eval_dir):
    (eval_dir / "hellaswag/hellaswag_val.jsonl").rename(eval_dir / "hellaswag_val.jsonl")
    assert [d["ind"] for d in load_docs("hellaswag", eval_dir)] == [24, 92]


def test_a_missing_file_names_the_file_and_where_to_get_it(tmp_path):
    write_eval_dir(tmp_path, tasks=("piqa",))
    with pytest.raises(MissingTaskFile) as err:
        load_docs("hellaswag", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "hellaswag/hellaswag_val.jsonl") in message
    assert "https://raw.githubusercontent.com/rowanz/hellaswag" in message
    assert "\n" not in message


def test_broken_json_names_the_line(eval_dir):
    (eval_dir / "boolq/val.jsonl").write_text('{"question": "q", "passage": "p", "idx": 0, "label": true}\n{oops\n')
    with pytest.raises(TaskDataError, match=r"val.jsonl line 2: not valid JSON"):
        load_docs("boolq", eval_dir)


# --- the requests lm-eval builds from these rows (its own task definitions) ---------------------------------------


def _requests(task_name, eval_dir):
    task = harness.build_task(task_name, load_docs(task_name, eval_dir))
    task.build_all_requests(rank=0, world_size=1)
    return task, [(inst.doc_id, inst.args) for inst in task.instances]


def test_arc_requests_are_question_answer_prompts_with_each_choice(eval_dir):
    task, requests = _requests("arc_easy", eval_dir)
    assert len(task.eval_docs) == 4
    assert requests[:4] == [(0, ("Question: Which is a mammal?\nAnswer:", f" {c}")) for c in
                            ("shark", "whale", "trout", "eel")]
    assert [task.doc_to_target(d) for d in task.eval_docs] == [1, 0, 1, 0]  # "B" of A-D, "1" of 1-3, ...


def test_openbookqa_requests_use_the_bare_question_stem(eval_dir):
    task, requests = _requests("openbookqa", eval_dir)
    assert requests[1] == (0, ("The sun is a", " planet"))
    assert [task.doc_to_target(d) for d in task.eval_docs] == [0, 0, 1]


def test_winogrande_requests_score_the_sentence_end_after_each_option(eval_dir):
    task, requests = _requests("winogrande", eval_dir)
    assert requests[:2] == [
        (0, ("The cup fell off the table because the cup", " was too close to the edge.")),
        (0, ("The cup fell off the table because the table", " was too close to the edge.")),
    ]
    assert [task.doc_to_text(d) for d in task.eval_docs] == [0, 1]  # the gold option index


def test_piqa_and_boolq_requests(eval_dir):
    task, requests = _requests("piqa", eval_dir)
    assert requests[3] == (1, ("Question: To cut paper\nAnswer:", " use scissors"))
    assert [task.doc_to_target(d) for d in task.eval_docs] == [0, 1]
    task, requests = _requests("boolq", eval_dir)
    context = "Sun -- The Sun is the star at the center of the Solar System.\nQuestion: is the sun a star?\nAnswer:"
    assert requests[:2] == [(0, (context, " no")), (0, (context, " yes"))]
    assert [task.doc_to_target(d) for d in task.eval_docs] == [1, 0]


def test_hellaswag_requests_go_through_the_official_preprocessing(eval_dir):
    task, requests = _requests("hellaswag", eval_dir)
    assert requests[3] == (0, ("Roof shingle removal: A man is sitting on a roof. He",
                               " starts pulling up roofing on a roof."))
    # WikiHow's "[header]"/"[title]" markup is removed by hellaswag's own process_docs
    assert requests[4][1][0] == "Home and Garden: How to water a plant. Fill a can. Then"
    assert [task.doc_to_target(d) for d in task.eval_docs] == [3, 0]


def test_seeded_samples_are_a_random_subset_not_the_first_documents():
    picked = harness.sample_indices(10042, 20, seed=0)
    assert picked == sorted(picked) and len(set(picked)) == 20
    assert picked != list(range(20)) and max(picked) > 1000
    assert harness.sample_indices(10042, 20, seed=0) == picked
    assert harness.sample_indices(10042, 20, seed=1) != picked
    assert harness.sample_indices(30, 50, seed=0) is None  # more than the split: the whole split
    assert set(picked) < set(harness.sample_indices(10042, 500, seed=0))  # nested: a larger sample contains it
