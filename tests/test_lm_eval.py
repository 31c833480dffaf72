"""lm-eval (0.4) against `moetandem serve`: its `local-completions` model runs loglikelihood tasks (multiple choice and
rolling perplexity) through our /v1/completions (echo + logprobs), and gives the accuracy and log-likelihoods of
lm-eval's own transformers backend on the same checkpoint. Local task files; nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (lm-eval[api])

import moetandem  # noqa: E402
from moetandem.assets import demo_model_path  # noqa: E402
from moetandem.serve import create_app  # noqa: E402
from moetandem.serve.server_thread import ServerThread  # noqa: E402

QUESTIONS = [("The king said", [" to his son", " banana phone", " that the"], 0),
             ("What is the capital", [" of France", " dog run"], 0),
             ("Once upon a time there", [" was", " green", " quickly"], 0),
             ("My lord, I", [" beseech you", " seventeen"], 0)]
TEXTS = ["The king is dead; long live the king. What say you, my lord?", "To be, or not to be: that is the question."]


def write_tasks(d: Path) -> None:
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                        for q, c, a in QUESTIONS))
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "mc.yaml").write_text(f"""task: moetandem_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (d / "ppl.yaml").write_text(f"""task: moetandem_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'ppl.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""")


def test_loglikelihood_tasks_match_the_transformers_backend(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager
    write_tasks(tmp_path)
    path = str(demo_model_path())
    tasks, tm = ["moetandem_mc", "moetandem_ppl"], TaskManager(include_path=str(tmp_path))
    eng = moetandem.load(path, device="cpu", progress=False)
    with ServerThread(create_app(eng, model_id="demo-moe", max_batch=4, max_waiting=64)) as srv:
        ours = lm_eval.simple_evaluate(
            model="local-completions", tasks=tasks, task_manager=tm, log_samples=True,
            model_args=f"base_url={srv.url}/v1/completions,model=demo-moe,tokenizer={path},"
                       "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", tasks=tasks,
                                  task_manager=tm, log_samples=True, device="cpu")
    assert ours["results"]["moetandem_mc"]["acc,none"] == ref["results"]["moetandem_mc"]["acc,none"]
    ppl_ours = ours["results"]["moetandem_ppl"]["word_perplexity,none"]
    ppl_ref = ref["results"]["moetandem_ppl"]["word_perplexity,none"]
    assert ppl_ours == pytest.approx(ppl_ref, rel=0.02)
    a = [s["filtered_resps"] for s in ours["samples"]["moetandem_mc"]]
    b = [s["filtered_resps"] for s in ref["samples"]["moetandem_mc"]]
    for x, y in zip(a, b):  # per-choice log-likelihoods, as the transformers backend computes them
        assert [round(v[0], 3) for v in x] == pytest.approx([round(v[0], 3) for v in y], abs=2e-3)


def test_generate_until_through_local_chat_completions(tmp_path: Path) -> None:
    """lm-eval's `local-chat-completions` runs a generate-until task through /v1/chat/completions (greedy, `until`
    stop strings, max_gen_toks): every document gets a completion, the same one on a second run."""
    from lm_eval.tasks import TaskManager
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n"
                                              for q, a in [("Say hello.", "hello"), ("Name a king.", "king")]))
    (tmp_path / "g.yaml").write_text(f"""task: moetandem_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'g.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    eng = moetandem.load(str(demo_model_path()), device="cpu", progress=False)
    runs = []
    with ServerThread(create_app(eng, model_id="demo-moe", max_batch=4, max_waiting=64)) as srv:
        for _ in range(2):
            r = lm_eval.simple_evaluate(
                model="local-chat-completions", tasks=["moetandem_gen"], log_samples=True, apply_chat_template=True,
                task_manager=TaskManager(include_path=str(tmp_path)),
                model_args=f"base_url={srv.url}/v1/chat/completions,model=demo-moe,num_concurrent=1,max_retries=1")
            runs.append([s["resps"][0][0] for s in r["samples"]["moetandem_gen"]])
            assert "exact_match,none" in r["results"]["moetandem_gen"]
    assert len(runs[0]) == 2 and all(isinstance(t, str) and t.strip() for t in runs[0])
    assert runs[0] == runs[1]  # greedy: reproducible
    assert all("\n\n" not in t for t in runs[0])  # the `until` stop string ends the completion
