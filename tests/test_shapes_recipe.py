"""The shapes-64 recipe's pieces that are not exercised by training itself: the VQ-from-KL start (an exact
fold of the KL encoder's mean path) and the k-means that seeds its codebook."""
import dataclasses
import functools
import json

import pytest
import torch

from ldm.nn.autoencoder import Autoencoder
from ldm.data.images import to_model_range
from ldm.nn.vq_init import kmeans
from ldm.train.shapes_autoencoder import vq_from_kl
from ldm.train.shapes_common import AE_CONFIGS
from ldm.data.shapes_dataset import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(500, 2, generator=g) for c in true])
    centers = kmeans(points, 4, seed=1)
    # each true center has a found center within 0.05 (the cluster means are within ~0.01 of the truth)
    assert torch.cdist(true, centers).min(dim=1).values.max() < 0.05


def test_kmeans_fills_every_center():
    points = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    centers = kmeans(points, 64, seed=0)
    used = torch.cdist(points, centers).argmin(dim=1).unique()
    assert len(used) == 64


def test_vq_from_kl_encodes_exactly_the_kl_mean():
    small = dict(n_embed=32)
    kl = Autoencoder(AE_CONFIGS["kl"]).eval()
    torch.manual_seed(0)
    for p in kl.parameters():  # non-trivial weights everywhere, including the log-variance path
        p.data.normal_(0, 0.05)
    vq = Autoencoder(dataclasses.replace(AE_CONFIGS["vq"], **small)).eval()
    vq_from_kl(vq, kl.state_dict(), num_images=8)
    images, _ = make_batch(4, seed=1, size=64)
    x = to_model_range(images)
    with torch.no_grad():
        mean = kl.posterior(x).mode()
        pre = vq._moments(x)
        assert torch.allclose(pre, mean, atol=1e-5, rtol=1e-4)
        # the decoder is the KL decoder, fed the nearest of the k-means codes
        codes = vq.quantize.lookup(vq.quantize.indices(pre))
        assert torch.allclose(vq.decode(vq.encode(x)), kl.decode(codes * kl.config.scaling_factor), atol=1e-5)


def test_vq_from_kl_refuses_a_state_that_is_not_kl():
    vq = Autoencoder(dataclasses.replace(AE_CONFIGS["vq"], n_embed=32))
    for state in (Autoencoder(AE_CONFIGS["vq"]).state_dict(), {}):  # a VQ autoencoder's state; not an autoencoder
        with pytest.raises(ValueError, match="kl_state must be a KL autoencoder"):
            vq_from_kl(vq, state, num_images=8)


def test_runs_started_from_a_missing_run_fail_before_writing(tmp_path):
    from ldm.train.shapes import main
    for argv in (["autoencoder", "--kind", "vq", "--init-from-kl", str(tmp_path / "none")],
                 ["unet", "--ae", str(tmp_path / "none"), "--init-from", str(tmp_path / "none")],
                 ["autoencoder", "--init-from", ""],  # empty is refused, not taken as "from scratch"
                 ["unet", "--ae", "shapes-64", "--init-from", ""]):
        with pytest.raises(SystemExit, match="no run there"):
            main(argv + ["--run", str(tmp_path / "run")])
        assert not (tmp_path / "run").exists()


def test_training_source_takes_a_run_or_a_model_folder(tmp_path):
    from ldm.checkpoints import WEIGHTS_DIR
    from ldm.train.shapes_common import training_source
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.pt").write_bytes(b"")
    assert training_source("--ae", str(tmp_path / "run")) == tmp_path / "run" / "state.pt"
    if (WEIGHTS_DIR / "shapes-64").exists():  # a shipped model by name, as `--init-from shapes-64` passes it
        assert training_source("--init-from", "shapes-64") == WEIGHTS_DIR / "shapes-64"
    (tmp_path / "empty").mkdir()  # a folder that is neither
    with pytest.raises(SystemExit, match="--ae .*empty': no run there .* and no model folder"):
        training_source("--ae", str(tmp_path / "empty"))


