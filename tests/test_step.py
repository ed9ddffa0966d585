import pytest
import torch

from tide_ds.objectives import RECIPES
from tide_ds.pipeline import DistillStep, resolve_terms


class PassRecorder(torch.nn.Module):
    """A stand-in teacher: its hidden state at each position is the input id it saw (as a float)."""

    mask_token_id = 99

    def __init__(self):
        super().__init__()
        self.inputs = []
        self.output_weight = torch.eye(100)
        self.output_bias = None

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        self.inputs.append(input_ids.clone())
        return torch.nn.functional.one_hot(input_ids, 100).float()


class Student:
    mask_token_id = 98


def cross_batch():
    # student tokens 0..9, teacher tokens 0..7; chunks 0..3 aligned across both (-1 = prompt/none)
    return {
        "input_ids": torch.arange(10).repeat(2, 1),
        "maskable": torch.tensor([[0, 0] + [1] * 8] * 2, dtype=torch.bool),
        "chunk_ids": torch.tensor([[-1, -1, 0, 0, 1, 2, 2, 2, 3, -1]] * 2),
        "teacher_input_ids": torch.arange(10, 18).repeat(2, 1),
        "teacher_chunk_ids": torch.tensor([[-1, 0, 1, 1, 2, 3, 3, -1]] * 2),
        "num_chunks": 4,
    }


