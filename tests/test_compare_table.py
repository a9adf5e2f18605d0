"""`bpfree compare`'s table: one row per run, with the alignment columns when runs have diagnostics."""

from bpfree.cli import comparison_table


def summary(method, acc):
    return {"method": method, "primary": "test_accuracy", "test_accuracy": acc, "test_loss": 0.5,
            "train_accuracy": acc, "train_loss": 0.4, "train_seconds": 1.0}


def test_table_without_diagnostics_has_no_alignment_columns():
    table = comparison_table([summary("bp", 0.9), summary("dfa", 0.8)])
    assert "cos(B" not in table
    assert table.splitlines()[2].startswith("| bp | 0.9000 |")


def test_alignment_columns_show_first_and_last_probe_and_a_dash_for_bp():
    curves = {"step": [10, 20, 30], "b_jacobian_cos": [0.01, 0.2, 0.45], "signal_cos": [0.0, 0.3, 0.5]}
    table = comparison_table([summary("bp", 0.9), summary("grape", 0.85)], [{}, {"curves": curves}])
    lines = table.splitlines()
    assert "cos(B, J̄) first → last" in lines[0] and lines[1].count("|---") == 8
    assert lines[2].endswith("| – | – |")
    assert lines[3].endswith("| 0.010 → 0.450 | 0.500 |")