def test_model_history_reads_the_structured_record_not_the_card(tmp_path):
    from ldm.train.shapes_card import TRAINING_FILE, model_history
    (tmp_path / TRAINING_FILE).write_text(json.dumps({
        "unet_steps": 6303, "unet_minutes": 112.3, "autoencoder_steps": 4446, "unet_scenes": 100000,
        "unet_captions": 55298,
        "commands": ["2026-11-25 01:53  python -m ldm.train.shapes autoencoder --run runs/ae"]}))
    (tmp_path / "MODEL_CARD.md").write_text("## Reproduce\n\n```\nnot read: the card is rendered, never parsed\n```\n")
    history = model_history(tmp_path)
    assert history["unet_steps"] == 6303 and history["unet_minutes"] == 112.3
    assert history["autoencoder_steps"] == 4446 and history["autoencoder_minutes"] == 0  # absent: 0
    assert history["commands"] == "2026-11-25 01:53  python -m ldm.train.shapes autoencoder --run runs/ae"
    assert history["unet_data"] == [100000, 55298]
    (tmp_path / TRAINING_FILE).unlink()  # a folder not made by the recipe counts as untrained
    assert (model_history(tmp_path)["unet_steps"], model_history(tmp_path)["commands"]) == (0, "")


def test_shipped_cards_are_rendered_from_their_folders(tmp_path):
    """Each shipped MODEL_CARD.md is exactly what `python -m ldm.train.shapes card` renders from training.json,
    the configs and training_history.md; and the command rewrites it."""
    import shutil

    from ldm.checkpoints import WEIGHTS_DIR
    from ldm.train.shapes import main
    from ldm.train.shapes_card import render_model_card
    for name in ("shapes-64", "shapes-64-vq"):
        assert render_model_card(WEIGHTS_DIR / name) == (WEIGHTS_DIR / name / "MODEL_CARD.md").read_text(), name
    copy = tmp_path / "shapes-64"
    shutil.copytree(WEIGHTS_DIR / "shapes-64", copy, ignore=shutil.ignore_patterns("*.safetensors"))
    (copy / "MODEL_CARD.md").write_text("stale")
    main(["card", "--model", str(copy)])
    assert (copy / "MODEL_CARD.md").read_text() == (WEIGHTS_DIR / "shapes-64" / "MODEL_CARD.md").read_text()
    for name in ("shapes-64", "shapes-64-vq"):  # the figures are those of the folder's own sampling defaults
        record = json.loads((WEIGHTS_DIR / name / "training.json").read_text())
        stored = json.loads((WEIGHTS_DIR / name / "ldm_pipeline.json").read_text())["diffusion"]
        assert record["sampler"] == stored["sampler"], name
        assert record.get("spacing", "trailing") == stored["spacing"], name
        assert record.get("sigma_schedule") == stored.get("sigma_schedule"), name


def test_measure_remeasures_a_folder_at_its_stored_defaults(tmp_path):
    """`python -m ldm.train.shapes measure` after a folder's default sampler and grid changed: the figures are
    measured with them and the card names them; the training record is kept."""
    import shutil

    from ldm.checkpoints import WEIGHTS_DIR
    from ldm.train.shapes import main
    copy = tmp_path / "shapes-64"
    shutil.copytree(WEIGHTS_DIR / "shapes-64", copy)
    config = json.loads((copy / "ldm_pipeline.json").read_text())
    config["diffusion"].update(sampler="unipc", spacing="linspace", sigma_schedule="karras")
    (copy / "ldm_pipeline.json").write_text(json.dumps(config))
    before = json.loads((copy / "training.json").read_text())
    main(["measure", "--model", str(copy), "--per-task", "1"])
    after = json.loads((copy / "training.json").read_text())
    assert (after["sampler"], after["spacing"], after["sigma_schedule"], after["per_task"]) == (
        "unipc", "linspace", "karras", 1)
    assert {k: after[k] for k in ("unet_steps", "commands", "export", "hardware")} == {
        k: before[k] for k in ("unet_steps", "commands", "export", "hardware")}  # trained there; measured here
    assert after["measured_on"]
    card = (copy / "MODEL_CARD.md").read_text()
    assert "Sampled by default with UniPC on Karras sigmas" in card and "1\n  prompts per task" in card


