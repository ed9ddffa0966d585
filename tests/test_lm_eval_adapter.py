"""The lm-evaluation-harness adapter on small local tasks (skipped without the lmeval extra)."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is an optional extra: pip install 'tide_ds[lmeval]'")

from tests.tiny import saved_student  # noqa: E402
from tide_ds.eval.lm_eval_adapter import TideDSLM, continuation_elbo  # noqa: E402

MC = """task: tide_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: tide_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["z"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    saved_student(path)
    return str(path)


def test_elbo_of_one_token_matches_the_masked_logit(model_dir):
    lm = TideDSLM(pretrained=model_dir, mc_samples=1)
    s, tok = lm.student, lm.tokenizer
    ctx, cont = tok("a b c", add_special_tokens=False)["input_ids"], tok("d", add_special_tokens=False)["input_ids"]
    value, _ = continuation_elbo(s, ctx, cont, samples=1, seed=5, pad_id=tok.eos_token_id)
    x0 = torch.tensor([ctx + cont + [tok.eos_token_id] * 4])[:, :4]
    x_t = x0.clone()
    x_t[0, 3] = s.mask_token_id
    lp = torch.log_softmax(s(x_t, x0)[0, 3].float(), -1)[cont[0]].item()
    assert value == pytest.approx(0.0) or value == pytest.approx(lp / 0.5, rel=1e-5)


def test_harness_runs_loglikelihood_and_generate_until(model_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    mc_rows = [{"question": "a b", "choices": [" c", " d e", " f"], "answer": i % 3} for i in range(4)]
    gen_rows = [{"question": "a b c", "target": "d"}, {"question": "e f", "target": "g"}]
    for name, rows, spec in (("mc", mc_rows, MC), ("gen", gen_rows, GEN)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(spec.format(data=data))
    lm = TideDSLM(pretrained=model_dir, mc_samples=4, steps_per_block=2)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["tide_tiny_mc", "tide_tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    # the harness's accuracy is the adapter's own ranking of the choices
    want = 0
    for row in mc_rows:
        scores = [
            continuation_elbo(
                lm.student,
                lm._encode(row["question"]),
                lm._encode(row["question"] + c)[2:],
                samples=4,
                pad_id=lm.pad_id,
            )[0]
            for c in row["choices"]
        ]
        want += int(max(range(3), key=lambda i: scores[i]) == row["answer"])
    assert out["results"]["tide_tiny_mc"]["acc,none"] == pytest.approx(want / len(mc_rows))
    assert "exact_match,none" in out["results"]["tide_tiny_gen"]
    gens = [s["resps"][0][0] for s in out["samples"]["tide_tiny_gen"]]
    assert len(gens) == 2 and all("z" not in g for g in gens)