def test_chunk_consistent_masking_on_both_sides():
    teacher = PassRecorder()
    step = DistillStep(Student(), teacher, resolve_terms("tide_cross", pipeline="cross"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = cross_batch()
        n = step.noise(batch, generator=gen)
        assert not n.masked[:, :2].any()  # prompt
        (teacher_in,) = n.teacher_pass_inputs
        t_masked = teacher_in == 99
        for row in range(2):
            for c in range(4):
                s_tok = n.masked[row][batch["chunk_ids"][row] == c]
                t_tok = t_masked[row][batch["teacher_chunk_ids"][row] == c]
                assert s_tok.all() == s_tok.any() == t_tok.all() == t_tok.any() == bool(n.chunk_mask[row, c])
            assert not t_masked[row][batch["teacher_chunk_ids"][row] == -1].any()


def test_compdemo_through_the_step():
    teacher = PassRecorder()
    step = DistillStep(Student(), teacher, resolve_terms("tide_shared", pipeline="cross"))
    gen = torch.Generator().manual_seed(1)
    batch = cross_batch()
    n = step.noise(batch, generator=gen)
    pass1, pass2 = n.teacher_pass_inputs
    active_tokens = torch.zeros_like(pass1, dtype=torch.bool)
    for row in range(2):
        for c in range(4):
            if n.chunk_mask[row, c]:
                active_tokens[row] |= batch["teacher_chunk_ids"][row] == c
    m1, m2 = pass1 == 99, pass2 == 99
    assert torch.equal(m1 ^ m2, active_tokens) and not (m1 & m2).any()  # masked in exactly one pass
    assert torch.equal(n.teacher_pass_masked, m1)
    # the student still sees every masked chunk masked
    assert torch.equal(n.x_t == 98, n.masked)
    # each active teacher token's target comes from the pass in which it was masked
    targets = step.teacher_targets(n)
    assert len(teacher.inputs) == 2 and targets.chunk_logprobs is not None
    hidden = torch.where(
        m1[..., None], torch.nn.functional.one_hot(pass1, 100).float(), torch.nn.functional.one_hot(pass2, 100).float()
    )
    lp = torch.log_softmax(hidden, -1).gather(-1, batch["teacher_input_ids"][..., None])[..., 0]
    want = torch.zeros(2, 4)
    for row in range(2):
        for j, c in enumerate(batch["teacher_chunk_ids"][row].tolist()):
            if c >= 0 and n.chunk_mask[row, c]:
                want[row, c] += lp[row, j]
    assert torch.allclose(targets.chunk_logprobs, want)


def test_teacher_rows_pair_single_token_chunks_only():
    from tide_ds.pipeline.step import teacher_rows

    batch = cross_batch()
    batch["teacher_chunk_ids"] = torch.tensor([[-1, 0, 0, 1, 2, 3, 3, -1]] * 2)
    # chunk 1 is one token on both sides (student 4, teacher 3); chunk 2 only on the teacher side
    step = DistillStep(Student(), PassRecorder(), resolve_terms("kl"))
    n = step.noise(batch, generator=torch.Generator().manual_seed(0))
    n.masked[:] = batch["maskable"]  # every response token masked
    n.chunk_mask[:] = True
    (row_seq, t_pos), valid = teacher_rows(n)
    s_pos = n.masked.nonzero(as_tuple=True)[1]
    paired = {int(s): int(t) for s, t, v in zip(s_pos[:8], t_pos[:8], valid[:8]) if v}
    assert paired == {4: 3}


def test_step_fused_equals_reference_for_every_recipe(tiny_assets):
    """The same step with the tiled ops and with plain PyTorch: same loss terms and gradients."""
    student, teacher, batch = _tiny_pair(tiny_assets)
    batch["maskable"][0, :4] = False
    for name in RECIPES:
        results = []
        for impl in ("reference", "twin"):
            step = DistillStep(student, teacher, resolve_terms(name), kernels=impl)
            n = step.noise(batch, generator=torch.Generator().manual_seed(1))
            loss, terms = step.loss(n, step.teacher_targets(n), progress=0.3)
            grads = torch.autograd.grad(loss, [student.output_weight, *list(student.parameters())[1:3]])
            results.append((terms, grads))
        (t_ref, g_ref), (t_fused, g_fused) = results
        for k in t_ref:
            torch.testing.assert_close(t_fused[k], t_ref[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        for a, b in zip(g_fused, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_step_projects_each_masked_row_once(tiny_assets, monkeypatch):
    """Every recipe's student loss, forward and backward, projects the masked rows to the vocabulary
    once in all (one tiled pass: no recomputation, no second pass for a KL term)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tide_ds.kernels import ops
    from tide_ds.models import BD3LMStudent, HFBidirectionalTeacher

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    teacher = HFBidirectionalTeacher(AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]), tok.mask_token_id)
    student = BD3LMStudent(AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]), 4, tok.mask_token_id)
    x0 = torch.randint(0, len(tok) - 2, (3, 16))
    batch = {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}
    projected = []
    logits = ops._logits
    monkeypatch.setattr(ops, "_logits", lambda h, w, b: (projected.append((w, h.shape[0])), logits(h, w, b))[1])
    for name in RECIPES:
        step = DistillStep(student, teacher, resolve_terms(name), kernels="twin")
        n = step.noise(batch, generator=torch.Generator().manual_seed(2))
        targets = step.teacher_targets(n)
        projected.clear()
        loss, _ = step.loss(n, targets, progress=0.5)
        loss.backward()
        rows = sum(r for w, r in projected if w.data_ptr() == student.output_weight.data_ptr())
        assert rows == int(n.masked.sum()) > 0, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_on_gpu_equals_cpu_reference_for_every_recipe(tiny_assets):
    """The step on CUDA (objective.kernels auto) against the plain step on CPU: terms and gradients."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tide_ds.models import BD3LMStudent, HFBidirectionalTeacher

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    teacher = HFBidirectionalTeacher(
        AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]), tok.mask_token_id, attn_backend="sdpa"
    )
    torch.manual_seed(0)
    student = BD3LMStudent(
        AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]), 4, tok.mask_token_id, attn_backend="sdpa"
    )
    x0 = torch.randint(0, len(tok) - 2, (3, 16))
    batch = {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}
    models = {"cpu": (student, teacher), "cuda": (copy.deepcopy(student).cuda(), copy.deepcopy(teacher).cuda())}
    for name in RECIPES:
        results = {}
        for device, impl in (("cpu", "reference"), ("cuda", "auto")):
            s, te = models[device]
            step = DistillStep(s, te, resolve_terms(name), kernels=impl)
            n = step.noise(batch, generator=torch.Generator().manual_seed(1))
            n = type(n)(
                **{
                    k: v.to(device) if torch.is_tensor(v) else ([x.to(device) for x in v] if isinstance(v, list) else v)
                    for k, v in vars(n).items()
                }
            )
            loss, terms = step.loss(n, step.teacher_targets(n), progress=0.3)
            grads = torch.autograd.grad(loss, [s.output_weight, *list(s.parameters())[1:3]])
            results[device] = ({k: v.cpu() for k, v in terms.items()}, [g.cpu() for g in grads])
        (t_ref, g_ref), (t_gpu, g_gpu) = results["cpu"], results["cuda"]
        for k in t_ref:
            torch.testing.assert_close(t_gpu[k], t_ref[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        for a, b in zip(g_gpu, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def _tiny_pair(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tide_ds.models import BD3LMStudent, HFBidirectionalTeacher

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    teacher = HFBidirectionalTeacher(AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]), tok.mask_token_id)
    torch.manual_seed(0)
    student = BD3LMStudent(AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]), 4, tok.mask_token_id)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randint(0, len(tok) - 2, (3, 16))
    return student, teacher, {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}


def test_each_term_gets_its_own_temperature(tiny_assets):
    """CALM at T=5 and KL at T=2 in one run: each term equals its reference at its own temperature."""
    from tide_ds.config import TermConfig
    from tide_ds.objectives import calm, chunk_logprobs, kl, token_logprobs

    student, teacher, batch = _tiny_pair(tiny_assets)
    terms = {"ce": 1.0, "calm": TermConfig(weight=0.5, temperature=5.0), "kl": TermConfig(weight=1.0, temperature=2.0)}
    run = resolve_terms("kl", terms)
    assert {t.name: t.config.temperature for t in run.terms} == {"ce": 2.0, "calm": 5.0, "kl": 2.0}
    step = DistillStep(student, teacher, run, kernels="twin")
    n = step.noise(batch, generator=torch.Generator().manual_seed(3))
    _, values = step.loss(n, step.teacher_targets(n), progress=0.2)
    with torch.no_grad():
        zs = student(n.x_t, n.x0)
        zt = teacher.hidden_states(n.teacher_pass_inputs[0], None, x0=n.x0) @ teacher.output_weight.T
        num = n.chunk_mask.shape[1]
        s_lp = chunk_logprobs(torch.where(n.masked, token_logprobs(zs, n.x0), 0.0), n.chunk_ids, num)
        t_lp = chunk_logprobs(torch.where(n.masked, token_logprobs(zt, n.x0), 0.0), n.chunk_ids, num)
        want_calm = calm(s_lp, t_lp, n.chunk_mask, temperature=5.0, reverse=False)
        want_kl = kl(zs, zt, n.masked, temperature=2.0)
    torch.testing.assert_close(values["calm"], want_calm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values["kl"], want_kl, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want_calm, calm(s_lp, t_lp, n.chunk_mask, temperature=2.0, reverse=False))


def test_shared_vocab_size_cuts_the_kl_to_the_first_ids(tiny_assets):
    """objective.shared_vocab_size: KL over the first V ids only (the rest of both heads ignored)."""
    from tide_ds.objectives import kl

    student, teacher, batch = _tiny_pair(tiny_assets)
    v = student.output_weight.shape[0] // 2
    step = DistillStep(student, teacher, resolve_terms("kl"), kernels="twin", shared_vocab_size=v)
    n = step.noise(batch, generator=torch.Generator().manual_seed(4))
    _, values = step.loss(n, step.teacher_targets(n), progress=0.0)
    with torch.no_grad():
        zs = student(n.x_t, n.x0)
        zt = teacher.hidden_states(n.teacher_pass_inputs[0], None, x0=n.x0) @ teacher.output_weight.T
        want = kl(zs[..., :v], zt[..., :v], n.masked, temperature=2.0)
    torch.testing.assert_close(values["kl"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, kl(zs, zt, n.masked, temperature=2.0))


def test_resolve_terms_binds_each_term_once_with_its_form():
    """TIDAL's chunk form on two tokenizers, its token form on one vocabulary; kinds and weights bound."""
    from tide_ds.config import ConfigError, TermConfig, TidalConfig
    from tide_ds.pipeline.terms import CHUNKS, LOGPROB, ROWS, TEACHER_ROWS

    cross, shared = resolve_terms("tide_shared", pipeline="cross"), resolve_terms("tide_shared", pipeline="shared")
    assert [(t.name, t.kind) for t in cross.terms] == [("ce", LOGPROB), ("tidal", LOGPROB)] and cross.comp_demo
    assert [(t.name, t.kind) for t in shared.terms] == [("ce", LOGPROB), ("tidal", ROWS)]
    assert cross.needs == {CHUNKS} and shared.needs == {TEACHER_ROWS}
    own = TidalConfig(timestep_weight="uniform", lambda_max=0.5)
    run = resolve_terms("tide_shared", {"ce": 0.5, "tidal": TermConfig(weight=2.0, temperature=5.0, tidal=own)})
    tidal = run.terms[1]
    assert (tidal.weight, tidal.config.temperature, tidal.config.tidal) == (2.0, 5.0, own)
    assert resolve_terms("kl", {"ce": 1.0, "kl": 0.0}).needs_teacher is False  # zero weight: left out
    with pytest.raises(ConfigError, match="unknown loss term 'klx'"):
        resolve_terms("kl", {"klx": 1.0})