def test_lr_decay_is_cosine_to_a_tenth():
    from ldm.train.shapes_common import lr_decay
    assert lr_decay(5, None) == 1.0
    assert lr_decay(0, 1000) == 1.0
    assert lr_decay(500, 1000) == pytest.approx(0.55)
    assert lr_decay(1000, 1000) == pytest.approx(0.1) and lr_decay(5000, 1000) == pytest.approx(0.1)


def test_model_cards_say_what_the_model_is_and_how_it_was_trained():
    """The card template and the shipped cards: user-facing text (no project targets or issue numbers), what the
    model draws, and the folder's own history under "How it was trained" (kept by export in HISTORY_FILE)."""
    import string

    from ldm.checkpoints import WEIGHTS_DIR
    from ldm.train.shapes_card import HISTORY_FILE, MODEL_CARD, history_section
    fields = {name for _, name, _, _ in string.Formatter().parse(MODEL_CARD) if name}
    assert "history" in fields and "status" not in fields
    assert history_section("") == ""
    assert history_section("Two runs.\n").startswith("\n## How it was trained\n\nTwo runs.")
    for folder in sorted(p for p in WEIGHTS_DIR.iterdir() if (p / "MODEL_CARD.md").is_file()):
        card = (folder / "MODEL_CARD.md").read_text()
        assert "target" not in card.lower() and "issue" not in card.lower(), folder.name
        assert card.startswith(f"# {folder.name}: ") and "It draws nothing else" in card
        history = (folder / HISTORY_FILE).read_text()
        assert history_section(history) in card, folder.name


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many"])
def test_total_steps_must_be_a_positive_integer(tmp_path, value, capsys):
    from ldm.train.shapes import main
    for command in (["autoencoder"], ["unet", "--ae", "shapes-64"]):
        with pytest.raises(SystemExit):
            main(command + ["--run", str(tmp_path / "run"), "--total-steps", value])
        assert "argument --total-steps: expected an integer" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_autoencoder_init_from_refuses_another_kind_before_writing(tmp_path):
    from ldm.train.shapes import main
    from ldm.train.state import save_training_state
    vq = Autoencoder(dataclasses.replace(AE_CONFIGS["vq"], n_embed=32))
    save_training_state({"model": vq.state_dict(), "step": 10, "elapsed": 60.0}, tmp_path / "vq" / "state.pt")
    with pytest.raises(SystemExit, match="--init-from .*vq: not a KL autoencoder"):
        main(["autoencoder", "--run", str(tmp_path / "run"), "--init-from", str(tmp_path / "vq")])
    with pytest.raises(SystemExit, match="--init-from-kl .*vq: not a KL autoencoder"):
        main(["autoencoder", "--kind", "vq", "--run", str(tmp_path / "run"), "--init-from-kl", str(tmp_path / "vq")])
    with pytest.raises(SystemExit, match="pass one of --init-from"):
        main(["autoencoder", "--kind", "vq", "--run", str(tmp_path / "run"), "--init-from", str(tmp_path / "vq"),
              "--init-from-kl", str(tmp_path / "vq")])
    assert not (tmp_path / "run").exists()


