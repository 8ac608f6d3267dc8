"""`verl-mtp sft --mtp-loss`: the same MTP objectives as RL's model.mtp.loss_type, with the expected
acceptance in the SFT metrics."""

import pytest

from tests.trainer.test_sft_train import data_dir, tiny  # noqa: F401  (module fixture)
from verl_mtp.trainer.sft import SFTError, build_model, collate, load_corpus, prepare_tokenizer, sft_loss


@pytest.mark.parametrize("mtp_loss", ["ce", "soft_ce", "tv"])
def test_sft_loss_types_and_expected_acceptance(data_dir, tmp_path, mtp_loss):  # noqa: F811
    cfg = tiny(data_dir, tmp_path, mtp_loss=mtp_loss)
    cfg.check()
    tok = prepare_tokenizer(cfg, tmp_path)
    ids, attention, mask = collate(load_corpus(cfg.data, tok, "response", 128)[0][:4], tok.pad_token_id)
    model = build_model(cfg, tok)
    _, mtp, metrics = sft_loss(model, ids, attention, mask, 1.0, True, float(mask.sum()), mtp_loss=mtp_loss)
    mtp.backward()
    assert model.model.mtp_layers[0].input_proj.weight.grad.abs().sum() > 0
    for k in (1, 2):
        assert 0 < metrics[f"mtp/expected_accept_rate_{k}"] <= 1
    if mtp_loss == "tv":  # at T=1 the TV loss is one minus the expected acceptance
        assert metrics["mtp/loss_1"] == pytest.approx(1 - metrics["mtp/expected_accept_rate_1"], abs=1e-5)


def test_unknown_mtp_loss_is_refused_naming_the_flag(data_dir, tmp_path):  # noqa: F811
    with pytest.raises(SFTError, match="--mtp-loss.*ce, soft_ce, tv"):
        tiny(data_dir, tmp_path, mtp_loss="kl").check()
