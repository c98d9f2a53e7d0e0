"""``surgery compare``'s models: every head family (BERT, RoBERTa, DeBERTa-v2, ELECTRA, DistilBERT, GPT-2 and
Llama with a pad token made from eos) and sentence-transformers folders load with a fresh head per seed;
every default method is applied, trained one step and reverted on each before any run; a run trains
through ``SurgeryTrainer``; and a model the methods do not fit is one clear error."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
from compare_helpers import FAMILIES, rows, save_model, save_sentence_transformers
from surgery.compare.labels import encode_labels
from surgery.compare.methods import parse_methods
from surgery.compare.models import check_methods, load_backbone
from surgery.compare.settings import CompareError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = encode_labels(["neg", "pos", "neg"], None, "auto", "d")
SCORES = encode_labels([0.5, -1.25, 2.0], None, "auto", "d")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-models")
    return {family: save_model(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_head_family_takes_every_default_method(folders, family):
    backbone = load_backbone(str(folders[family]), CLASSES)
    methods = check_methods(backbone, ())  # each applied, one training loss, reverted
    assert [m.label for m in methods] == ["baseline", "no_dropout", "mixout=0.1", "msd=8", "msd_layers", "rdrop=1"]
    assert backbone.last_token is (family in ("gpt2", "llama"))
    tok = backbone.tokenizer
    assert tok.pad_token is not None and (family not in ("gpt2", "llama") or tok.pad_token == tok.eos_token)
    a, b = backbone.load(3), backbone.load(3)
    assert surgery.get_record(a, required=False) is None  # the checks left nothing behind
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # the same seed: the same head
    c = backbone.load(4)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.config.num_labels == 2 and a.config.id2label == {0: "neg", 1: "pos"}


def test_the_default_set_adds_no_drop_path_and_leaves_out_what_the_model_cannot_take(tmp_path):
    backbone = load_backbone(str(save_model(tmp_path / "bart", "bart")), CLASSES)
    methods = check_methods(backbone, ())
    assert [m.label for m in methods] == ["baseline", "no_dropout", "mixout=0.1", "msd=8", "rdrop=1", "no_drop_path"]
    assert any(n.startswith("the default method msd_layers left out: backbone 'model' (BartModel) is an "
                            "encoder-decoder model") for n in backbone.notes)
    with pytest.raises(CompareError, match="method 'msd_layers' does not fit BartForSequenceClassification"):
        check_methods(backbone, ["msd_layers"])  # asked for: refused


def test_a_head_from_the_checkpoint_is_said(tmp_path):
    backbone = load_backbone(str(save_model(tmp_path / "m", "bert", head=True)), CLASSES)
    check_methods(backbone, ["no_dropout"])
    assert "its task head comes from the checkpoint: the same start for every seed" in backbone.notes


def test_regression_loads_a_one_output_head(folders):
    backbone = load_backbone(str(folders["roberta"]), SCORES)
    model = backbone.load(0)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


@pytest.mark.parametrize("subfolder, kind", [
    ("", "sentence_transformers.base.modules.transformer.Transformer"),  # as sentence-transformers 6 saves it
    ("0_Transformer", "sentence_transformers.models.Transformer"),        # older versions: a module folder
])
def test_a_sentence_transformers_folder_is_read_through_its_modules_json(tmp_path, subfolder, kind):
    root = save_sentence_transformers(tmp_path / "st", subfolder=subfolder, kind=kind)
    backbone = load_backbone(str(root), CLASSES)
    assert backbone.folder == (root / subfolder).resolve() if subfolder else backbone.folder == root
    assert backbone.class_name == "BertForSequenceClassification"
    assert "sentence-transformers folder" in backbone.notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_run_trains_through_the_surgery_trainer_and_prices_it(tmp_path, folders, family):
    """One run of an MSD method (on GPT-2 the head scores every token: compute_loss pools the samples as
    the model pools, its last real token, for the paper's loss) and of R-Drop, through the Trainer, evaluated at the planned steps."""
    from surgery.compare.metrics import METRICS
    from surgery.compare.running import RunPlan, run_one
    from surgery.compare.settings import Settings

    backbone = load_backbone(str(folders[family]), CLASSES)
    base, msd, rdrop = check_methods(backbone, ["msd=2", "rdrop=0.5"])
    data = rows(24)
    labels = encode_labels([r["label"] for r in data], None, "auto", "d")
    ds = backbone.encode([r["text"] for r in data], None, labels.train, 16)
    s = Settings(model="m", data="d", batch_size=8, max_steps=4)
    if family == "gpt2":  # R-Drop with the MSD head: compute_loss pools the samples as GPT-2 pools (its last token)
        assert check_methods(backbone, ["msd=2+rdrop=0.5"])[1].rdrop_alpha == 0.5
    for method in (msd, rdrop):
        rec = run_one(RunPlan(method, 0, 0, 4, [2, 4]), backbone, ds, ds.select(range(8)), METRICS["accuracy"], s,
                      "cpu", measure_export=True)
        assert [e["step"] for e in rec["evals"]] == [2, 4] and rec["last"] == rec["evals"][-1]["value"]
        assert 0 <= rec["last"] <= 1 and rec["step_seconds"] > 0 and rec["peak_memory"] > 0
        assert rec["export_form"] == "plain" and rec["export_bytes"] > 10_000


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path):
    save_model(tmp_path / "m", "bert", with_tokenizer=False)
    with pytest.raises(CompareError, match=r"no tokenizer in .*; save it there with tokenizer.save_pretrained\(DIR\)"):
        load_backbone(str(tmp_path / "m"), CLASSES)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "f").write_text("x") and p / "f", "not a folder"),
    (lambda p: (p / "e").mkdir() or p / "e", "no config.json (not a transformers model folder"),
])
def test_a_path_that_is_no_model_folder_is_refused(tmp_path, make, message):
    with pytest.raises(CompareError, match=message.replace("(", r"\(")):
        load_backbone(str(make(tmp_path)), CLASSES)