def test_autoencoder_history_counts_every_run_it_started_from(tmp_path):
    from ldm.train.shapes_autoencoder import autoencoder_history
    from ldm.train.state import save_training_state
    first = {"source": "weights/shapes-64", "commands": "2026-11-25 01:53  python -m ldm.train.shapes autoencoder",
             "autoencoder_steps": 4446, "autoencoder_minutes": 65.0}
    save_training_state({"model": {}, "step": 3000, "elapsed": 1200.0, "prior": first}, tmp_path / "ae" / "state.pt")
    (tmp_path / "ae" / "commands.txt").write_text("2026-12-02 14:00  python -m ldm.train.shapes autoencoder "
                                                   "--init-from shapes-64\n")
    history = autoencoder_history(tmp_path / "ae" / "state.pt")
    assert history["autoencoder_steps"] == 7446 and history["autoencoder_minutes"] == pytest.approx(85.0)
    assert history["commands"].splitlines() == [first["commands"], "2026-12-02 14:00  python -m ldm.train.shapes "
                                                "autoencoder --init-from shapes-64"]
    assert history["source"] == str(tmp_path / "ae")


def test_training_history_lists_each_command_once_across_parts(tmp_path):
    """Both parts started from one shipped model: its commands once, then the new autoencoder's, then the
    U-Net's; steps add up per part."""
    import argparse
    from ldm.train.shapes import training_history
    from ldm.train.state import save_training_state
    shipped = "01:53  autoencoder --run runs/ae\n02:36  unet --run runs/unet --ae runs/ae"
    ae_prior = {"source": "weights/shapes-64", "commands": shipped, "autoencoder_steps": 4446,
                "autoencoder_minutes": 65.0}
    save_training_state({"model": {}, "step": 6000, "elapsed": 2400.0, "prior": ae_prior}, tmp_path / "ae" / "state.pt")
    (tmp_path / "ae" / "commands.txt").write_text("13:50  autoencoder --init-from shapes-64\n")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "commands.txt").write_text("14:40  unet --ae runs/ae --init-from shapes-64\n")
    # 6 scenes with 3 distinct captions (the cache also holds the empty caption)
    save_training_state({"caption_ids": torch.tensor([0, 1, 2, 0, 1, 2]), "embeddings": torch.zeros(4, 2, 3)},
                        tmp_path / "unet" / "text.pt")
    unet_prior = {"source": "weights/shapes-64", "commands": shipped, "unet_steps": 22030, "unet_minutes": 245.0}
    history = training_history(argparse.Namespace(ae=str(tmp_path / "ae"), unet=str(tmp_path / "unet")),
                               {"step": 100, "elapsed": 60.0, "prior": unet_prior})
    assert history["commands"].splitlines() == shipped.splitlines() + ["13:50  autoencoder --init-from shapes-64",
                                                                       "14:40  unet --ae runs/ae --init-from shapes-64"]
    assert (history["ae_steps"], history["prior_ae_steps"], history["unet_steps"]) == (10446, 4446, 22130)
    assert history["unet_data"] == [6, 3] and history["unet_curve"] is None and history["autoencoder_curve"] is None
    assert "Started from the autoencoder of shapes-64 (4446 steps), then 6000 steps" in history["ae_note"]


def test_autoencoder_run_stops_at_total_steps(tmp_path):
    """The learning rate is 0 from --total-steps on: the run ends there with a checkpoint, not at --minutes."""
    from ldm.train.shapes import main
    from ldm.train.state import load_training_state
    main(["autoencoder", "--run", str(tmp_path / "run"), "--total-steps", "2", "--batch", "2", "--minutes", "10"])
    state = load_training_state(tmp_path / "run" / "state.pt")
    assert state["step"] == 2
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[-1].startswith("2,")


def test_decoder_only_run_keeps_the_encoder_and_its_latents(tmp_path):
    """--decoder-only trains post_quant_conv and the decoder; every other weight is bit-identical, so a U-Net
    trained on the starting autoencoder's latents stays valid. It needs a trained autoencoder to start from, and a
    run resumes only the way it was started."""
    from ldm.train.shapes import main
    from ldm.train.state import load_training_state
    with pytest.raises(SystemExit, match="--decoder-only .*pass --init-from"):
        main(["autoencoder", "--run", str(tmp_path / "dec"), "--decoder-only"])
    assert not (tmp_path / "dec").exists()
    main(["autoencoder", "--run", str(tmp_path / "ae"), "--total-steps", "1", "--batch", "2"])
    main(["autoencoder", "--run", str(tmp_path / "dec"), "--init-from", str(tmp_path / "ae"), "--decoder-only",
          "--total-steps", "2", "--batch", "2"])
    before = load_training_state(tmp_path / "ae" / "state.pt")["model"]
    after = load_training_state(tmp_path / "dec" / "state.pt")
    assert after["decoder_only"] and after["step"] == 2
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert trained and all(torch.equal(before[k], after["model"][k]) for k in before if k not in trained)
    assert any(not torch.equal(before[k], after["model"][k]) for k in trained)
    commands = (tmp_path / "dec" / "commands.txt").read_text()
    with pytest.raises(SystemExit, match="trained with --decoder-only; resume it the same way"):
        main(["autoencoder", "--run", str(tmp_path / "dec"), "--total-steps", "3", "--batch", "2"])
    with pytest.raises(SystemExit, match="trained without --decoder-only; resume it the same way"):
        main(["autoencoder", "--run", str(tmp_path / "ae"), "--decoder-only", "--total-steps", "3", "--batch", "2"])
    assert (tmp_path / "dec" / "commands.txt").read_text() == commands


def test_vq_decoder_only_from_kl_keeps_the_kl_latents(tmp_path, monkeypatch):
    """--kind vq --decoder-only --init-from-kl: the encoder is the KL mean path folded and frozen, the codebook the
    k-means one; only the decoder trains. So the pre-quantization latents stay the KL posterior means, and the KL
    model's U-Net can be exported with it unchanged (with_latents_of accepts it; a perturbed encoder is refused)."""
    from ldm.train import shapes_autoencoder, shapes_common
    from ldm.train.shapes import main, with_latents_of
    from ldm.train.state import load_training_state
    monkeypatch.setitem(shapes_common.AE_CONFIGS, "vq", dataclasses.replace(AE_CONFIGS["vq"], n_embed=32))
    monkeypatch.setattr(shapes_autoencoder, "vq_from_kl", functools.partial(vq_from_kl, num_images=8))  # fast k-means
    main(["autoencoder", "--run", str(tmp_path / "ae"), "--total-steps", "1", "--batch", "2"])
    main(["autoencoder", "--kind", "vq", "--run", str(tmp_path / "vq"), "--decoder-only", "--init-from-kl",
          str(tmp_path / "ae"), "--total-steps", "2", "--batch", "2"])
    kl_state = load_training_state(tmp_path / "ae" / "state.pt")["model"]
    st = load_training_state(tmp_path / "vq" / "state.pt")
    assert st["decoder_only"] and st["step"] == 2 and st["prior"]["folded_kl"]
    kl = Autoencoder(AE_CONFIGS["kl"]).eval()
    kl.load_state_dict(kl_state)
    start = Autoencoder(shapes_common.AE_CONFIGS["vq"]).eval()
    vq_from_kl(start, kl_state, num_images=8)  # the same seed: what the run started from
    vq = Autoencoder(shapes_common.AE_CONFIGS["vq"]).eval()
    vq.load_state_dict(st["model"])
    trained = [k for k, _ in vq.named_parameters() if k.startswith(("decoder.", "post_quant_conv."))]
    frozen = [k for k, _ in vq.named_parameters() if k not in trained]
    assert all(torch.equal(vq.state_dict()[k], start.state_dict()[k]) for k in frozen)
    assert any(not torch.equal(vq.state_dict()[k], start.state_dict()[k]) for k in trained)
    out = with_latents_of(vq, kl, "--ae runs/vq", tmp_path / "shapes-64")
    assert out.config.kind == "vq" and out.config.scaling_factor == kl.config.scaling_factor
    with torch.no_grad():
        vq.encoder.conv_in.bias[0].add_(0.05)
    with pytest.raises(SystemExit, match="--ae runs/vq: it does not encode like"):
        with_latents_of(vq, kl, "--ae runs/vq", tmp_path / "shapes-64")