def test_a_model_type_without_a_text_classification_class_is_refused(tmp_path):
    save_model(tmp_path / "m", "bert")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "vit", "architectures": None}))
    with pytest.raises(CompareError, match="a 'vit' model, for which transformers has no "
                                           "AutoModelForSequenceClassification class"):
        load_backbone(str(tmp_path / "m"), CLASSES)


def test_a_sentence_transformers_folder_without_a_transformer_is_refused(tmp_path):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text(json.dumps([{"path": "1_Pooling",
                                                               "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(CompareError, match="lists no Transformer module: nothing to fine-tune"):
        load_backbone(str(tmp_path / "st"), CLASSES)


@pytest.mark.parametrize("family, specs, message", [
    ("bert", ["no_drop_path"], "method 'no_drop_path' changes nothing on BertForSequenceClassification: it has no "
                               "stochastic depth (DropPath / LayerDrop) above 0"),
    ("bert", ["drop_path=0.2"], "method 'drop_path=0.2' does not fit BertForSequenceClassification: drop_path=0.2: "
                                "the model reads no stochastic-depth"),
    ("nodrop", ["no_dropout"], "method 'no_dropout' changes nothing on LlamaForSequenceClassification: it has no "
                               "dropout above 0; leave the method out"),
    ("xlnet", ["msd=4"], "method 'msd=4' does not fit XLNetForSequenceClassification: no task head found"),
    ("xlnet", ["msd_layers"], "name it with --head NAME"),
    ("bert", ["mixout=0.1+msd_layers+mixot"], "unknown knob 'mixot'; did you mean 'mixout'?"),
])
def test_a_method_the_model_cannot_take_is_refused_before_any_run(tmp_path, folders, family, specs, message):
    if family == "nodrop":
        folder = save_model(tmp_path / "m", "llama", attention_dropout=0.0)
    elif family == "xlnet":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from compare_helpers import WORDS, tokenizer
        cfg = AutoConfig.for_model("xlnet", vocab_size=len(WORDS) + 4, d_model=16, n_layer=1, n_head=2, d_inner=24,
                                   num_labels=2)
        folder = tmp_path / "x"
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
    else:
        folder = folders[family]
    backbone = load_backbone(str(folder), CLASSES)
    with pytest.raises(CompareError) as e:
        check_methods(backbone, specs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_named_head_reaches_the_msd_methods(tmp_path, folders):
    backbone = load_backbone(str(folders["bert"]), CLASSES, head="classifier")
    (_, m) = check_methods(backbone, ["msd=3"])
    assert backbone.apply_kwargs(m) == {"msd": 3, "msd_p": 0.2, "head": "classifier"}
    backbone = load_backbone(str(folders["bert"]), CLASSES, head="bert.nothing")
    with pytest.raises(CompareError, match="head='bert.nothing' names no module"):
        check_methods(backbone, ["msd=3"])
    assert parse_methods(["no_dropout"])[1].apply_kwargs(head="classifier") == {"dropout": 0.0}


def test_the_device_is_chosen_and_named(monkeypatch):
    from surgery.compare.machine import choose_device, describe_device

    assert choose_device("cpu") == "cpu" and describe_device("cpu").startswith("CPU: ")
    if not torch.cuda.is_available():
        with pytest.raises(CompareError, match="--device cuda: torch sees no CUDA device here"):
            choose_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    assert choose_device("auto") == "cuda" and choose_device("cpu") == "cpu"
    assert describe_device("cuda") == f"GPU: NVIDIA H100 80GB HBM3 (cuda:0), torch {torch.__version__}"