def test_a_unet_exported_unchanged_needs_an_autoencoder_that_encodes_alike(tmp_path):
    """export --unet <model folder>: the autoencoder must have that folder's encoder (a decoder-only fine-tune of
    it), and it takes that folder's latent scale, so the U-Net gets exactly the latents it was trained on."""
    from ldm.train.shapes import with_latents_of
    reference = Autoencoder(dataclasses.replace(AE_CONFIGS["kl"], scaling_factor=1.13309))
    tuned = Autoencoder(dataclasses.replace(AE_CONFIGS["kl"], scaling_factor=1.2))
    tuned.load_state_dict(reference.state_dict())
    with torch.no_grad():
        tuned.decoder.conv_out.weight.add_(0.1)
        tuned.post_quant_conv.bias.add_(0.1)
    out = with_latents_of(tuned, reference, "--ae runs/dec", tmp_path / "shapes-64")
    assert out.config.scaling_factor == 1.13309
    assert torch.equal(out.decoder.conv_out.weight, tuned.decoder.conv_out.weight)
    x = to_model_range(make_batch(2, seed=0, size=64)[0])
    with torch.no_grad():
        assert torch.equal(out.encode(x, sample=False), reference.encode(x, sample=False))
        tuned.encoder.conv_in.bias[0].add_(0.05)
    with pytest.raises(SystemExit, match="--ae runs/dec: it does not encode like .*--decoder-only --init-from shapes-64"):
        with_latents_of(tuned, reference, "--ae runs/dec", tmp_path / "shapes-64")


def test_training_history_of_a_unet_exported_unchanged_from_a_model_folder(tmp_path):
    """export --ae <decoder-only run> --unet shapes-64: the U-Net's steps, minutes, data and curve are the folder's;
    the new autoencoder run adds its steps and its command after the folder's commands."""
    import argparse
    from ldm.train.shapes import training_history
    from ldm.train.state import save_training_state
    folder = tmp_path / "shapes-64"
    (folder / "unet").mkdir(parents=True)
    (folder / "ldm_pipeline.json").write_text("{}")
    (folder / "training.json").write_text(json.dumps({
        "unet_steps": 36624, "unet_minutes": 321.0, "autoencoder_steps": 10627, "unet_scenes": 60000,
        "unet_captions": 35807, "commands": ["01:53  autoencoder --run runs/ae", "02:36  unet --run runs/unet"]}))
    (folder / "unet_loss.png").write_bytes(b"png")
    ae_prior = {"source": str(folder), "commands": "01:53  autoencoder --run runs/ae\n02:36  unet --run runs/unet",
                "autoencoder_steps": 10627, "autoencoder_minutes": 101.0}
    save_training_state({"model": {}, "step": 4000, "elapsed": 4800.0, "prior": ae_prior, "decoder_only": True},
                        tmp_path / "dec" / "state.pt")
    (tmp_path / "dec" / "commands.txt").write_text("11:25  autoencoder --init-from shapes-64 --decoder-only\n")
    history = training_history(argparse.Namespace(ae=str(tmp_path / "dec"), unet=str(folder)), None)
    assert (history["unet_steps"], history["unet_minutes"], history["unet_data"]) == (36624, 321.0, [60000, 35807])
    assert history["unet_curve"] == b"png" and history["prior_unet_steps"] == 0
    assert (history["ae_steps"], history["prior_ae_steps"]) == (14627, 10627)
    assert "decoder only" in history["ae_note"] and "exported unchanged" in history["unet_note"]
    assert history["commands"].splitlines() == ["01:53  autoencoder --run runs/ae", "02:36  unet --run runs/unet",
                                                "11:25  autoencoder --init-from shapes-64 --decoder-only"]
    # a VQ decoder on the folded KL encoder (--kind vq --init-from-kl --decoder-only) says so
    save_training_state({"model": {}, "step": 2400, "elapsed": 2400.0, "prior": {**ae_prior, "folded_kl": True},
                         "decoder_only": True}, tmp_path / "vq" / "state.pt")
    (tmp_path / "vq" / "commands.txt").write_text("21:00  autoencoder --kind vq --init-from-kl shapes-64 "
                                                  "--decoder-only\n")
    folded = training_history(argparse.Namespace(ae=str(tmp_path / "vq"), unet=str(folder)), None)
    assert folded["ae_folded"] and not history["ae_folded"] and folded["ae_steps"] == 13027
    assert "folded and frozen" in folded["ae_note"] and "folded" not in history["ae_note"]
    assert "KL encoder, folded and frozen" in folded["unet_note"] and "folded" not in history["unet_note"]
    # ... and so it does with a U-Net run trained on the KL latents (export --ae <vq run> --unet <unet run>)
    run = tmp_path / "unetrun"
    save_training_state({"caption_ids": torch.arange(5), "embeddings": [torch.zeros(3)] * 4}, run / "text.pt")
    (run / "commands.txt").write_text("16:55  unet --run runs/unetdeep --init-from shapes-64\n")
    unet_state = {"step": 4429, "elapsed": 6480.0,
                  "prior": {"source": str(folder), "unet_steps": 36624, "unet_minutes": 321.0, "commands": ""}}
    grown = training_history(argparse.Namespace(ae=str(tmp_path / "vq"), unet=str(run)), unet_state)
    assert (grown["unet_steps"], grown["unet_data"], grown["unet_unchanged"]) == (41053, [5, 3], False)
    assert "then 4429 steps" in grown["unet_note"] and "KL encoder, folded and frozen" in grown["unet_note"]


def test_binding_examples_are_exactly_the_two_object_and_scenes():
    from ldm.data.shapes_dataset import example
    from ldm.train.shapes_unet import binding_examples
    found = set(binding_examples(400, seed=3).tolist())
    assert 10 < len(found) < 60  # about 7% of the stream
    for i in range(400):
        scene, text = example(3, i)
        a = scene.objects
        two_distinct = len(a) == 2 and a[0].color != a[1].color and a[0].shape != a[1].shape
        assert (i in found) == (two_distinct and " and " in text), (i, text)
        if i in found:  # the caption names no relation
            assert not any(r in text for r in (" above ", " below ", " left of ", " right of ", " under "))


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5"])
def test_and_share_must_be_a_fraction_below_one(tmp_path, value):
    from ldm.train.shapes import main
    with pytest.raises(SystemExit, match="--and-share must be in"):
        main(["unet", "--ae", "shapes-64", "--run", str(tmp_path / "run"), "--and-share", value])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "2,0", "1,2,3", "deep", ""])
def test_transformer_depth_is_checked_before_writing(tmp_path, value):
    from ldm.train.shapes import main
    with pytest.raises(SystemExit, match="--transformer-depth"):
        main(["unet", "--ae", "shapes-64", "--run", str(tmp_path / "run"), "--transformer-depth", value])
    assert not (tmp_path / "run").exists()


def test_a_run_records_its_unet_config():
    from ldm.train.shapes_common import UNET_CONFIG
    from ldm.train.shapes_unet import unet_config, unet_config_of
    assert unet_config(None) == UNET_CONFIG
    assert unet_config("2").transformer_depth == 2
    deeper = unet_config("1,2")
    assert deeper.transformer_depth == (1, 2) and deeper.model_channels == UNET_CONFIG.model_channels
    assert unet_config_of({"unet_config": deeper.to_dict()}) == deeper
    assert unet_config_of({}) == UNET_CONFIG  # runs saved before the config was recorded


def test_an_autoencoder_exported_again_from_its_folder_keeps_its_note(tmp_path):
    """export --ae shapes-64-vq --unet <run>: the folder's training.json keeps how its autoencoder's last run
    trained (written by export), so the new card still says it and still explains the folded VQ encoder."""
    import argparse
    from ldm.train.shapes import training_history
    from ldm.train.state import save_training_state
    folder = tmp_path / "shapes-64-vq"
    (folder / "vae").mkdir(parents=True)
    (folder / "ldm_pipeline.json").write_text("{}")
    note = " This run trained the decoder only (`--decoder-only --init-from-kl`, ...): folded and frozen."
    (folder / "training.json").write_text(json.dumps({"autoencoder_steps": 19227, "autoencoder_note": note,
                                                       "autoencoder_folded": True}))
    run = tmp_path / "unetrun"
    save_training_state({"caption_ids": torch.arange(5), "embeddings": [torch.zeros(3)] * 4}, run / "text.pt")
    (run / "commands.txt").write_text("13:47  unet --run runs/unetdeep2 --init-from shapes-64\n")
    state = {"step": 9601, "elapsed": 5400.0, "prior": {"source": "shapes-64", "unet_steps": 41053,
                                                        "unet_minutes": 429.0, "commands": ""}}
    history = training_history(argparse.Namespace(ae=str(folder), unet=str(run)), state)
    assert (history["ae_steps"], history["ae_note"], history["ae_folded"]) == (19227, note, True)
    assert "KL encoder, folded and frozen" in history["unet_note"]
    # a folder whose record lacks the fields: no note, not folded
    (folder / "training.json").write_text('{"autoencoder_steps": 16827}')
    older = training_history(argparse.Namespace(ae=str(folder), unet=str(run)), state)
    assert (older["ae_note"], older["ae_folded"]) == ("", False) and "folded" not in older["unet_note"]


def test_unet_run_caches_are_the_scene_stream_through_the_trainers_encoders(tmp_path):
    # the recipe's latent and caption caches: ShapesDataset's stream encoded by encode_latents (posterior means,
    # as Autoencoder.encode(x, sample=False)) and encode_caption_table; built once, then read back
    import argparse

    from ldm.train.shapes_autoencoder import rescaled
    from ldm.train.shapes_unet import prepare_latents, prepare_text
    from tests.test_folder_data import FakeTextEncoder

    args = argparse.Namespace(num_images=5, seed=3)
    torch.manual_seed(0)
    ae = rescaled(Autoencoder(AE_CONFIGS["kl"]), scaling_factor=0.5, shift_factor=0.1)
    images, captions = make_batch(5, seed=3, size=64)
    with torch.no_grad():
        # contiguous: to_model_range of [N, H, W, 3] is channels-last, whose convolutions round differently
        expected = ae.encode(to_model_range(images).contiguous(), sample=False)
    data = prepare_latents(args, tmp_path, ae)
    torch.testing.assert_close(data["latents"], expected, atol=1e-5, rtol=1e-5)
    text = prepare_text(args, tmp_path, FakeTextEncoder())
    rows = text["caption_ids"]
    for i, c in enumerate(captions):
        ref = FakeTextEncoder().encode([c])
        n = ref.mask.shape[1]
        assert torch.equal(text["embeddings"][rows[i], :n], ref.embeddings[0].half())
        assert text["masks"][rows[i], :n].all()
    assert text["empty_id"] == 0 and not text["masks"][0, 2:].any()
    assert torch.equal(prepare_latents(args, tmp_path, None)["latents"], data["latents"])  # read back, not re-encoded
